"""What every SDK span needs: attributes by the messaging conventions,
failure status, W3C extraction. The SDK is imported inside each function, so importing
this module costs nothing while tracing is off."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from core.runtime.results import error_code
from core.runtime.telemetry.context import TRACE_HEADERS, Headers

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span as OtelSpan

MESSAGING = {"messaging.system": "kafka"}


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qrsight")
    except PackageNotFoundError:
        return "unknown"


def send_attributes(topic: str) -> dict[str, Any]:
    return {
        **MESSAGING,
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": topic,
    }


def process_attributes(topic: str) -> dict[str, Any]:
    return {
        **MESSAGING,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": topic,
    }


def annotate(span: OtelSpan, result: Mapping[str, Any]) -> None:
    status = str(result.get("status") or "")
    span.set_attribute("qrsight.status", status)
    code = error_code(result)
    if code:
        fail(span, str(code))


def fail(span: OtelSpan, error: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("error.type", error)
    span.set_status(Status(StatusCode.ERROR, error))


def carrier_of(headers: Headers | None) -> dict[str, str]:
    carrier: dict[str, str] = {}
    for name, value in headers or ():
        if value is not None and name in TRACE_HEADERS:
            carrier[name] = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    return carrier


def extract(carrier: Mapping[str, str | None]) -> Context:
    """The context in W3C headers; an empty context (a new trace) when there is none."""
    from opentelemetry.context import Context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    present = {k: v for k, v in carrier.items() if v}
    return TraceContextTextMapPropagator().extract(present, context=Context())


def traceparent_of(span: OtelSpan) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
