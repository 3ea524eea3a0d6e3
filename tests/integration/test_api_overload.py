"""The API when the workers are slow or gone and when its own reply reader dies, on a real
broker: bounded in-flight work, probes that stay fast, a supervised reply reader.

- 80 /detect calls with 30 s timeouts and no detection worker, against one gunicorn worker
  of 80 threads capped at 64 in flight: 64 wait, 16 are refused at once (503 overloaded,
  Retry-After), and /health and /ready answer in well under a second throughout.
- The reply reader thread is killed (an asynchronous SystemExit in that thread): /ready
  turns 503 at once, the supervisor starts a new reader, and a reply produced while no
  reader ran still reaches the request that waits for it.
"""

from __future__ import annotations

import ctypes
import json
import re
import signal
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from confluent_kafka import Consumer, Producer
from flask import Flask

from api import create_app
from api.pace import BODY_GRACE_S, BODY_IDLE_TIMEOUT_S, HEADER_TIMEOUT_S
from api.replies import ReplyClient
from core.runtime.errors import CorruptImageError
from core.runtime.kafka import avro_codec, consumer_config, producer_config
from core.runtime.results import error_record
from core.runtime.settings import Settings
from schemas.names import H_CORRELATION_ID, H_REPLY_PARTITION, decode_partition, header_dict
from tests.integration.api_stack import Stack, make_stack, metric, qr_png

pytestmark = pytest.mark.integration

WAITING = 64
EXTRA = 16
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def no_workers(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = make_stack(
        kafka_bootstrap,
        tmp_path_factory.mktemp("overload"),
        api_workers=1,
        detection_workers=0,
        api_threads=WAITING + EXTRA,
        api_max_in_flight=WAITING,
        api_max_timeout_ms=TIMEOUT_MS,
        rate_limit="off",
    )
    yield stack
    stack.stop()


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def probe_latencies(url: str, until: float) -> dict[str, list[float]]:
    """/health and /ready, each on a fresh connection (as a kubelet probes), until ``until``."""
    seen: dict[str, list[float]] = {"health": [], "ready": []}
    while time.monotonic() < until:
        for name, latencies in seen.items():
            started = time.monotonic()
            response = requests.get(f"{url}/api/v1/{name}", timeout=10)
            latencies.append(time.monotonic() - started)
            assert response.status_code == 200, response.text
        time.sleep(0.05)
    return seen


def test_health_stays_fast_with_64_detect_calls_waiting(no_workers: Stack) -> None:
    image = qr_png("nobody answers")[0]
    url = f"{no_workers.url}/api/v1/detect?timeout_ms={TIMEOUT_MS}"

    def detect(_: int) -> tuple[int, str, float, str | None]:
        started = time.monotonic()
        response = requests.post(
            url, data=image, headers={"Content-Type": "image/png"}, timeout=TIMEOUT_MS / 1000 + 30
        )
        code = response.json()["error"]["code"] if response.status_code != 200 else "ok"
        took = time.monotonic() - started
        return response.status_code, code, took, response.headers.get("Retry-After")

    with ThreadPoolExecutor(WAITING + EXTRA) as pool:
        calls = [pool.submit(detect, i) for i in range(WAITING + EXTRA)]
        deadline = time.monotonic() + 20
        while metric(no_workers.metrics(), "qrsight_api_reply_waiters") < WAITING:
            assert time.monotonic() < deadline, "the 64 calls never all waited"
            time.sleep(0.2)
        probes = probe_latencies(no_workers.url, time.monotonic() + 8)
        assert metric(no_workers.metrics(), "qrsight_api_reply_waiters") == WAITING
        results = [call.result() for call in calls]

    outcomes = Counter((status, code) for status, code, _, _ in results)
    assert outcomes == {(504, "timeout"): WAITING, (503, "overloaded"): EXTRA}
    refused = [r for r in results if r[0] == 503]
    assert all(took < 5 and retry == "1" for _, _, took, retry in refused)
    for name, latencies in probes.items():
        assert len(latencies) >= 20, name
        assert percentile(latencies, 0.99) < 1.0, (name, max(latencies))
        assert statistics.median(latencies) < 0.2, (name, statistics.median(latencies))
    assert metric(no_workers.metrics(), "qrsight_api_reply_waiters") == 0  # none left behind


# --- the reply reader under supervision ---------------------------------------------------
def kill_thread(thread: threading.Thread) -> None:
    """Raise SystemExit inside ``thread`` (it dies at its next Python instruction)."""
    assert thread.ident is not None
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit)
    )
    assert done == 1


