"""Turn one Kafka message from ``qr.images`` into an :class:`ImageJob` or a reason it is not one.

A value is an Avro ``ImageRequest`` (Confluent framing or schemaless) or raw image bytes
(recognised by their magic bytes, or announced by an ``image/*`` ``content_type`` header).
Nothing here raises for bad input: the reason travels in :attr:`Intake.error` so the
worker can publish an ``ERROR`` result and copy the message to the DLQ.

Headers are input too: a ``correlation_id`` must be UTF-8 and at most
:data:`MAX_REQUEST_ID_BYTES`; a reply may only go to a partition that exists of the
configured replies topic (whoever can write to ``qr.images`` must not choose where a
worker writes). Trace context headers are ``core.runtime.telemetry``'s: a ``traceparent`` that is
not W3C trace context is not passed on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from core.runtime.errors import (
    BadMessageError,
    BadReplyRouteError,
    BadRequestError,
    EmptyImageError,
    QrsightError,
    UnsupportedTypeError,
)
from core.runtime.telemetry import trace_id_of
from core.vision.images import ImageLimits, probe, refused_kind
from core.vision.pipeline import ImageJob
from schemas import names
from schemas.codec import Codec, RegistryError, WireFormatError

# Magic bytes of the image formats a raw value may carry
# (core.vision.images decides what it accepts).
IMAGE_MAGIC: tuple[bytes, ...] = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",  # PNG
    b"BM",  # BMP
    b"GIF8",  # GIF (refused by probe with a clear unsupported_type)
    b"II*\x00",  # TIFF little-endian (same)
    b"MM\x00*",  # TIFF big-endian (same)
)
MAX_REQUEST_ID_BYTES = 256
# The partition count of the replies topic; asked with the partition a request names,
# so an implementation can refresh its metadata before calling it out of range.
ReplyPartitions = Callable[[int], int]


def looks_like_image(data: bytes) -> bool:
    """True when ``data`` starts with the magic bytes of an image format."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    return any(data.startswith(magic) for magic in IMAGE_MAGIC)


