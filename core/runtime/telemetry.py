"""Traces (OpenTelemetry) for qrsight: off unless the standard ``OTEL_*`` variables ask.

One trace per image: the API's ``POST /api/v1/detect`` span (or the ``qrsight-publish``
send span) → ``send qr.images`` → the worker's ``process qr.images`` span for that image
with its stages (``decode``, ``infer``, ``postprocess``, ``payloads``) and its
``send qr.detections`` / ``send qr.replies`` spans → the API's ``process qr.replies``.
The W3C ``traceparent`` Kafka header carries the context from one process to the next.
A worker batch is also one span of its own (a new trace, as the OpenTelemetry messaging
conventions say for batch consumers) with a *link* to every message's context, and each
image's span links back to its batch.

Turning it on: set ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
or ``OTEL_TRACES_EXPORTER=otlp|console``). Everything else is the SDK's own standard
variables (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``,
``OTEL_BSP_*``, ``OTEL_EXPORTER_OTLP_*``; ``OTEL_SDK_DISABLED=true`` or
``OTEL_TRACES_EXPORTER=none`` turn it off). The exporter speaks OTLP over HTTP/protobuf
(``OTEL_EXPORTER_OTLP_PROTOCOL=grpc`` needs ``opentelemetry-exporter-otlp-proto-grpc``).

Off (the default) costs nothing: the SDK is never imported, :data:`OFF`'s methods do
only what qrsight did before tracing existed (pass a ``traceparent`` on, so logs of every
process still share a trace id), and the pipeline records no stage times
(``bench/tracing_overhead.py`` measures it).

Each entry point calls :func:`setup_tracing` once; the code in between asks
:func:`tracing` for the process's :class:`Tracing`.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from core.runtime.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span as OtelSpan
    from opentelemetry.trace import Tracer

logger = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TRACE_HEADERS = (TRACEPARENT, "tracestate")
MAX_TRACESTATE = 512  # W3C: 32 list members; vendors should propagate at least 512 bytes
TRACEPARENT_RE = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
INVALID_TRACE_ID = "0" * 32

Headers = Sequence[tuple[str, bytes | str | None]]
KafkaHeaders = list[tuple[str, bytes | None]]


# --- the W3C header, with or without the SDK ------------------------------------------------
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


# --- what the pipeline records for the spans ------------------------------------------------
class StageLog:
    """Stage intervals of each job of one ``Pipeline.run``, for the image's spans.

    Times are ``time.perf_counter()`` seconds (what the pipeline measures anyway); one
    wall-clock anchor taken here turns them into span timestamps.
    """

    def __init__(self) -> None:
        self._wall_ns = time.time_ns()
        self._perf = time.perf_counter()
        self.by_job: dict[int, list[tuple[str, float, float, dict[str, Any]]]] = {}

    def add(self, job: object, stage: str, start: float, end: float, **attributes: Any) -> None:
        self.by_job.setdefault(id(job), []).append((stage, start, end, attributes))

    def of(self, job: object) -> list[tuple[str, float, float, dict[str, Any]]]:
        return self.by_job.get(id(job), [])

    def ns(self, perf_s: float) -> int:
        """A ``perf_counter()`` time as epoch nanoseconds."""
        return self._wall_ns + int((perf_s - self._perf) * 1e9)


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


# --- the interface, and "off" --------------------------------------------------------------
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


class _Process:
    """The process's tracing, like OpenTelemetry's global tracer provider."""

    tracing: Tracing = OFF


def tracing() -> Tracing:
    """This process's tracing (:data:`OFF` until :func:`setup_tracing` turned it on)."""
    return _Process.tracing


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether the standard ``OTEL_*`` variables ask for traces."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def setup_tracing(service: str, environ: Mapping[str, str] | None = None) -> Tracing:
    """Turn tracing on for this process if the ``OTEL_*`` variables ask; call once, at start.

    ``service`` is the default ``service.name`` (``OTEL_SERVICE_NAME`` wins). Raises
    :class:`ConfigError` naming the variable when the exporter asked for is unknown.
    """
    env = os.environ if environ is None else environ
    if not wanted(env):
        _Process.tracing = OFF
        return OFF
    exporters = [
        name.strip()
        for name in env.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")
        if name.strip() and name.strip() != "none"
    ]
    _Process.tracing = OFF  # until the exporters are built: a bad setting leaves tracing off
    _Process.tracing = OtelTracing(
        service, [_exporter(name, env) for name in exporters or ["otlp"]]
    )
    logger.info(
        "tracing on service=%s exporters=%s endpoint=%s",
        service,
        ",".join(exporters or ["otlp"]),
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
    )
    return _Process.tracing


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ConfigError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console, none)")
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError as exc:
            raise ConfigError(
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc "
                "(pip install it, or use http/protobuf)"
            ) from exc
        return GrpcExporter()
    if protocol != "http/protobuf":
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported (http/protobuf, grpc)"
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


