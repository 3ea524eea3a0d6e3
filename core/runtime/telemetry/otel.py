"""Tracing on: :class:`OtelTracing`, the OpenTelemetry SDK behind the
:class:`~core.runtime.telemetry.base.Tracing` interface (the SDK is imported only when
one is built)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from core.runtime.telemetry.base import BatchTrace, HttpHeaders, Message, Span, Tracing
from core.runtime.telemetry.batch import OtelBatch
from core.runtime.telemetry.context import TRACE_HEADERS, TRACEPARENT, Headers
from core.runtime.telemetry.sdk import (
    carrier_of,
    extract,
    fail,
    package_version,
    process_attributes,
    send_attributes,
    traceparent_of,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span as OtelSpan
    from opentelemetry.trace import Tracer


class _OtelSpan(Span):
    def __init__(self, span: OtelSpan) -> None:
        super().__init__(traceparent_of(span))
        self._span = span

    def http_status(self, code: int) -> None:
        self._span.set_attribute("http.response.status_code", code)
        if code >= 500:
            fail(self._span, str(code))

    def end(self, error: str | None = None) -> None:
        if error is not None:
            fail(self._span, error)
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
            resource = resource.merge(Resource({"service.version": package_version()}))
        self.provider: TracerProvider = TracerProvider(resource=resource)
        for exporter in exporters:
            processor = SimpleSpanProcessor if simple else BatchSpanProcessor
            self.provider.add_span_processor(processor(exporter))
        self.tracer: Tracer = self.provider.get_tracer("qrsight")

    def server(self, name: str, headers: HttpHeaders, attributes: Mapping[str, Any]) -> Span:
        from opentelemetry.trace import SpanKind

        parent = extract({k: headers.get(k) for k in TRACE_HEADERS})
        return _OtelSpan(
            self.tracer.start_span(
                name, context=parent, kind=SpanKind.SERVER, attributes=dict(attributes)
            )
        )

    def send(self, topic: str, parent: str | None, attributes: Mapping[str, Any]) -> Span:
        from opentelemetry.trace import SpanKind

        span = self.tracer.start_span(
            f"send {topic}",
            context=extract({TRACEPARENT: parent}),
            kind=SpanKind.PRODUCER,
            attributes={**send_attributes(topic), **attributes},
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

        carrier: Mapping[str, str | None] = carrier_of(headers) or {TRACEPARENT: parent}
        span = self.tracer.start_span(
            f"process {topic}",
            context=extract(carrier),
            kind=SpanKind.CONSUMER,
            attributes={**process_attributes(topic), **attributes},
            start_time=start_ns,
        )
        span.end()

    def batch(self, items: Sequence[Message], group: str) -> BatchTrace:
        return OtelBatch(self.tracer, items, group)

    def shutdown(self) -> None:
        self.provider.shutdown()