def reply_as_a_worker(settings: Settings, error: CorruptImageError) -> str:
    """Take the one request from the images topic and answer it on its reply partition,
    as a detection worker would; returns its correlation id."""
    consumer = Consumer(consumer_config(settings, f"{settings.consumer_group}-fake-worker"))
    consumer.subscribe([settings.topic_images])
    try:
        deadline = time.monotonic() + 30
        while True:
            assert time.monotonic() < deadline, "the request never reached Kafka"
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                break
    finally:
        consumer.close()
    headers = header_dict(msg.headers())  # type: ignore[arg-type]
    rid = headers[H_CORRELATION_ID].decode()
    codec = avro_codec(settings, "DetectionResult")
    producer = Producer(producer_config(settings, "fake-worker"))
    producer.produce(
        settings.topic_replies,
        key=rid.encode(),
        value=codec.encode(error_record(rid, None, error), settings.topic_replies),
        headers=[(H_CORRELATION_ID, rid.encode())],
        partition=decode_partition(headers[H_REPLY_PARTITION]),
    )
    assert producer.flush(10) == 0
    return rid


def wait_for(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def app(kafka_settings: Settings) -> Iterator[Flask]:
    made = create_app(kafka_settings)
    assert made.extensions["qrsight"].replies.wait_ready(30)
    yield made
    made.extensions["qrsight"].replies.close()


def test_a_killed_reply_reader_turns_ready_503_and_is_restarted_without_losing_a_reply(
    app: Flask, kafka_settings: Settings
) -> None:
    replies: ReplyClient = app.extensions["qrsight"].replies
    client = app.test_client()
    assert client.get("/api/v1/ready").status_code == 200
    answer: dict[str, Any] = {}

    def ask() -> None:
        response = app.test_client().post(
            "/api/v1/detect?timeout_ms=30000", data=qr_png("x")[0], content_type="image/png"
        )
        answer["status"], answer["body"] = response.status_code, response.get_json()

    asking = threading.Thread(target=ask)
    asking.start()
    wait_for(lambda: replies.pending() == 1, 10, "the request never waited")
    reader = replies.reader.thread
    assert reader is not None
    kill_thread(reader)
    reader.join(5)
    assert not reader.is_alive()
    ready = client.get("/api/v1/ready")
    assert ready.status_code == 503
    assert "reply reader" in ready.get_json()["error"]["message"]
    refused = client.post("/api/v1/detect", data=qr_png("y")[0], content_type="image/png")
    assert refused.status_code == 503
    # the reply lands while no reader runs; the restarted reader resumes where it stopped
    rid = reply_as_a_worker(kafka_settings, CorruptImageError("a worker says so"))
    asking.join(30)
    assert answer["status"] == 400, answer
    assert answer["body"]["error"] == {
        "code": "corrupt_image",
        "message": "a worker says so",
        "request_id": rid,
    }
    wait_for(lambda: client.get("/api/v1/ready").status_code == 200, 10, "never ready again")
    assert replies.restarts == 1
    assert replies.pending() == 0


def test_a_reader_that_keeps_dying_gives_up_and_stops_the_process(
    kafka_settings: Settings,
) -> None:
    stopped = threading.Event()
    app = create_app(kafka_settings, on_reply_failure=stopped.set)
    replies: ReplyClient = app.extensions["qrsight"].replies
    assert replies.on_give_up is not None
    replies.max_restarts = 1
    try:
        assert replies.wait_ready(30)
        first = replies.reader.thread
        assert first is not None
        kill_thread(first)
        wait_for(lambda: replies.reader.thread not in (None, first), 10, "never restarted")
        second = replies.reader.thread
        assert second is not None
        wait_for(second.is_alive, 10, "no reader running")
        kill_thread(second)
        assert stopped.wait(10), "the process was never told to stop"
        ready = app.test_client().get("/api/v1/ready")
        assert ready.status_code == 503
        assert "cannot serve requests" in ready.get_json()["error"]["message"]
    finally:
        replies.close()


def read_response(sock: socket.socket) -> tuple[str, bytes]:
    """One HTTP/1.1 response with a Content-Length: (head, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, body
        body += chunk
    return head.decode("latin-1"), body


def test_an_upload_that_stops_arriving_gives_its_slot_back(no_workers: Stack) -> None:
    """Slow-loris: headers announce 100 kB, 100 bytes come, then nothing: cut off when the
    100 bytes no longer meet the minimum rate (after the grace), before the longest pause."""
    host, port = no_workers.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=BODY_IDLE_TIMEOUT_S + 20) as sock:
        sock.sendall(
            b"POST /api/v1/detect HTTP/1.1\r\nHost: qrsight\r\nContent-Type: image/png\r\n"
            b"Content-Length: 100000\r\n\r\n" + qr_png("slow")[0][:100]
        )
        time.sleep(1)
        assert metric(no_workers.metrics(), "qrsight_api_detect_in_flight") == 1
        started = time.monotonic()
        head, body = read_response(sock)
        waited = time.monotonic() - started
    assert head.startswith("HTTP/1.1 400"), head
    assert json.loads(body)["error"]["code"] == "bad_request"
    assert BODY_GRACE_S - 3 < waited < BODY_GRACE_S + 2  # the longest pause (10 s) is later
    assert metric(no_workers.metrics(), "qrsight_api_detect_in_flight") == 0


def drip(
    address: tuple[str, int], first: bytes, every_s: float, limit_s: float
) -> tuple[str, float]:
    """Send ``first``, then one byte every ``every_s`` until the server answers or closes
    (at most ``limit_s``): (what it answered, seconds it took after ``first``)."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(first)
        started = time.monotonic()
        sock.settimeout(every_s)
        answer = b""
        while time.monotonic() - started < limit_s:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                try:
                    sock.sendall(b"x")
                except OSError:
                    break
                continue
            if not chunk:
                break
            answer += chunk
        return answer.decode("latin-1"), time.monotonic() - started


def address(stack: Stack) -> tuple[str, int]:
    host, port = stack.url.removeprefix("http://").split(":")
    return host, int(port)


def test_a_body_that_drips_in_is_cut_off_and_gives_its_slot_back(no_workers: Stack) -> None:
    """Slow-drip: one byte every 2 s never trips the longest pause (10 s), but misses the
    minimum rate: 400 soon after the grace, and the in-flight slot is free again."""
    head = (
        b"POST /api/v1/detect HTTP/1.1\r\nHost: qrsight\r\nContent-Type: image/png\r\n"
        b"Content-Length: 100000\r\n\r\n" + qr_png("drip")[0][:100]
    )
    answer, took = drip(address(no_workers), head, every_s=2.0, limit_s=40)
    assert answer.startswith("HTTP/1.1 400"), answer
    assert '"code": "bad_request"' in answer or '"code":"bad_request"' in answer, answer
    assert took < BODY_GRACE_S + 4
    assert metric(no_workers.metrics(), "qrsight_api_detect_in_flight") == 0


def test_headers_that_drip_in_are_cut_off_with_408(no_workers: Stack) -> None:
    """gunicorn reads the headers with no time limit of its own: one header byte every 2 s
    would hold a worker thread for ever. They get HEADER_TIMEOUT_S in all."""
    first = b"GET /api/v1/health HTTP/1.1\r\nHost: qrsight\r\nX-Slow: "
    answer, took = drip(address(no_workers), first, every_s=2.0, limit_s=40)
    assert answer.startswith("HTTP/1.1 408"), answer
    assert "request_timeout" in answer
    assert took < HEADER_TIMEOUT_S + 4
    assert requests.get(f"{no_workers.url}/api/v1/health", timeout=5).status_code == 200


def test_a_reload_keeps_the_last_pods_worker_on_its_partition(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SIGHUP to the master of a one-worker API whose replies topic has one partition (the
    last pod of a StatefulSet): the reload's new worker starts beside the old one and must
    not ask for partition 1, which does not exist (it failed to boot, and gunicorn's
    master gave up with it)."""
    stack = make_stack(
        kafka_bootstrap,
        tmp_path_factory.mktemp("reload"),
        api_workers=1,
        detection_workers=0,
        replies_partitions=1,
        rate_limit="off",
    )
    try:
        assert stack.api is not None
        before = stack.api_worker_pids()
        stack.api.send_signal(signal.SIGHUP)
        wait_for(
            lambda: (pids := stack.api_worker_pids()) != before and len(pids) == 1,
            60,
            "the old worker was never replaced:\n" + stack.api_log.read_text()[-3000:],
        )
        wait_for(
            lambda: requests.get(f"{stack.url}/api/v1/ready", timeout=5).status_code == 200,
            60,
            "the new worker never got ready:\n" + stack.api_log.read_text()[-3000:],
        )
        assert stack.api.poll() is None, stack.api_log.read_text()[-3000:]
        ready = requests.get(f"{stack.url}/api/v1/ready", timeout=5).json()
        assert ready == {"status": "ready", "reply_partition": 0}
        assert "failed to boot" not in stack.api_log.read_text().lower()
    finally:
        stack.stop()
