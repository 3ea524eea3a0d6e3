"""Exactly-once: a batch's records and its consumer offsets in one Kafka transaction.

begin → produce the records → wait for every report → send the offsets → commit. Three
outcomes (:class:`Outcome`): *committed*; *refused* (records the broker refuses for good:
the transaction is aborted and the caller rebuilds them, :mod:`consumer.outputs`); *given
back* (the group moved on — a fenced generation after a rebalance, a coordinator timeout:
the transaction is aborted, the batch's partitions are rewound to its first offsets, and
whoever owns them next redoes it). Anything else raises
:class:`~consumer.outputs.DeliveryError`, so the worker exits without committing.

The worker's ``transactional.id`` comes from its stable identity, so a restarted worker
fences and aborts its predecessor's open transaction at once (``init_transactions``).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from consumer.commits import first_offsets
from consumer.outputs import (
    DeliveryError,
    DeliveryTracker,
    OutRecord,
    produce_all,
    raise_unrecoverable,
    wait_delivered,
)
from consumer.ownership import Key

__all__ = ["Outcome", "Transactions", "commit_transaction", "first_offsets", "gives_back", "rewind"]

logger = logging.getLogger(__name__)

TXN_TIMEOUT_S = 30.0
TXN_COMMIT_TRIES = 5
DELIVERY_TIMEOUT_S = 120.0


class Outcome(enum.Enum):
    COMMITTED = "committed"
    REFUSED = "refused"  # aborted: records refused for good (tracker.failures says which)
    GIVEN_BACK = "given back"  # aborted: the group moved on; the next owner redoes the batch


def gives_back(err: KafkaError) -> bool:
    """A failure that is nobody's fault: abort, rewind and let the partitions' owner redo it."""
    return not err.fatal() and (err.txn_requires_abort() or err.retriable())


class Transactions:
    """One producer's transactions, one per batch."""

    def __init__(self, producer: Producer, *, on_given_back: Any = lambda: None) -> None:
        self.producer = producer
        self._on_given_back = on_given_back

    def init(self) -> None:
        self.producer.init_transactions(TXN_TIMEOUT_S)

    def run(
        self,
        records: list[OutRecord],
        offsets: list[TopicPartition],
        tracker: DeliveryTracker,
        group_metadata: Any,
    ) -> Outcome:
        producer = self.producer
        producer.begin_transaction()
        try:
            produce_all(producer, records, tracker)
            wait_delivered(producer, tracker, DELIVERY_TIMEOUT_S)
            if tracker.failures:
                raise_unrecoverable(tracker.failures)
                producer.abort_transaction(TXN_TIMEOUT_S)
                return Outcome.REFUSED
            producer.send_offsets_to_transaction(offsets, group_metadata, TXN_TIMEOUT_S)
            commit_transaction(producer)
            return Outcome.COMMITTED
        except KafkaException as exc:
            err = exc.args[0]
            self.abort(err)
            if gives_back(err):
                self._on_given_back()
                logger.warning(
                    "transaction aborted, batch given back error=%s (a rebalance moved the "
                    "group on: the partitions' owner redoes it)",
                    err.str(),
                )
                return Outcome.GIVEN_BACK
            raise DeliveryError(f"transaction of {len(records)} record(s) failed: {exc}") from exc
        except DeliveryError as exc:
            self.abort(exc)
            raise

    def abort(self, reason: object) -> None:
        logger.warning("aborting transaction reason=%s", reason)
        try:
            self.producer.abort_transaction(TXN_TIMEOUT_S)
        except KafkaException as abort_exc:
            logger.error("abort_transaction failed error=%s", abort_exc)


def commit_transaction(producer: Producer) -> None:
    """``commit_transaction`` with the retries the confluent EOS example does."""
    for attempt in range(1, TXN_COMMIT_TRIES + 1):
        try:
            producer.commit_transaction(TXN_TIMEOUT_S)
            return
        except KafkaException as exc:
            err = exc.args[0]
            if err.retriable() and attempt < TXN_COMMIT_TRIES:
                logger.warning("commit_transaction retry attempt=%d error=%s", attempt, err)
                continue
            raise


def rewind(consumer: Consumer, first: Mapping[Key, int], owned: set[Key]) -> None:
    """Seek the batch's partitions back to its first offsets (what the last committed
    transaction left), so no message of an aborted transaction is skipped."""
    for (topic, partition), offset in first.items():
        if (topic, partition) not in owned:
            continue
        try:
            consumer.seek(TopicPartition(topic, partition, offset))
        except KafkaException as exc:  # revoked meanwhile: the new owner starts there
            logger.info("rewind skipped partition=%s[%d] error=%s", topic, partition, exc)
