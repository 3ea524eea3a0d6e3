"""core.runtime.telemetry: off by default and free; on, the span tree of a batch as the messaging
conventions say (the end-to-end trace through Kafka and a real collector is
tests/integration/test_tracing.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, StatusCode

from core.runtime import telemetry
from core.runtime.errors import ConfigError
from core.runtime.settings import load_settings
from core.runtime.telemetry import OFF, OtelTracing, StageLog, child_traceparent, parse_traceparent
from core.vision.pipeline import ImageJob, Pipeline
from tests.unit.onnx_models import make_dark_cell_model

REPO = Path(__file__).resolve().parents[2]
TRACE_A = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACE_B = "0af7651916cd43dd8448eb211c80319c"
SPAN_A = "00f067aa0ba902b7"
SPAN_B = "b7ad6b7169203331"


@dataclass
class Msg:
    """What the worker's intake gives a batch (``consumer.intake.Intake`` has these)."""

    request_id: str
    offset: int
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)
    topic: str = "qr.images"
    partition: int = 0
    job: object | None = None


def tp(trace: str, span: str, flags: str = "01") -> bytes:
    return f"00-{trace}-{span}-{flags}".encode()


@pytest.fixture
def exported() -> tuple[OtelTracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return OtelTracing("qrsight-test", [exporter], simple=True), exporter


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def ids(span: ReadableSpan | SpanContext) -> tuple[str, str]:
    ctx = span if isinstance(span, SpanContext) else span.get_span_context()
    assert ctx is not None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def parent_id(span: ReadableSpan) -> str | None:
    return None if span.parent is None else f"{span.parent.span_id:016x}"


# --- switched by the standard variables ------------------------------------------------------
@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
    ],
)
def test_tracing_is_on_only_when_the_otel_variables_ask(env: dict[str, str], on: bool) -> None:
    assert telemetry.wanted(env) is on


def test_off_never_imports_the_sdk() -> None:
    """The adapters' modules and an off setup load no OpenTelemetry code at all."""
    code = (
        "import sys, core.runtime.telemetry as t, core.vision.pipeline, consumer.worker, api.app, "
        "producer_tools.publish\n"
        "assert t.setup_tracing('x', {}) is t.OFF\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
    ],
)
def test_an_unknown_exporter_names_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        telemetry.setup_tracing("x", env)
    assert telemetry.tracing() is OFF


