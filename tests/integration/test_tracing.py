"""Traces and logs end to end: a real OpenTelemetry Collector (built with ocb by
``deploy/local/otelcol/build.sh``; OTLP/HTTP in, OTLP JSON lines out to a file), a real
broker, a detection worker (``python -m consumer.cli``) and the API under gunicorn
(``python -m api.cli``), with tracing turned on by the standard ``OTEL_*`` variables only.

One stack serves every test here: JSON logs at DEBUG, JWT auth on and the secret
settings set, so the log checks read every line these processes wrote.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from confluent_kafka import Producer

from core.runtime.kafka import producer_config
from core.runtime.settings import DEFAULT_MODEL
from producer_tools.topics import create_topics
from tests.integration.api_stack import Stack, qr_png, settings_env, start, wait_ready
from tests.integration.kafka_topics import fresh_settings

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "deploy" / "local" / "otelcol" / "build.sh"
BUILD_TIMEOUT_S = 900  # a cold build fetches the collector's modules first
SPAN_WAIT_S = 60
SERVER, PRODUCER, CONSUMER = 2, 4, 5  # OTLP span kinds
STAGES = {"decode", "infer", "postprocess", "payloads"}
JWT_SECRET = "trace-test-jwt-secret-" + "x" * 24
SECRET_ENV = {
    "QRSIGHT_KAFKA_SASL_PASSWORD": "sasl-password-never-logged-31337",
    "QRSIGHT_KAFKA__SSL_KEY_PASSWORD": "ssl-key-password-never-logged-4242",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the collector ------------------------------------------------------------------------
@dataclass
class Collector:
    endpoint: str
    spans_file: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def spans(self) -> list[dict[str, Any]]:
        """Every span received so far, with its resource's ``service.name``."""
        found = []
        text = self.spans_file.read_text() if self.spans_file.exists() else ""
        # only whole lines: the collector may be half-way through writing the last one
        for line in text[: text.rfind("\n") + 1].splitlines():
            if not line.strip():
                continue
            for resource_spans in json.loads(line).get("resourceSpans", []):
                service = attribute(resource_spans["resource"], "service.name")
                for scope in resource_spans.get("scopeSpans", []):
                    found.extend({**span, "service": service} for span in scope.get("spans", []))
        return found

    def wait_for(self, what: str, check: Any) -> list[dict[str, Any]]:
        """Spans, once ``check(spans)`` holds (the processes export every 100 ms)."""
        deadline = time.monotonic() + SPAN_WAIT_S
        while time.monotonic() < deadline:
            spans = self.spans()
            if check(spans):
                return spans
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.3)
        raise AssertionError(f"the collector never got {what}; it has {len(self.spans())} spans")


def attribute(holder: dict[str, Any], key: str) -> Any:
    """An attribute's value (OTLP JSON writes 64-bit ints as strings)."""
    for item in holder.get("attributes", []):
        if item["key"] == key:
            value = item["value"]
            return int(value["intValue"]) if "intValue" in value else next(iter(value.values()))
    return None


