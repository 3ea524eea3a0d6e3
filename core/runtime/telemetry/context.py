"""The W3C trace context in Kafka and HTTP headers, with or without the SDK.

These functions are all tracing does when it is off: a ``traceparent`` is passed on, so
the logs of every process still share a trace id."""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence

TRACEPARENT = "traceparent"
TRACE_HEADERS = (TRACEPARENT, "tracestate")
MAX_TRACESTATE = 512  # W3C: 32 list members; vendors should propagate at least 512 bytes
TRACEPARENT_RE = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
INVALID_TRACE_ID = "0" * 32

Headers = Sequence[tuple[str, bytes | str | None]]
KafkaHeaders = list[tuple[str, bytes | None]]


def parse_traceparent(value: str | bytes | None) -> tuple[str, str, str] | None:
    """(trace id, span id, flags) of a valid W3C ``traceparent``, else ``None``."""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    match = TRACEPARENT_RE.match((value or "").strip().lower())
    if not match or match.group(1) == "ff" or match.group(2) == INVALID_TRACE_ID:
        return None
    if match.group(3) == "0" * 16:
        return None
    return match.group(2), match.group(3), match.group(4)


def child_traceparent(incoming: str | bytes | None) -> str:
    """A ``traceparent`` for a new hop: the caller's trace with a new span id, or a new trace."""
    span = secrets.token_hex(8)
    parsed = parse_traceparent(incoming)
    if parsed:
        return f"00-{parsed[0]}-{span}-{parsed[2]}"
    return f"00-{secrets.token_hex(16)}-{span}-01"


def trace_id_of(traceparent: str | bytes | None) -> str | None:
    """The trace id (32 hex digits) of a ``traceparent``, ``None`` when it is not valid."""
    parsed = parse_traceparent(traceparent)
    return parsed[0] if parsed else None


def header_traceparent(headers: Headers | None) -> str | None:
    """The ``traceparent`` value among Kafka headers (``None`` when absent)."""
    for name, value in headers or ():
        if name == TRACEPARENT and value is not None:
            return value.decode("ascii", "replace") if isinstance(value, bytes) else value
    return None


def trace_headers(headers: Headers | None) -> KafkaHeaders:
    """The W3C trace-context headers among ``headers``, as Kafka headers (bytes).

    Only a valid ``traceparent`` is passed on, and ``tracestate`` only with it and only
    up to :data:`MAX_TRACESTATE` bytes: the W3C spec says not to propagate what does not
    parse, and a hostile 100 KB header must not be copied into every result."""
    if parse_traceparent(header_traceparent(headers)) is None:
        return []
    out: KafkaHeaders = []
    for name, value in headers or ():
        if name not in TRACE_HEADERS or value is None:
            continue
        raw = value.encode() if isinstance(value, str) else value
        if name != TRACEPARENT and len(raw) > MAX_TRACESTATE:
            continue
        out.append((name, raw))
    return out
