"""Getting a batch's records to the broker: produce and wait (at-least-once), or one
transaction with the offsets (exactly-once); records refused for good are rebuilt
(:func:`consumer.outputs.absorb`) and sent again, at most DELIVERY_ROUNDS times."""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import Producer

from consumer.batch import Batch
from consumer.commits import as_partitions, next_offsets
from consumer.intake import Intake
from consumer.metrics import WorkerMetrics
from consumer.outputs import (
    DeliveryError,
    DeliveryTracker,
    OutputConfig,
    OutRecord,
    absorb,
    batch_records,
    produce_all,
    wait_delivered,
)
from consumer.transactions import DELIVERY_TIMEOUT_S, Outcome, Transactions
from core.runtime.results import error_code
from core.runtime.telemetry import header_traceparent, trace_id_of
from schemas import names
from schemas.codec import Codec

logger = logging.getLogger(__name__)

DELIVERY_ROUNDS = 3  # first try, then records rebuilt after permanent refusals


class Delivery:
    """Builds, sends and confirms a batch's records."""

    def __init__(self, codec: Codec, out: OutputConfig, metrics: WorkerMetrics) -> None:
        self.codec = codec
        self.out = out
        self.metrics = metrics

    def at_least_once(self, batch: Batch, producer: Producer) -> None:
        """Produce and wait; records refused for good are rebuilt and sent once more
        (what was delivered is not sent again)."""
        delivered: set[tuple[int, str]] = set()
        for _round in range(DELIVERY_ROUNDS):
            records = [r for r in self.records(batch) if (r.item, r.kind) not in delivered]
            tracker = DeliveryTracker()
            produce_all(producer, records, tracker)
            wait_delivered(producer, tracker, DELIVERY_TIMEOUT_S)
            failed = {(f.record.item, f.record.kind) for f in tracker.failures}
            delivered |= {(r.item, r.kind) for r in records} - failed
            if not tracker.failures:
                self.log_outcomes(batch)
                return
            self._absorb(batch, tracker)
        raise DeliveryError(f"records still refused after {DELIVERY_ROUNDS} rounds")

    def in_transaction(self, batch: Batch, txns: Transactions, group_metadata: Any) -> bool:
        """Records and offsets in one transaction. False when it had to be aborted for a
        reason that is nobody's fault (a rebalance moved the group on): the caller
        rewinds the batch and whoever owns its partitions next redoes it."""
        offsets = as_partitions(next_offsets(batch.items))
        for _round in range(DELIVERY_ROUNDS):
            tracker = DeliveryTracker()
            outcome = txns.run(self.records(batch), offsets, tracker, group_metadata)
            if outcome is Outcome.GIVEN_BACK:
                return False
            if outcome is Outcome.COMMITTED:
                self.log_outcomes(batch)
                return True
            self._absorb(batch, tracker)
        raise DeliveryError(f"records still refused after {DELIVERY_ROUNDS} transactions")

    def records(self, batch: Batch) -> list[OutRecord]:
        return batch_records(
            batch.items,
            batch.results,
            self.codec,
            self.out,
            trace_headers=batch.trace.headers,
            dlq_caps=batch.dlq_caps,
        )

    def _absorb(self, batch: Batch, tracker: DeliveryTracker) -> None:
        absorb(
            batch.items,
            batch.results,
            tracker.failures,
            batch.dlq_caps,
            on_truncated=self.metrics.dlq_truncated.inc,
        )

    def log_outcomes(self, batch: Batch) -> None:
        for item, result in zip(batch.items, batch.results, strict=True):
            status = result.get("status")
            if status == names.STATUS_ERROR:
                error = result.get("error") or {}
                self.metrics.dlq.labels(error_code(result) or "").inc()
                logger.warning(
                    "bad input request_id=%s %s code=%s message=%s",
                    item.request_id,
                    item.where,
                    error.get("code"),
                    error.get("message"),
                    extra=log_ids(item),
                )
            elif status == names.STATUS_EXPIRED:
                logger.info(
                    "expired request_id=%s %s", item.request_id, item.where, extra=log_ids(item)
                )


def log_ids(item: Intake) -> dict[str, str | None]:
    """A log line's request fields (``core.runtime.logs``)."""
    return {
        "request_id": item.request_id,
        "trace_id": trace_id_of(header_traceparent(item.headers)),
    }
