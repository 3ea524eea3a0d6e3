"""A batch's output records (results, replies, DLQ copies) and knowing the broker has them.

At-least-once: produce everything, flush, check every delivery report; only then may the
worker commit the batch's offsets. Exactly-once: the same records and the consumer's offsets
go into one Kafka transaction per batch.

A delivery report is sorted into one of three kinds (:func:`failure_kind`): *transient*
(broker down, leader moving: librdkafka already retried it until ``message.timeout.ms``,
so the batch is not safe to commit and the worker stops), *permanent for this record*
(too large, invalid: retrying cannot help, so the image gets an ``ERROR`` result and its
DLQ copy instead; a DLQ copy is truncated until it fits) and *configuration* (not
authorised: the message names the topic to fix).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from consumer.intake import Intake
from core.runtime.errors import ConfigError, KafkaUnavailableError, UndeliverableError
from core.runtime.results import error_record
from schemas import names
from schemas.codec import Codec

logger = logging.getLogger(__name__)

FLUSH_STEP_S = 1.0
# What a record costs beyond its key, value and header bytes (record framing, header
# counts and lengths as varints): an upper bound, so a sized record always fits.
RECORD_OVERHEAD_BYTES = 512
PER_HEADER_OVERHEAD_BYTES = 16
# Broker-side fallback when the DLQ topic's max.message.bytes is below ours (Kafka's
# default is 1 MiB): a DLQ copy the broker refuses is cut to this, then to nothing.
DLQ_FALLBACK_BYTES = 512 * 1024
TRUNCATED_MESSAGE_CHARS = 2000

RecordKind = Literal["result", "reply", "dlq"]
Headers = list[tuple[str, bytes | None]]
FailureKind = Literal["transient", "permanent", "config"]

# Refusals that no retry can fix, caused by the record itself.
_PERMANENT = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_TIMESTAMP,
        KafkaError._INVALID_ARG,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
    }
)
_CONFIG = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
    }
)


class DeliveryError(KafkaUnavailableError):
    """The broker did not take a batch's results; its offsets must not be committed."""


def failure_kind(err: KafkaError) -> FailureKind:
    if err.code() in _CONFIG:
        return "config"
    if err.code() in _PERMANENT:
        return "permanent"
    return "transient"


@dataclass
class OutRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    partition: int | None = None
    item: int = -1  # index of the batch item it belongs to
    kind: RecordKind = "result"

    def size(self) -> int:
        """An upper bound of the record's size on the wire (before compression)."""
        return record_size(self.key, self.value, self.headers)


def record_size(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]]
) -> int:
    head = sum(len(k.encode()) + len(v or b"") + PER_HEADER_OVERHEAD_BYTES for k, v in headers)
    return len(key or b"") + len(value or b"") + head + RECORD_OVERHEAD_BYTES


@dataclass
class Failure:
    record: OutRecord
    error: KafkaError

    @property
    def kind(self) -> FailureKind:
        return failure_kind(self.error)

    def __str__(self) -> str:
        return f"topic={self.record.topic} kind={self.record.kind} error={self.error.str()}"


@dataclass
class DeliveryTracker:
    """Counts the delivery reports of one batch and keeps every failure with its record."""

    pending: int = 0
    failures: list[Failure] = field(default_factory=list)

    def callback_for(self, record: OutRecord) -> Any:
        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            self.pending -= 1
            if err is not None:
                self.failures.append(Failure(record, err))

        return on_delivery


# --- building the records ---------------------------------------------------------------
@dataclass(frozen=True)
class OutputConfig:
    """Where results go and how large a record may be (from settings and topic metadata)."""

    detections_topic: str
    dlq_topic: str
    max_record_bytes: int  # producer message.max.bytes


