"""Topic and header names of the wire contract (DESIGN.md, "Topics" and "Headers")."""

from __future__ import annotations

import struct

NAMESPACE = "qrsight.v1"

# Default topic names; deployments may rename them through settings.
TOPIC_IMAGES = "qr.images"
TOPIC_DETECTIONS = "qr.detections"
TOPIC_REPLIES = "qr.replies"
TOPIC_DLQ = "qr.images.dlq"

# Request/result headers.
H_CORRELATION_ID = "correlation_id"  # request id, UTF-8
H_REPLY_TOPIC = "reply_topic"  # UTF-8
H_REPLY_PARTITION = "reply_partition"  # 4-byte big-endian int, as Spring Kafka
H_CONTENT_TYPE = "content_type"  # for raw image values
H_DEADLINE_MS = "deadline_ms"  # epoch ms, decimal UTF-8 or 8-byte big-endian
H_TRACEPARENT = "traceparent"  # W3C trace context, passed through to results

# DLQ headers.
H_ERROR_CODE = "error.code"
H_ERROR_MESSAGE = "error.message"
H_ERROR_OFFSET = "error.offset"
H_ERROR_PARTITION = "error.partition"
H_ERROR_TOPIC = "error.topic"
H_ERROR_TRUNCATED = "error.truncated"  # set when a DLQ copy was cut to fit; says what was cut

STATUS_OK = "OK"
STATUS_ERROR = "ERROR"
STATUS_EXPIRED = "EXPIRED"


def encode_partition(partition: int) -> bytes:
    """``reply_partition`` header value: 4-byte big-endian signed int (Spring Kafka)."""
    return struct.pack(">i", partition)


def decode_partition(value: bytes) -> int:
    if len(value) != 4:
        raise ValueError(f"reply_partition header must be 4 bytes, got {len(value)}")
    return int(struct.unpack(">i", value)[0])


def encode_deadline(epoch_ms: int) -> bytes:
    return str(int(epoch_ms)).encode()


def decode_deadline(value: bytes) -> int:
    """Decimal UTF-8 (what qrsight writes) or an 8-byte big-endian long."""
    text = value.decode("ascii", errors="strict") if value.isascii() else ""
    if text.strip().isdigit():
        return int(text)
    if len(value) == 8:
        return int(struct.unpack(">q", value)[0])
    raise ValueError(f"deadline_ms header is neither decimal text nor 8 bytes: {value!r}")


def header_dict(headers: list[tuple[str, bytes | None]] | None) -> dict[str, bytes]:
    """Kafka headers as a dict (last value wins), skipping null values."""
    return {k: v for k, v in (headers or []) if v is not None}
