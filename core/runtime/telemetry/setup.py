"""Turning tracing on for a process from the standard ``OTEL_*`` variables, and the
process's :class:`~core.runtime.telemetry.base.Tracing` (like OpenTelemetry's global
tracer provider)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from core.runtime.errors import ConfigError
from core.runtime.telemetry.base import OFF, Tracing
from core.runtime.telemetry.otel import OtelTracing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

logger = logging.getLogger(__name__)


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