def collector_binary() -> Path:
    built = subprocess.run(
        [str(BUILD)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
    )
    if built.returncode != 0:
        pytest.fail(f"{BUILD} failed:\n{built.stderr[-3000:]}", pytrace=False)
    return Path(built.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collector]:
    binary = collector_binary()
    tmp = tmp_path_factory.mktemp("otelcol")
    port = free_port()
    spans_file = tmp / "spans.jsonl"
    config = tmp / "config.yaml"
    config.write_text(
        f"""
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{port}
exporters:
  file:
    path: {spans_file}
    flush_interval: 100ms
service:
  telemetry:
    metrics:
      level: none
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [file]
"""
    )
    log = tmp / "collector.log"
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [str(binary), "--config", str(config)], stdout=handle, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while "Everything is ready" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield Collector(f"http://127.0.0.1:{port}", spans_file, proc, log)
    finally:
        proc.terminate()
        proc.wait(20)


# --- the stack ------------------------------------------------------------------------------
@dataclass
class Traced:
    stack: Stack
    collector: Collector
    env: dict[str, str]
    worker_log: Path


@pytest.fixture(scope="module")
def traced(
    kafka_bootstrap: str, collector: Collector, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Traced]:
    if not DEFAULT_MODEL.is_file():
        pytest.fail(f"the shipped model {DEFAULT_MODEL} is missing", pytrace=False)
    tmp = tmp_path_factory.mktemp("traced")
    uid = uuid.uuid4().hex[:8]
    settings = fresh_settings(
        kafka_bootstrap,
        uid,
        topic_partitions=1,
        api_host="127.0.0.1",
        api_port=free_port(),
        api_workers=1,
        api_threads=8,
        metrics_port=free_port(),
        ort_intra_threads=1,
        max_batch=4,
        rate_limit="off",
        auth_enabled=True,
        auth_jwt_secret=JWT_SECRET,
        log_format="json",
        log_level="DEBUG",
    )
    create_topics(settings)
    env = {
        **settings_env(settings),
        **SECRET_ENV,
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    worker_log = tmp / "workers.log"
    procs = [start([sys.executable, "-m", "consumer.cli", "--workers", "1"], env, worker_log)]
    api_log = tmp / "api.log"
    api_env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(tmp / "metrics")}
    procs.append(start([sys.executable, "-m", "api.cli"], api_env, api_log))
    stack = Stack(f"http://127.0.0.1:{settings.api_port}", settings, True, procs, api_log)
    try:
        wait_ready(stack, 1)
        warm_up(stack)
        yield Traced(stack, collector, env, worker_log)
    finally:
        stack.stop()


def auth() -> dict[str, str]:
    token = jwt.encode({"sub": "trace-test", "exp": int(time.time()) + 600}, JWT_SECRET)
    return {"Authorization": f"Bearer {token}"}


def warm_up(stack: Stack) -> None:
    """One round trip, so the worker has loaded its model and joined its group."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        response = requests.post(
            f"{stack.url}/api/v1/detect?timeout_ms=30000",
            data=qr_png("warm-up")[0],
            headers={"Content-Type": "image/png", **auth()},
            timeout=40,
        )
        if response.status_code == 200:
            return
        assert response.status_code == 504, response.text
    raise AssertionError("no detection answer in time")


def detect_with_trace(traced: Traced, text: str) -> tuple[str, str, str]:
    """POST an image with a caller's ``traceparent``; (trace id, caller span id, request id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    response = requests.post(
        f"{traced.stack.url}/api/v1/detect",
        data=qr_png(text)[0],
        headers={
            "Content-Type": "image/png",
            "traceparent": f"00-{trace_id}-{span_id}-01",
            **auth(),
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert [r["text"] for r in response.json()["results"]] == [text]
    return trace_id, span_id, response.json()["request_id"]


def one(spans: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [s for s in spans if all(s.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, [(s["service"], s["name"]) for s in spans])
    return found[0]


def children(spans: list[dict[str, Any]], parent: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in spans if s.get("parentSpanId") == parent["spanId"]]


# --- traces ---------------------------------------------------------------------------------
def test_one_request_is_one_trace_through_api_kafka_worker_and_reply(traced: Traced) -> None:
    settings = traced.stack.settings
    images, replies = settings.topic_images, settings.topic_replies
    trace_id, caller_span, _ = detect_with_trace(traced, "https://example.com/traced/1")

    def complete(spans: list[dict[str, Any]]) -> bool:
        mine = [s for s in spans if s["traceId"] == trace_id]
        names = {(s["service"], s["name"]) for s in mine}
        return {("qrsight-api", "POST /api/v1/detect"), ("qrsight-api", f"process {replies}")} <= (
            names
        ) and len(mine) >= 10

    spans = [
        s for s in traced.collector.wait_for("the trace", complete) if s["traceId"] == trace_id
    ]
    # the API: its server span continues the caller's span, then sends to qr.images
    server = one(spans, service="qrsight-api", name="POST /api/v1/detect")
    assert server["kind"] == SERVER and server["parentSpanId"] == caller_span
    assert attribute(server, "http.response.status_code") == 200
    send = one(spans, service="qrsight-api", name=f"send {images}")
    assert send["kind"] == PRODUCER and send["parentSpanId"] == server["spanId"]
    # the worker: this image's span is a child of the message the API sent
    process = one(spans, service="qrsight-worker", name=f"process {images}")
    assert process["kind"] == CONSUMER and process["parentSpanId"] == send["spanId"]
    below = {s["name"]: s for s in children(spans, process)}
    assert set(below) == STAGES | {f"send {settings.topic_detections}", f"send {replies}"}
    for stage in STAGES:
        assert process["startTimeUnixNano"] <= below[stage]["startTimeUnixNano"]
        assert below[stage]["endTimeUnixNano"] <= process["endTimeUnixNano"]
    assert below[f"send {replies}"]["kind"] == PRODUCER
    # back through qr.replies: the API's reply span continues the worker's send span
    reply = one(spans, service="qrsight-api", name=f"process {replies}")
    assert reply["kind"] == CONSUMER
    assert reply["parentSpanId"] == below[f"send {replies}"]["spanId"]
    assert server["startTimeUnixNano"] < send["startTimeUnixNano"]
    assert reply["endTimeUnixNano"] <= server["endTimeUnixNano"]
    # the batch: a trace of its own, linked to the message; the image's span links back
    (link,) = process["links"]
    batch = next(s for s in traced.collector.spans() if s["spanId"] == link["spanId"])
    assert batch["traceId"] != trace_id and not batch.get("parentSpanId")
    assert attribute(batch, "messaging.batch.message_count") >= 1
    assert {"traceId": trace_id, "spanId": send["spanId"]} in [
        {"traceId": lk["traceId"], "spanId": lk["spanId"]} for lk in batch["links"]
    ]


def test_qrsight_publish_starts_one_trace_per_image(traced: Traced) -> None:
    samples = [REPO / "samples" / "ticket.jpg", REPO / "samples" / "no-code.jpg"]
    done = subprocess.run(
        [sys.executable, "-m", "producer_tools.publish", *map(str, samples), "--wait", "--quiet"],
        cwd=REPO,
        env=traced.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["status"] for r in results] == ["OK", "OK"]
    images = traced.stack.settings.topic_images

    def roots(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            s
            for s in spans
            if s["service"] == "qrsight-publish"
            and s["name"] == f"send {images}"
            and not s.get("parentSpanId")
        ]

    spans = traced.collector.wait_for("the tool's traces", lambda s: len(roots(s)) >= 2)
    sent = roots(spans)
    assert len({s["traceId"] for s in sent}) == 2, "one trace per image"
    for root in sent:
        trace = [s for s in spans if s["traceId"] == root["traceId"]]
        process = one(trace, service="qrsight-worker", name=f"process {images}")
        assert process["parentSpanId"] == root["spanId"]
        assert {s["name"] for s in children(trace, process)} >= STAGES


# --- logs -----------------------------------------------------------------------------------
def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every whole line a process wrote, each parsed as JSON (a line that is not fails
    here)."""
    lines = []
    text = path.read_text()
    whole = text[: text.rfind("\n") + 1]  # the process may be writing the last one
    for number, line in enumerate(whole.splitlines(), 1):
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"{path.name}:{number} is not JSON: {line[:300]}", pytrace=False)
    return lines


def test_api_lines_about_a_request_carry_its_request_and_trace_ids(traced: Traced) -> None:
    trace_id, _, request_id = detect_with_trace(traced, "https://example.com/logged")
    deadline = time.monotonic() + 10
    while True:
        lines = json_lines(traced.stack.api_log)
        mine = [line for line in lines if line.get("request_id") == request_id]
        loggers = {line["logger"] for line in mine}
        if {"gunicorn.access", "api.app"} <= loggers or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {"gunicorn.access", "api.app", "api.detect"} <= loggers, mine
    assert all(line["trace_id"] == trace_id for line in mine), mine
    assert {line["logger"] for line in lines} >= {"gunicorn.error", "api.replies"}
    for line in lines:
        assert {"ts", "level", "logger", "pid", "message"} <= set(line), line


def test_worker_lines_about_a_request_carry_its_request_and_trace_ids(traced: Traced) -> None:
    settings = traced.stack.settings
    trace_id, request_id = secrets.token_hex(16), f"not-an-image-{uuid.uuid4().hex[:6]}"
    producer = Producer(producer_config(settings, "test"))
    producer.produce(
        settings.topic_images,
        value=b"this is not an image",
        key=request_id.encode(),
        headers=[
            ("correlation_id", request_id.encode()),
            ("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01".encode()),
        ],
    )
    assert producer.flush(10) == 0
    deadline = time.monotonic() + 30
    mine: list[dict[str, Any]] = []
    while not mine and time.monotonic() < deadline:
        mine = [
            line for line in json_lines(traced.worker_log) if line.get("request_id") == request_id
        ]
        time.sleep(0.3)
    assert mine, "the worker logged nothing about the bad message"
    assert all(line["trace_id"] == trace_id for line in mine), mine
    assert any(line["message"].startswith("bad input") for line in mine), mine


def test_no_secret_reaches_any_log(traced: Traced) -> None:
    refused = requests.post(
        f"{traced.stack.url}/api/v1/detect",
        data=qr_png("no token")[0],
        headers={"Content-Type": "image/png", "Authorization": f"Bearer {JWT_SECRET}"},
        timeout=30,
    )
    assert refused.status_code == 401  # the secret was loaded, and is in use
    time.sleep(0.5)
    text = traced.stack.api_log.read_text() + traced.worker_log.read_text()
    assert len(text.splitlines()) > 50, "DEBUG logs of both processes"
    for value in [JWT_SECRET, *SECRET_ENV.values()]:
        assert value not in text, f"a secret setting's value is in the logs: {value[:8]}…"