def result_records(
    item: Intake,
    result: dict[str, Any],
    codec: Codec,
    out: OutputConfig,
    index: int = -1,
    *,
    trace_headers: Callable[[str], Headers] | None = None,
) -> list[OutRecord]:
    """The result event for ``qr.detections`` and, when the request asked, its reply.

    ``trace_headers(topic)`` gives the trace-context headers of the record to ``topic``
    (``core.runtime.telemetry``'s ``BatchTrace.headers``)."""
    key = item.result_key
    topics: list[tuple[str, int | None, RecordKind]] = [(out.detections_topic, None, "result")]
    if item.reply_topic:
        topics.append((item.reply_topic, item.reply_partition, "reply"))
    values = codec.encode_all(result, [topic for topic, _, _ in topics])  # one Avro encode
    if item.reply_topic and item.reply_result is not None:
        values[item.reply_topic] = codec.encode(item.reply_result, item.reply_topic)
    return [
        OutRecord(
            topic,
            key,
            values[topic],
            [(names.H_CORRELATION_ID, key), *(trace_headers(topic) if trace_headers else [])],
            partition,
            item=index,
            kind=kind,
        )
        for topic, partition, kind in topics
    ]


def dlq_record(
    item: Intake,
    code: str,
    message: str,
    out: OutputConfig,
    index: int = -1,
    *,
    max_bytes: int | None = None,
) -> OutRecord:
    """A copy of the original message with the error headers, cut to fit ``max_bytes``.

    The original headers come first and the error headers last (so ``error.*`` wins in
    a last-value-wins reading). What does not fit is dropped, value first, then the
    original headers, and ``error.truncated`` says what was cut.
    """
    limit = out.max_record_bytes if max_bytes is None else max_bytes
    error_headers: list[tuple[str, bytes | None]] = [
        (names.H_ERROR_CODE, code.encode()),
        (names.H_ERROR_MESSAGE, message[:TRUNCATED_MESSAGE_CHARS].encode("utf-8", "replace")),
        (names.H_ERROR_OFFSET, str(item.offset).encode()),
        (names.H_ERROR_PARTITION, str(item.partition).encode()),
        (names.H_ERROR_TOPIC, item.topic.encode()),
    ]
    key = item.key if item.key is None or len(item.key) <= limit // 4 else item.key[: limit // 4]
    headers = [*item.headers, *error_headers]
    value = item.value
    cut: list[str] = []
    if key is not item.key:
        cut.append(f"key {len(item.key or b'')}")
    room = limit - record_size(key, b"", headers) - _truncated_header_bytes()
    if room < 0:  # the original headers alone are too large: keep only ours
        cut.append(f"headers {len(item.headers)}")
        headers = list(error_headers)
        room = limit - record_size(key, b"", headers) - _truncated_header_bytes()
    if value is not None and len(value) > room:
        cut.append(f"value {len(value)}")
        value = value[: max(room, 0)]
    if cut:
        headers.append((names.H_ERROR_TRUNCATED, ("original " + ", ".join(cut)).encode()))
    return OutRecord(out.dlq_topic, key, value, headers, item=index, kind="dlq")


def batch_records(
    items: Sequence[Intake],
    results: Sequence[dict[str, Any]],
    codec: Codec,
    out: OutputConfig,
    *,
    trace_headers: Callable[[Intake, dict[str, Any], str], Headers],
    dlq_caps: dict[int, int] | None = None,
) -> list[OutRecord]:
    """Every record of a batch: each item's result (and reply), and a DLQ copy of each
    item whose result is an ``ERROR`` (cut to ``dlq_caps[i]`` where one was refused)."""
    records: list[OutRecord] = []
    caps = dlq_caps or {}
    for i, (item, result) in enumerate(zip(items, results, strict=True)):
        headers = functools.partial(trace_headers, item, result)
        records.extend(result_records(item, result, codec, out, i, trace_headers=headers))
        if result.get("status") == names.STATUS_ERROR:
            error = result.get("error") or {}
            code, message = str(error.get("code", "")), str(error.get("message", ""))
            records.append(dlq_record(item, code, message, out, i, max_bytes=caps.get(i)))
    return records


