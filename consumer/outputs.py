"""Producing a batch's results and DLQ copies, and knowing that the broker has them.

At-least-once: produce everything, flush, check every delivery report; only then may the
worker store the batch's offsets. Exactly-once: the same records and the consumer's offsets
go into one Kafka transaction per batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from core.errors import QrsightError

logger = logging.getLogger(__name__)

FLUSH_STEP_S = 1.0


class DeliveryError(QrsightError):
    """The broker did not take a batch's results; its offsets must not be stored."""

    code = "kafka_unavailable"
    http_status = 503


@dataclass
class OutRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    partition: int | None = None


class DeliveryTracker:
    """Counts delivery reports of one batch and keeps the first failure."""

    def __init__(self) -> None:
        self.pending = 0
        self.failures: list[str] = []

    def callback(self, err: KafkaError | None, msg: Message) -> None:
        self.pending -= 1
        if err is not None:
            self.failures.append(
                f"topic={msg.topic()} partition={msg.partition()} error={err.str()}"
            )


def produce_all(producer: Producer, records: list[OutRecord], tracker: DeliveryTracker) -> None:
    """Queue every record, waiting for room when the local queue is full."""
    for rec in records:
        kwargs: dict[str, Any] = {
            "key": rec.key,
            "value": rec.value,
            "headers": rec.headers,
            "on_delivery": tracker.callback,
        }
        if rec.partition is not None:
            kwargs["partition"] = rec.partition
        while True:
            try:
                producer.produce(rec.topic, **kwargs)
                tracker.pending += 1
                break
            except BufferError:
                producer.poll(0.1)
            except KafkaException as exc:
                tracker.failures.append(f"topic={rec.topic} error={exc.args[0].str()}")
                break


def wait_delivered(producer: Producer, tracker: DeliveryTracker, timeout_s: float) -> None:
    """Flush until every delivery report is in; raise :class:`DeliveryError` on any failure.

    librdkafka retries on its own (idempotent producer) until ``message.timeout.ms``;
    a report that still fails means the batch is not safe to commit.
    """
    deadline = time.monotonic() + timeout_s
    while tracker.pending > 0 and time.monotonic() < deadline:
        producer.flush(min(FLUSH_STEP_S, max(deadline - time.monotonic(), 0.0)))
    if tracker.failures:
        raise DeliveryError(
            f"{len(tracker.failures)} result(s) not delivered: {tracker.failures[0]}"
        )
    if tracker.pending > 0:
        raise DeliveryError(
            f"{tracker.pending} result(s) not acknowledged within {timeout_s:.0f}s "
            "(is the broker reachable? see QRSIGHT_KAFKA_BOOTSTRAP)"
        )