# --- the header ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (tp(TRACE_A, SPAN_A).decode(), (TRACE_A, SPAN_A, "01")),
        (tp(TRACE_A, SPAN_A, "00"), (TRACE_A, SPAN_A, "00")),
        (f"  00-{TRACE_A.upper()}-{SPAN_A}-01 ", (TRACE_A, SPAN_A, "01")),
        (f"ff-{TRACE_A}-{SPAN_A}-01", None),
        (f"00-{'0' * 32}-{SPAN_A}-01", None),
        (f"00-{TRACE_A}-{'0' * 16}-01", None),
        ("00-abc-def-01", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_traceparent(value: str | bytes | None, parsed: tuple[str, ...] | None) -> None:
    assert parse_traceparent(value) == parsed


def test_child_traceparent_keeps_the_trace_and_its_sampling_flag() -> None:
    out = parse_traceparent(child_traceparent(tp(TRACE_A, SPAN_A, "00")))
    assert out is not None and out[0] == TRACE_A and out[1] != SPAN_A and out[2] == "00"


# --- off -----------------------------------------------------------------------------------
def test_off_passes_the_callers_trace_on() -> None:
    server = OFF.server("POST /api/v1/detect", {"traceparent": tp(TRACE_A, SPAN_A).decode()}, {})
    assert server.trace_id == TRACE_A
    send = OFF.send("qr.images", server.traceparent, {})
    assert send.trace_id == TRACE_A and send.traceparent != server.traceparent
    fresh = OFF.server("GET /", {}, {})
    assert parse_traceparent(fresh.traceparent) is not None and fresh.trace_id != TRACE_A


def test_off_batch_passes_trace_headers_through_and_records_no_stages() -> None:
    item = Msg("r1", 1, [("traceparent", tp(TRACE_A, SPAN_A)), ("tracestate", b"k=v"), ("x", b"1")])
    with OFF.batch([item], "g") as batch:
        assert batch.stages is None
        out = batch.headers(item, {"status": "OK"}, "qr.replies")
    assert out == [("traceparent", tp(TRACE_A, SPAN_A)), ("tracestate", b"k=v")]


# --- on ------------------------------------------------------------------------------------
def test_server_and_send_spans_continue_the_callers_trace(
    exported: tuple[OtelTracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = exported
    server = tracing.server(
        "POST /api/v1/detect", {"traceparent": tp(TRACE_A, SPAN_A).decode()}, {"http.route": "/x"}
    )
    send = tracing.send("qr.images", server.traceparent, {"qrsight.request_id": "r1"})
    send.end()
    reply_headers = [("traceparent", tp(TRACE_A, SPAN_B))]
    tracing.received("qr.replies", reply_headers, server.traceparent, time.time_ns(), {})
    server.http_status(504)
    server.end()
    spans = exporter.get_finished_spans()
    (srv,) = by_name(spans, "POST /api/v1/detect")
    (snd,) = by_name(spans, "send qr.images")
    (rcv,) = by_name(spans, "process qr.replies")
    assert ids(srv)[0] == ids(snd)[0] == ids(rcv)[0] == TRACE_A == server.trace_id
    assert parent_id(srv) == SPAN_A and srv.kind == SpanKind.SERVER
    assert parent_id(snd) == ids(srv)[1] and snd.kind == SpanKind.PRODUCER
    assert parse_traceparent(send.traceparent) == (TRACE_A, ids(snd)[1], "01")
    assert parent_id(rcv) == SPAN_B and rcv.kind == SpanKind.CONSUMER
    assert srv.status.status_code == StatusCode.ERROR
    assert srv.attributes is not None and srv.attributes["http.response.status_code"] == 504
    assert (
        snd.attributes is not None and snd.attributes["messaging.destination.name"] == "qr.images"
    )


def test_a_send_without_a_parent_starts_a_trace(
    exported: tuple[OtelTracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = exported
    tracing.send("qr.images", None, {}).end("kafka_unavailable")
    (span,) = exporter.get_finished_spans()
    assert span.parent is None
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes is not None and span.attributes["error.type"] == "kafka_unavailable"


def batch_spans(
    tracing: OtelTracing, items: list[Msg], results: list[dict[str, Any]]
) -> dict[str, list[tuple[str, bytes | None]]]:
    """Run a batch the way the worker does; the headers each result record got, by request id."""
    out: dict[str, list[tuple[str, bytes | None]]] = {}
    with tracing.batch(items, "qrsight-workers") as batch:
        assert batch.stages is not None
        now = time.perf_counter()
        for item in items:
            if item.job is not None:
                batch.stages.add(item.job, "decode", now, now + 0.001)
                batch.stages.add(item.job, "infer", now + 0.001, now + 0.005, images=2)
        for item, result in zip(items, results, strict=True):
            out[item.request_id] = batch.headers(item, result, "qr.replies")
    return out


def test_a_batch_is_a_linked_root_and_each_image_stays_in_its_own_trace(
    exported: tuple[OtelTracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = exported
    items = [
        Msg("a", 10, [("traceparent", tp(TRACE_A, SPAN_A))], job=object()),
        Msg("b", 11, [("traceparent", tp(TRACE_B, SPAN_B))], job=object()),
        Msg("c", 12, [], job=None),
    ]
    results = [
        {"status": "OK"},
        {"status": "OK"},
        {"status": "ERROR", "error": {"code": "bad_message"}},
    ]
    headers = batch_spans(tracing, items, results)
    spans = exporter.get_finished_spans()
    processes = by_name(spans, "process qr.images")
    (batch,) = [
        s for s in processes if s.attributes and "messaging.batch.message_count" in s.attributes
    ]
    assert batch.parent is None and batch.kind == SpanKind.CONSUMER
    assert batch.attributes is not None and batch.attributes["messaging.batch.message_count"] == 3
    linked = {
        (f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}") for link in batch.links
    }
    assert linked == {(TRACE_A, SPAN_A), (TRACE_B, SPAN_B)}
    per_image = {
        s.attributes["qrsight.request_id"]: s for s in processes if s is not batch and s.attributes
    }
    assert ids(per_image["a"])[0] == TRACE_A and parent_id(per_image["a"]) == SPAN_A
    assert ids(per_image["b"])[0] == TRACE_B and parent_id(per_image["b"]) == SPAN_B
    assert per_image["c"].parent is None and ids(per_image["c"])[0] != ids(batch)[0]
    for span in per_image.values():
        assert [ids(link.context) for link in span.links] == [ids(batch)]
    assert per_image["c"].status.status_code == StatusCode.ERROR
    for rid in ("a", "b"):
        stages = [s for s in spans if parent_id(s) == ids(per_image[rid])[1]]
        assert sorted(s.name for s in stages) == ["decode", "infer", "send qr.replies"]
        (send,) = by_name(tuple(stages), "send qr.replies")
        assert send.kind == SpanKind.PRODUCER
        ((name, value),) = headers[rid]
        assert name == "traceparent" and parse_traceparent(value)[:2] == ids(send)  # type: ignore[index]
    batch_children = sorted(s.name for s in spans if parent_id(s) == ids(batch)[1])
    assert batch_children == ["decode", "deliver", "infer"]


def test_a_failed_batch_marks_its_spans_failed(
    exported: tuple[OtelTracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = exported
    item = Msg("a", 1, [("traceparent", tp(TRACE_A, SPAN_A))])
    with pytest.raises(RuntimeError), tracing.batch([item], "g") as batch:
        batch.headers(item, {"status": "OK"}, "qr.detections")
        raise RuntimeError("broker down")
    spans = exporter.get_finished_spans()
    assert sorted(s.name for s in spans) == [
        "deliver", "process qr.images", "process qr.images", "send qr.detections"
    ]  # fmt: skip
    assert all(s.status.status_code == StatusCode.ERROR for s in spans)


# --- the pipeline records each image's stages --------------------------------------------------
def test_pipeline_records_the_stages_of_each_job(tmp_path: Path) -> None:
    model = make_dark_cell_model(tmp_path / "dark.onnx")
    settings = load_settings({}, model_path=model, max_image_side=1000, decode_payloads=False)
    image = np.full((320, 320, 3), 255, np.uint8)
    image[64:128, 64:128] = 0
    ok, png = cv2.imencode(".png", image)
    assert ok
    good, bad = ImageJob("good", png.tobytes()), ImageJob("bad", b"not an image")
    stages = StageLog()
    with Pipeline(settings) as pipeline:
        results = pipeline.run([good, bad], stages)
    assert [r["status"] for r in results] == ["OK", "ERROR"]
    names = [name for name, *_ in stages.of(good)]
    assert names == ["decode", "infer", "postprocess", "payloads"]
    assert [name for name, *_ in stages.of(bad)] == ["decode"]
    for _, start, end, _ in stages.of(good):
        assert start <= end
    (infer,) = [s for s in stages.of(good) if s[0] == "infer"]
    timing_ms = results[0]["timings"]["infer_ms"]
    assert (infer[2] - infer[1]) * 1000 == pytest.approx(timing_ms, abs=0.01)
    assert abs(stages.ns(time.perf_counter()) - time.time_ns()) < 50_000_000