@dataclass
class Intake:
    """One consumed message and what the worker should do with it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    request_id: str
    source: str | None = None
    job: ImageJob | None = None
    error: QrsightError | None = None
    expired: bool = False
    deadline_ms: int | None = None
    reply_topic: str | None = None
    reply_partition: int | None = None
    queue_start_ms: int | None = None
    correlation: bytes | None = None  # the correlation_id header as sent, echoed in results
    # the reply sent instead of the result when the replies topic refused the result
    # (too large): an ERROR the caller sees rather than a timeout
    reply_result: dict[str, Any] | None = None

    @property
    def result_key(self) -> bytes:
        """Key and ``correlation_id`` of the results: the id exactly as the request sent it
        (so even an id refused as non-UTF-8 finds its caller), else the request id."""
        return self.correlation or self.request_id.encode("utf-8")

    @property
    def where(self) -> str:
        return f"topic={self.topic} partition={self.partition} offset={self.offset}"


def _headers(msg: Message) -> list[tuple[str, bytes | None]]:
    out: list[tuple[str, bytes | None]] = []
    for pair in msg.headers() or []:
        name, value = pair[0], pair[1]
        out.append((str(name), value if isinstance(value, bytes) or value is None else None))
    return out


def message_timestamp_ms(msg: Message) -> int | None:
    kind, ts = msg.timestamp()
    return None if kind == TIMESTAMP_NOT_AVAILABLE or ts <= 0 else int(ts)


def parse_message(
    msg: Message,
    codec: Codec,
    limits: ImageLimits,
    *,
    default_replies_topic: str,
    reply_partitions: ReplyPartitions | None = None,
    now_ms: int | None = None,
) -> Intake:
    """Classify one message; bad input ends up in ``error``, never raised.

    ``reply_partitions`` gives the replies topic's partition count (unchecked if None).
    """
    headers = _headers(msg)
    hdrs = names.header_dict(headers)
    topic, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
    item = Intake(
        topic=topic,
        partition=partition,
        offset=offset,
        key=msg.key(),
        value=msg.value(),
        headers=headers,
        request_id=f"{topic}-{partition}-{offset}",
        queue_start_ms=message_timestamp_ms(msg),
    )
    try:
        has_correlation = _read_correlation(item, hdrs.get(names.H_CORRELATION_ID))
        _fill(
            item,
            hdrs,
            codec,
            limits,
            has_correlation=has_correlation,
            default_replies_topic=default_replies_topic,
            reply_partitions=reply_partitions,
        )
        _check_deadline(item, hdrs, int(time.time() * 1000) if now_ms is None else now_ms)
    except QrsightError as exc:
        exc.request_id = item.request_id
        item.error, item.job = exc, None
    return item


def _read_correlation(item: Intake, raw: bytes | None) -> bool:
    """Take the request id from ``correlation_id``; refuse one that is not a sane id."""
    if not raw:
        return False
    if len(raw) > MAX_REQUEST_ID_BYTES:
        raise BadMessageError(
            f"{names.H_CORRELATION_ID} header is {len(raw)} bytes, over the limit of "
            f"{MAX_REQUEST_ID_BYTES}"
        )
    item.correlation = raw
    try:
        item.request_id = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        item.request_id = raw.decode("utf-8", errors="backslashreplace")
        raise BadMessageError(f"{names.H_CORRELATION_ID} header is not UTF-8: {exc}") from exc
    return True


def _fill(
    item: Intake,
    hdrs: dict[str, bytes],
    codec: Codec,
    limits: ImageLimits,
    *,
    has_correlation: bool,
    default_replies_topic: str,
    reply_partitions: ReplyPartitions | None,
) -> None:
    value = item.value or b""
    _read_reply_headers(item, hdrs, default_replies_topic, reply_partitions)
    if not value:
        raise EmptyImageError("message value is empty: expected an ImageRequest or image bytes")
    content_type = hdrs.get(names.H_CONTENT_TYPE, b"").decode("utf-8", errors="replace")
    if content_type.startswith("image/") or (value[0] != 0 and looks_like_image(value)):
        probe(value, limits)
        item.job = ImageJob(
            request_id=item.request_id,
            data=value,
            content_type=content_type or None,
            submitted_at_ms=item.queue_start_ms,
            trace_id=trace_id_of(hdrs.get(names.H_TRACEPARENT)),
        )
        return
    request = _decode_request(codec, value, item.topic)
    if not has_correlation and request.get("request_id"):
        rid = str(request["request_id"])
        if len(rid.encode("utf-8", "replace")) > MAX_REQUEST_ID_BYTES:
            raise BadMessageError(
                f"ImageRequest.request_id is over the limit of {MAX_REQUEST_ID_BYTES} bytes"
            )
        item.request_id = rid
    item.source = request.get("source")
    submitted = request.get("submitted_at")
    if isinstance(submitted, int) and submitted > 0:
        item.queue_start_ms = submitted
    image = request.get("image") or b""
    if not image:
        raise EmptyImageError("ImageRequest.image is empty")
    probe(image, limits)
    conf, decode = read_options(request.get("options"))
    item.job = ImageJob(
        request_id=item.request_id,
        data=image,
        source=item.source,
        content_type=request.get("content_type") or None,
        conf=conf,
        decode=decode,
        submitted_at_ms=item.queue_start_ms,
        trace_id=trace_id_of(hdrs.get(names.H_TRACEPARENT)),
    )


def read_options(options: object) -> tuple[float | None, bool | None]:
    """``ImageRequest.options`` checked as the API checks its query (``api.detect``):
    a confidence in [0, 1] and a true/false decode flag; null keeps the worker's setting.
    A bad value is the request's fault: an ``ERROR`` result, never a crash or a silent
    clamp."""
    if not options:
        return None, None
    if not isinstance(options, dict):
        raise BadRequestError(f"options must be a record, got {type(options).__name__}")
    conf, decode = options.get("confidence"), options.get("decode_payloads")
    if conf is not None and (
        isinstance(conf, bool)
        or not isinstance(conf, int | float)
        or not 0.0 <= float(conf) <= 1.0  # False for NaN too
    ):
        raise BadRequestError(f"options.confidence must be a number in [0, 1], got {conf!r}")
    if decode is not None and not isinstance(decode, bool):
        raise BadRequestError(f"options.decode_payloads must be true or false, got {decode!r}")
    return (None if conf is None else float(conf)), decode


def _decode_request(codec: Codec, value: bytes, topic: str) -> dict:
    try:
        record = codec.decode(value, topic)
    except RegistryError:
        raise  # the registry is away: not the message's fault
    except WireFormatError as exc:
        kind = refused_kind(value)
        if kind:
            raise UnsupportedTypeError(
                f"{kind} is not supported (send JPEG, PNG, WebP or BMP bytes, or an "
                "ImageRequest carrying them)"
            ) from exc
        raise BadMessageError(
            f"value is neither an Avro ImageRequest nor JPEG/PNG/WebP/BMP bytes: {exc}"
        ) from exc
    except Exception as exc:  # fastavro raises many types on garbage input
        raise BadMessageError(
            f"value is neither an Avro ImageRequest nor JPEG/PNG/WebP/BMP bytes: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(record, dict):
        raise BadMessageError("value decoded to something other than an ImageRequest record")
    return record


def _read_reply_headers(
    item: Intake,
    hdrs: dict[str, bytes],
    replies_topic: str,
    reply_partitions: ReplyPartitions | None,
) -> None:
    """A reply goes to the configured replies topic only, to a partition that exists."""
    topic = hdrs.get(names.H_REPLY_TOPIC)
    raw_partition = hdrs.get(names.H_REPLY_PARTITION)
    if topic is None and raw_partition is None:
        return
    if topic is not None and topic != replies_topic.encode("utf-8"):
        shown = topic[:100].decode("utf-8", errors="replace")
        raise BadReplyRouteError(
            f"{names.H_REPLY_TOPIC} {shown!r} is not the replies topic {replies_topic!r} "
            "(set by QRSIGHT_TOPIC_REPLIES); no reply sent"
        )
    partition = None
    if raw_partition is not None:
        try:
            partition = names.decode_partition(raw_partition)
        except ValueError as exc:
            raise BadReplyRouteError(f"bad {names.H_REPLY_PARTITION} header: {exc}") from exc
        count = None if reply_partitions is None else reply_partitions(partition)
        if partition < 0 or (count is not None and partition >= count):
            raise BadReplyRouteError(
                f"{names.H_REPLY_PARTITION} {partition} is not a partition of {replies_topic} "
                f"({count if count is not None else 'unknown'} partitions); no reply sent"
            )
    item.reply_topic, item.reply_partition = replies_topic, partition


def _check_deadline(item: Intake, hdrs: dict[str, bytes], now_ms: int) -> None:
    raw = hdrs.get(names.H_DEADLINE_MS)
    if raw is None:
        return
    try:
        deadline = names.decode_deadline(raw)
    except ValueError as exc:
        raise BadMessageError(f"bad {names.H_DEADLINE_MS} header: {exc}") from exc
    item.deadline_ms = deadline
    if now_ms > deadline:
        item.expired = True
        item.job = None
