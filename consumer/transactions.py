"""Exactly-once: a batch's records and its consumer offsets in one Kafka transaction.

begin → produce the records → wait for every report → send the offsets → commit. Three
outcomes (:class:`Outcome`): *committed*; *refused* (records the broker refuses for good:
the transaction is aborted and the caller rebuilds them, :mod:`consumer.outputs`); *given
back* (the transaction became abortable — a fenced generation after a rebalance, records
timed out while the coordinator moved: it is aborted, the batch's partitions are rewound
to its first offsets, and whoever owns them next redoes it). Anything else raises
:class:`~consumer.outputs.DeliveryError`, so the worker exits without committing and its
supervisor restarts it; the new producer's ``init_transactions`` (same
``transactional.id``, from the worker's stable identity) fences and aborts what was left
open.

**Every transactional call is bounded.** A retriable failure (a coordinator failing over)
is retried, with :class:`~core.runtime.backoff.Backoff`, for at most
:data:`TXN_BUDGET_S` per call (:func:`decide`), then the worker exits. librdkafka does not
always honour a call's own timeout (``send_offsets_to_transaction`` can wait for ever on a
coordinator that died: confluentinc/librdkafka#5456, #5511), and a C call that never
returns also keeps Python's signal handlers from running, so each call runs in a thread
of its own and is waited for from Python: past its timeout plus :data:`STUCK_GRACE_S` it is
given up (:class:`TransactionStuckError`, the worker exits), and a stop request is honoured
while it waits (:class:`~consumer.recovery.Stopping` after ``stop_wait_s``).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping
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
from consumer.recovery import Stopping
from core.runtime.backoff import Backoff
from core.runtime.errors import ConfigError
from core.runtime.kafka_security import is_authorization_error

__all__ = [
    "Outcome",
    "Step",
    "TransactionStuckError",
    "Transactions",
    "bounded_call",
    "call_with_retries",
    "decide",
    "first_offsets",
    "rewind",
]

logger = logging.getLogger(__name__)

TXN_CALL_S = 30.0  # one transactional call's own timeout
TXN_BUDGET_S = 60.0  # retriable failures of one call are retried this long, then exit
STUCK_GRACE_S = 5.0  # a call still inside librdkafka this long past its timeout is stuck
WAIT_STEP_S = 0.1  # how often a waiting worker looks at its stop flag
RETRY_BACKOFF = Backoff(first_s=0.5, max_s=5.0)
DELIVERY_TIMEOUT_S = 120.0


class Outcome(enum.Enum):
    COMMITTED = "committed"
    REFUSED = "refused"  # aborted: records refused for good (tracker.failures says which)
    GIVEN_BACK = "given back"  # aborted: the next owner of the partitions redoes the batch


class Step(enum.Enum):
    """What to do after a transactional call failed."""

    RETRY = "retry"  # call it again (librdkafka resumes the operation in progress)
    ABORT = "abort"  # abort the transaction, rewind, give the batch back
    EXIT = "exit"  # leave without committing: the supervisor restarts the worker


class TransactionStuckError(DeliveryError):
    """A transactional call did not return long after its timeout: the producer's state is
    unknown, so the worker exits (a fresh producer fences what it left open)."""


def decide(err: KafkaError, spent_s: float, budget_s: float = TXN_BUDGET_S) -> Step:
    """The next step after ``err``, ``spent_s`` into a call's retry budget.

    Fatal (fenced by a newer instance, a broken producer): exit. Abortable: abort and give
    the batch back. Retriable: the same call again while the budget lasts (aborting
    instead would conflict with the operation librdkafka still has in progress), then
    exit. Anything else (not authorised, a broken state): exit."""
    if err.fatal():
        return Step.EXIT
    if err.txn_requires_abort():
        return Step.ABORT
    if err.retriable() and spent_s < budget_s:
        return Step.RETRY
    return Step.EXIT


def bounded_call(
    call: Callable[[], None],
    name: str,
    *,
    limit_s: float,
    stop: threading.Event,
    stop_wait_s: float,
) -> None:
    """Run ``call`` in a daemon thread and wait for it from Python, at most ``limit_s``
    (:class:`TransactionStuckError` after that) and at most ``stop_wait_s`` once ``stop`` is
    set (:class:`Stopping`). Its own exception is re-raised here."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the waiting thread
            failure.append(exc)

    thread = threading.Thread(target=target, name=f"txn-{name}", daemon=True)
    started = time.monotonic()
    stop_seen: float | None = None
    thread.start()
    while True:
        thread.join(WAIT_STEP_S)
        if not thread.is_alive():
            break
        now = time.monotonic()
        if stop.is_set():
            stop_seen = now if stop_seen is None else stop_seen
            if now - stop_seen >= stop_wait_s:
                raise Stopping(f"stopped while {name} was in progress")
        if now - started >= limit_s:
            raise TransactionStuckError(
                f"{name} did not return within {limit_s:.0f}s (librdkafka lost track of "
                "the transaction coordinator): exiting without committing"
            )
    if failure:
        raise failure[0]


