"""The tracing interface the processes call, and :data:`OFF`, its no-cost implementation.

:class:`Tracing`'s methods, as written here, do only what qrsight did before tracing
existed: pass a ``traceparent`` on. ``core.runtime.telemetry.otel`` overrides them with
the OpenTelemetry SDK."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol

from core.runtime.telemetry.context import (
    INVALID_TRACE_ID,
    TRACEPARENT,
    Headers,
    KafkaHeaders,
    child_traceparent,
    trace_headers,
    trace_id_of,
)
from core.runtime.telemetry.stages import StageLog


class HttpHeaders(Protocol):
    """Incoming HTTP headers (a dict, or werkzeug's ``request.headers``)."""

    def get(self, key: str, /) -> str | None: ...


class Message(Protocol):
    """What a batch span needs of a consumed message (``consumer.intake.Intake`` fits)."""

    @property
    def headers(self) -> KafkaHeaders: ...
    @property
    def request_id(self) -> str: ...
    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def job(self) -> object | None: ...


class Span:
    """One operation of a request: a server, send or receive span (off: only its context)."""

    def __init__(self, traceparent: str) -> None:
        self.traceparent = traceparent  # the context a child (or the next hop) continues

    @property
    def trace_id(self) -> str:
        return trace_id_of(self.traceparent) or INVALID_TRACE_ID

    def http_status(self, code: int) -> None:
        """Record the HTTP response status; 5xx marks the span as failed."""

    def end(self, error: str | None = None) -> None:
        """End the span; ``error`` (a stable code or message) marks it failed."""


class BatchTrace:
    """The spans of one worker batch. Off: no spans, the incoming trace context passes on."""

    stages: StageLog | None = None

    def __enter__(self) -> BatchTrace:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def headers(self, item: Message, result: Mapping[str, Any], topic: str) -> KafkaHeaders:
        """Trace headers for ``item``'s result record to ``topic``."""
        return trace_headers(item.headers)


class Tracing:
    """The process's tracing. This base class is "off" (:data:`OFF`); see :class:`OtelTracing`."""

    def server(self, name: str, headers: HttpHeaders, attributes: Mapping[str, Any]) -> Span:
        """An incoming HTTP request, continuing the caller's ``traceparent`` if it sent one."""
        return Span(child_traceparent(headers.get(TRACEPARENT)))

    def send(self, topic: str, parent: str | None, attributes: Mapping[str, Any]) -> Span:
        """Producing one message to ``topic``: put ``.traceparent`` in its headers."""
        return Span(child_traceparent(parent))

    def received(
        self,
        topic: str,
        headers: Headers | None,
        parent: str | None,
        start_ns: int,
        attributes: Mapping[str, Any],
    ) -> None:
        """A message taken from ``topic`` (e.g. a reply) and handled from ``start_ns`` to now."""

    def batch(self, items: Sequence[Message], group: str) -> BatchTrace:
        """The spans of one consumed batch; use as a context manager around its processing."""
        return _OFF_BATCH

    def shutdown(self) -> None:
        """Export what is buffered (at process exit)."""


OFF = Tracing()
_OFF_BATCH = BatchTrace()