# --- on: the OpenTelemetry SDK (imported only here) -----------------------------------------
MESSAGING = {"messaging.system": "kafka"}


class _OtelSpan(Span):
    def __init__(self, span: OtelSpan) -> None:
        super().__init__(_traceparent(span))
        self._span = span

    def http_status(self, code: int) -> None:
        self._span.set_attribute("http.response.status_code", code)
        if code >= 500:
            _fail(self._span, str(code))

    def end(self, error: str | None = None) -> None:
        if error is not None:
            _fail(self._span, error)
        self._span.end()


class OtelTracing(Tracing):
    """Tracing on: spans go through a batch processor to ``exporters`` (``simple=True``:
    each span is exported as it ends, for tests and benchmarks)."""

    def __init__(
        self, service: str, exporters: Iterable[SpanExporter] = (), *, simple: bool = False
    ) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": service}))
        if "service.version" not in resource.attributes:
            resource = resource.merge(Resource({"service.version": _version()}))
        self.provider: TracerProvider = TracerProvider(resource=resource)
        for exporter in exporters:
            processor = SimpleSpanProcessor if simple else BatchSpanProcessor
            self.provider.add_span_processor(processor(exporter))
        self.tracer: Tracer = self.provider.get_tracer("qrsight")

    def server(self, name: str, headers: HttpHeaders, attributes: Mapping[str, Any]) -> Span:
        from opentelemetry.trace import SpanKind

        parent = _extract({k: headers.get(k) for k in TRACE_HEADERS})
        return _OtelSpan(
            self.tracer.start_span(
                name, context=parent, kind=SpanKind.SERVER, attributes=dict(attributes)
            )
        )

    def send(self, topic: str, parent: str | None, attributes: Mapping[str, Any]) -> Span:
        from opentelemetry.trace import SpanKind

        span = self.tracer.start_span(
            f"send {topic}",
            context=_extract({TRACEPARENT: parent}),
            kind=SpanKind.PRODUCER,
            attributes={**_send_attributes(topic), **attributes},
        )
        return _OtelSpan(span)

    def received(
        self,
        topic: str,
        headers: Headers | None,
        parent: str | None,
        start_ns: int,
        attributes: Mapping[str, Any],
    ) -> None:
        from opentelemetry.trace import SpanKind

        carrier: Mapping[str, str | None] = _carrier(headers) or {TRACEPARENT: parent}
        span = self.tracer.start_span(
            f"process {topic}",
            context=_extract(carrier),
            kind=SpanKind.CONSUMER,
            attributes={**_process_attributes(topic), **attributes},
            start_time=start_ns,
        )
        span.end()

    def batch(self, items: Sequence[Message], group: str) -> BatchTrace:
        return _OtelBatch(self.tracer, items, group)

    def shutdown(self) -> None:
        self.provider.shutdown()