class Transactions:
    """One producer's transactions, one per batch."""

    def __init__(
        self,
        producer: Producer,
        *,
        on_given_back: Any = lambda: None,
        stop: threading.Event | None = None,
        stop_wait_s: float = 2.0,
        call_s: float = TXN_CALL_S,
        budget_s: float = TXN_BUDGET_S,
    ) -> None:
        self.producer = producer
        self._on_given_back = on_given_back
        self._stop = stop or threading.Event()
        self._stop_wait_s = stop_wait_s
        self._call_s = call_s
        self._budget_s = budget_s

    def init(self) -> None:
        self._call("init_transactions", lambda: self.producer.init_transactions(self._call_s))

    def run(
        self,
        records: list[OutRecord],
        offsets: list[TopicPartition],
        tracker: DeliveryTracker,
        group_metadata: Any,
    ) -> Outcome:
        producer = self.producer
        try:
            self._call("begin_transaction", producer.begin_transaction)
            produce_all(producer, records, tracker)
            wait_delivered(producer, tracker, DELIVERY_TIMEOUT_S)
            if tracker.failures:
                raise_unrecoverable(tracker.failures)
                self.abort("records refused for good")
                return Outcome.REFUSED
            self._call(
                "send_offsets_to_transaction",
                lambda: producer.send_offsets_to_transaction(offsets, group_metadata, self._call_s),
            )
            self._call("commit_transaction", lambda: producer.commit_transaction(self._call_s))
            return Outcome.COMMITTED
        except KafkaException as exc:
            err = exc.args[0]
            if is_authorization_error(err):
                raise  # a refused ACL: the worker exits naming the grant, not restarted
            if decide(err, 0.0, self._budget_s) is not Step.ABORT:
                raise DeliveryError(
                    f"transaction of {len(records)} record(s) failed: {err.str()}"
                ) from exc
            self.abort(err.str())
            self._on_given_back()
            logger.warning(
                "transaction aborted, batch given back error=%s (the partitions' owner redoes it)",
                err.str(),
            )
            return Outcome.GIVEN_BACK
        except TransactionStuckError:
            raise  # the producer is busy for good: no abort, exit
        except (DeliveryError, ConfigError) as exc:  # not delivered: abort, exit
            with contextlib.suppress(DeliveryError, Stopping):
                self.abort(exc)
            raise

    def abort(self, reason: object) -> None:
        """Abort (retried like any call); a transaction that cannot be aborted cannot be
        followed by another one, so a failure here ends the worker."""
        logger.warning("aborting transaction reason=%s", reason)
        try:
            self._call("abort_transaction", lambda: self.producer.abort_transaction(self._call_s))
        except KafkaException as exc:
            raise DeliveryError(f"abort_transaction failed: {exc.args[0].str()}") from exc

    def _call(self, name: str, call: Callable[[], None]) -> None:
        call_with_retries(
            call,
            name,
            call_s=self._call_s,
            budget_s=self._budget_s,
            stop=self._stop,
            stop_wait_s=self._stop_wait_s,
        )


def call_with_retries(
    call: Callable[[], None],
    name: str,
    *,
    call_s: float,
    budget_s: float,
    stop: threading.Event,
    stop_wait_s: float,
) -> None:
    """``call`` bounded (:func:`bounded_call`, ``call_s`` + :data:`STUCK_GRACE_S`),
    retried while :func:`decide` says so; raises the last KafkaException otherwise."""
    started = time.monotonic()
    failures = 0
    while True:
        try:
            bounded_call(
                call, name, limit_s=call_s + STUCK_GRACE_S, stop=stop, stop_wait_s=stop_wait_s
            )
            return
        except KafkaException as exc:
            err = exc.args[0]
            spent = time.monotonic() - started
            if decide(err, spent, budget_s) is not Step.RETRY:
                raise
            failures += 1
            logger.warning(
                "%s failed, retrying attempt=%d spent_s=%.1f budget_s=%.0f error=%s",
                name,
                failures,
                spent,
                budget_s,
                err.str(),
            )
            if stop.wait(RETRY_BACKOFF.delay_s(failures)):
                raise Stopping(f"stopped while retrying {name}") from exc


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