def absorb(
    items: Sequence[Intake],
    results: list[dict[str, Any]],
    failures: Sequence[Failure],
    dlq_caps: dict[int, int],
    *,
    on_truncated: Callable[[], None] = lambda: None,
) -> None:
    """Turn records the broker refused for good into what can be delivered: an ``ERROR``
    result (and DLQ copy) for an image whose result is refused, a shorter DLQ copy, no
    reply for a refused reply route. Raises for anything transient."""
    raise_unrecoverable(failures)
    for failure in failures:
        rec, i = failure.record, failure.record.item
        item = items[i]
        if rec.kind == "dlq":
            size = len(rec.value or b"")
            dlq_caps[i] = DLQ_FALLBACK_BYTES if size > DLQ_FALLBACK_BYTES else 0
            on_truncated()
            logger.warning(
                "DLQ copy refused, truncating request_id=%s size=%d cap=%d error=%s",
                item.request_id,
                rec.size(),
                dlq_caps[i],
                failure.error.str(),
            )
        elif rec.kind == "reply":
            _refused_reply(item, failure)
        else:
            error = UndeliverableError(
                f"the broker refused this image's result: {failure.error.str()}",
                request_id=item.request_id,
            )
            results[i] = error_record(item.request_id, item.source, error)


def _refused_reply(item: Intake, failure: Failure) -> None:
    """A reply the replies topic refused for good (too large for its ``max.message.bytes``)
    is replaced by a small ``ERROR`` reply, so the caller gets an answer instead of waiting
    for its timeout; only if that is refused too is no reply sent."""
    if item.reply_result is not None:
        logger.warning(
            "error reply refused too, none sent request_id=%s error=%s",
            item.request_id,
            failure.error.str(),
        )
        item.reply_topic = None
        return
    logger.warning(
        "reply refused, sending an error reply request_id=%s size=%d error=%s",
        item.request_id,
        failure.record.size(),
        failure.error.str(),
    )
    error = UndeliverableError(
        f"the broker refused this image's reply ({failure.record.size()} bytes): "
        f"{failure.error.str()}; its result is on the detections topic",
        request_id=item.request_id,
    )
    item.reply_result = error_record(item.request_id, item.source, error)


def _truncated_header_bytes() -> int:
    return len(names.H_ERROR_TRUNCATED) + 96 + PER_HEADER_OVERHEAD_BYTES


# --- producing and waiting -------------------------------------------------------------------
def produce_all(producer: Producer, records: list[OutRecord], tracker: DeliveryTracker) -> None:
    """Queue every record, waiting for room when the local queue is full. A record that
    librdkafka refuses at once (e.g. over ``message.max.bytes``) is a failure, not a raise."""
    for rec in records:
        kwargs: dict[str, Any] = {
            "key": rec.key,
            "value": rec.value,
            "headers": rec.headers,
            "on_delivery": tracker.callback_for(rec),
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
                if exc.args[0].code() == KafkaError._FATAL:
                    # the producer failed for good (e.g. its user may write nowhere, so it
                    # got no producer id): serving its events raises the cause
                    producer.poll(0)
                tracker.failures.append(Failure(rec, exc.args[0]))
                break


def wait_delivered(producer: Producer, tracker: DeliveryTracker, timeout_s: float) -> None:
    """Flush until every delivery report is in (failures stay in ``tracker.failures``).

    librdkafka retries transient errors on its own (idempotent producer) until
    ``message.timeout.ms``; raises :class:`DeliveryError` only if reports are still
    missing after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while tracker.pending > 0 and time.monotonic() < deadline:
        producer.flush(min(FLUSH_STEP_S, max(deadline - time.monotonic(), 0.0)))
    if tracker.pending > 0:
        raise DeliveryError(
            f"{tracker.pending} result(s) not acknowledged within {timeout_s:.0f}s "
            "(is the broker reachable? see QRSIGHT_KAFKA_BOOTSTRAP)"
        )


def raise_unrecoverable(failures: Sequence[Failure]) -> None:
    """Raise for failures that are not one record's fault: a refused ACL is a setting to
    fix (:class:`ConfigError`: the worker exits and is not restarted, as for a refused
    read), anything else transient (:class:`DeliveryError`: restarted)."""
    for failure in failures:
        if failure.kind == "config":
            raise ConfigError(
                f"Kafka refused this worker's write to topic {failure.record.topic} "
                f"({failure.error.str()}): grant its user Write on it with "
                '`qrsight-topics acls` (README, "Running on a secured Kafka"), '
                "or fix QRSIGHT_KAFKA_SASL_*"
            )
    transient = [f for f in failures if f.kind == "transient"]
    if transient:
        raise DeliveryError(f"{len(transient)} record(s) not delivered: {transient[0]}")
