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

The package keeps its concerns apart: :mod:`~core.runtime.telemetry.context` (the W3C
header, all that "off" needs), :mod:`~core.runtime.telemetry.stages` (stage times of a
pipeline run), :mod:`~core.runtime.telemetry.base` (the interface and :data:`OFF`),
:mod:`~core.runtime.telemetry.setup` (the ``OTEL_*`` variables and the exporters),
:mod:`~core.runtime.telemetry.otel` and :mod:`~core.runtime.telemetry.batch` (the SDK
behind the interface). Callers import from here.
"""

from __future__ import annotations

from core.runtime.telemetry.base import OFF, BatchTrace, HttpHeaders, Message, Span, Tracing
from core.runtime.telemetry.context import (
    INVALID_TRACE_ID,
    MAX_TRACESTATE,
    TRACE_HEADERS,
    TRACEPARENT,
    Headers,
    KafkaHeaders,
    child_traceparent,
    header_traceparent,
    parse_traceparent,
    trace_headers,
    trace_id_of,
)
from core.runtime.telemetry.otel import OtelTracing
from core.runtime.telemetry.setup import setup_tracing, tracing, wanted
from core.runtime.telemetry.stages import StageLog

__all__ = [
    "INVALID_TRACE_ID",
    "MAX_TRACESTATE",
    "OFF",
    "TRACEPARENT",
    "TRACE_HEADERS",
    "BatchTrace",
    "Headers",
    "HttpHeaders",
    "KafkaHeaders",
    "Message",
    "OtelTracing",
    "Span",
    "StageLog",
    "Tracing",
    "child_traceparent",
    "header_traceparent",
    "parse_traceparent",
    "setup_tracing",
    "trace_headers",
    "trace_id_of",
    "tracing",
    "wanted",
]