class _OtelBatch(BatchTrace):
    """A batch span (new trace, links to each message) and one span tree per image."""

    def __init__(self, tracer: Tracer, items: Sequence[Message], group: str) -> None:
        self._log = StageLog()
        self.stages = self._log
        self._tracer = tracer
        self._items = list(items)
        self._group = group
        self._start_ns = time.time_ns()
        self._spans: dict[int, OtelSpan] = {}
        self._sends: list[OtelSpan] = []
        self._first_send_ns: int | None = None

    def __enter__(self) -> BatchTrace:
        from opentelemetry.context import Context
        from opentelemetry.trace import Link, SpanKind, get_current_span

        contexts = [_extract(_carrier(item.headers)) for item in self._items]
        links = [
            Link(get_current_span(ctx).get_span_context(), {"messaging.kafka.offset": item.offset})
            for ctx, item in zip(contexts, self._items, strict=True)
            if get_current_span(ctx).get_span_context().is_valid
        ]
        topic = self._items[0].topic if self._items else ""
        self._batch = self._tracer.start_span(
            f"process {topic}",
            context=Context(),  # a root: the batch mixes images of many traces
            kind=SpanKind.CONSUMER,
            links=links,
            attributes={
                **_process_attributes(topic),
                "messaging.batch.message_count": len(self._items),
                "messaging.consumer.group.name": self._group,
            },
            start_time=self._start_ns,
        )
        to_batch = [Link(self._batch.get_span_context())]
        for ctx, item in zip(contexts, self._items, strict=True):
            self._spans[id(item)] = self._tracer.start_span(
                f"process {item.topic}",
                context=ctx,
                kind=SpanKind.CONSUMER,
                links=to_batch,
                attributes={
                    **_process_attributes(item.topic),
                    "messaging.destination.partition.id": str(item.partition),
                    "messaging.kafka.offset": item.offset,
                    "messaging.consumer.group.name": self._group,
                    "qrsight.request_id": item.request_id,
                },
                start_time=self._start_ns,
            )
        return self

    def headers(self, item: Message, result: Mapping[str, Any], topic: str) -> KafkaHeaders:
        from opentelemetry.trace import SpanKind, set_span_in_context

        parent = self._spans[id(item)]
        _annotate(parent, result)
        send = self._tracer.start_span(
            f"send {topic}",
            context=set_span_in_context(parent),
            kind=SpanKind.PRODUCER,
            attributes={**_send_attributes(topic), "qrsight.request_id": item.request_id},
        )
        self._sends.append(send)
        if self._first_send_ns is None:
            self._first_send_ns = time.time_ns()
        return [(TRACEPARENT, _traceparent(send).encode())]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        end_ns = time.time_ns()
        error = None if exc is None else type(exc).__name__
        for send in self._sends:
            if error:
                _fail(send, error)
            send.end(end_ns)
        for item in self._items:
            self._stage_spans(self._spans[id(item)], self._log.of(item.job) if item.job else [])
        self._batch_stage_spans(end_ns, error)
        for span in [*self._spans.values(), self._batch]:
            if error:
                _fail(span, error)
            span.end(end_ns)

    def _stage_spans(
        self, parent: OtelSpan, stages: Sequence[tuple[str, float, float, dict[str, Any]]]
    ) -> None:
        from opentelemetry.trace import set_span_in_context

        ctx = set_span_in_context(parent)
        for stage, start, end, attributes in stages:
            span = self._tracer.start_span(
                stage, context=ctx, attributes=attributes, start_time=self._log.ns(start)
            )
            span.end(self._log.ns(end))

    def _batch_stage_spans(self, end_ns: int, error: str | None) -> None:
        """The batch's own breakdown: each stage from its first start to its last end."""
        spans: dict[str, tuple[float, float]] = {}
        for entries in self._log.by_job.values():
            for stage, start, end, _ in entries:
                low, high = spans.get(stage, (start, end))
                spans[stage] = (min(low, start), max(high, end))
        self._stage_spans(self._batch, [(s, a, b, {}) for s, (a, b) in spans.items()])
        if self._first_send_ns is not None:
            from opentelemetry.trace import set_span_in_context

            send = self._tracer.start_span(
                "deliver",
                context=set_span_in_context(self._batch),
                attributes={"messaging.batch.message_count": len(self._sends)},
                start_time=self._first_send_ns,
            )
            if error:
                _fail(send, error)
            send.end(end_ns)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qrsight")
    except PackageNotFoundError:
        return "unknown"


def _send_attributes(topic: str) -> dict[str, Any]:
    return {
        **MESSAGING,
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": topic,
    }


def _process_attributes(topic: str) -> dict[str, Any]:
    return {
        **MESSAGING,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": topic,
    }


def _annotate(span: OtelSpan, result: Mapping[str, Any]) -> None:
    status = str(result.get("status") or "")
    span.set_attribute("qrsight.status", status)
    code = (result.get("error") or {}).get("code")
    if code:
        _fail(span, str(code))


def _fail(span: OtelSpan, error: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("error.type", error)
    span.set_status(Status(StatusCode.ERROR, error))


def _carrier(headers: Headers | None) -> dict[str, str]:
    carrier: dict[str, str] = {}
    for name, value in headers or ():
        if value is not None and name in TRACE_HEADERS:
            carrier[name] = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    return carrier


def _extract(carrier: Mapping[str, str | None]) -> Context:
    """The context in W3C headers; an empty context (a new trace) when there is none."""
    from opentelemetry.context import Context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    present = {k: v for k, v in carrier.items() if v}
    return TraceContextTextMapPropagator().extract(present, context=Context())


def _traceparent(span: OtelSpan) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
