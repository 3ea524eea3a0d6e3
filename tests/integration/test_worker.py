"""The detection workers on a real broker: nothing lost, bad input isolated, clean stops.

Workers run in-process (a thread) where that is simpler and as real processes
(``python -m consumer.cli``) wherever signals, crashes and restarts are the point.
The model is a tiny image-dependent ONNX graph (tests/unit/onnx_models.py), so the
boxes differ per image and can be compared with ``core.vision.pipeline.Pipeline``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)
from pydantic import SecretStr

from consumer.journal import CrashJournal
from consumer.worker import Worker
from core.runtime.busy import SLOTS, board_path
from core.runtime.errors import ModelError
from core.runtime.kafka import admin_config, consumer_config, producer_config
from core.runtime.results import error_code, now_ms
from core.runtime.results import image_request as request_record
from core.runtime.settings import DEFAULT_MODEL, REPO_ROOT, Settings
from core.vision.pipeline import ImageJob, Pipeline
from schemas import names
from schemas.codec import Codec
from tests.unit.onnx_models import make_dark_cell_model

pytestmark = pytest.mark.integration

STOP_BOUND_S = 10.0
RESULT_TIMEOUT_S = 60.0

Result = dict[str, Any]
Outgoing = tuple[str, bytes | None, list[tuple[str, bytes]]]


# --- inputs ----------------------------------------------------------------------------------
def jpeg(seed: int, size: tuple[int, int] = (120, 160)) -> bytes:
    """A small white JPEG with one or two dark squares placed by ``seed``."""
    rng = np.random.default_rng(seed)
    h, w = size
    img = np.full((h, w, 3), 255, np.uint8)
    for _ in range(int(rng.integers(1, 3))):
        side = int(rng.integers(24, 60))
        x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
        img[y : y + side, x : x + side] = int(rng.integers(0, 40))
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def png(width: int, height: int) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((height, width, 3), 200, np.uint8))
    assert ok
    return buf.tobytes()


def image_request(settings: Settings, request_id: str, image: bytes, **extra: Any) -> bytes:
    record = request_record(
        request_id,
        image,
        source=extra.get("source"),
        content_type=extra.get("content_type", ""),
    )
    return Codec("ImageRequest").encode(record, settings.topic_images)


def good_stream(settings: Settings, count: int, prefix: str) -> list[Outgoing]:
    """``count`` good requests: even ones as raw JPEG bytes, odd ones as Avro ImageRequests."""
    out: list[Outgoing] = []
    for i in range(count):
        rid = f"{prefix}-{i}"
        data = jpeg(i)
        if i % 2:
            out.append((rid, image_request(settings, rid, data), []))
        else:
            out.append((rid, data, [(names.H_CORRELATION_ID, rid.encode())]))
    return out


# --- Kafka helpers -------------------------------------------------------------------------
def publish(
    settings: Settings, messages: list[Outgoing], pace_s: float = 0.0
) -> dict[str, tuple[int, int]]:
    """Publish; returns request id → (partition, offset) from the delivery reports."""
    where: dict[str, tuple[int, int]] = {}
    producer = Producer(producer_config(settings, role="test"))
    for rid, value, headers in messages:

        def done(err: Any, msg: Any, rid: str = rid) -> None:
            assert err is None, (rid, err)
            where[rid] = (msg.partition(), msg.offset())

        producer.produce(
            settings.topic_images, key=rid.encode(), value=value, headers=headers, on_delivery=done
        )
        producer.poll(0)
        if pace_s:
            time.sleep(pace_s)
    assert producer.flush(60) == 0
    return where


def _reader(settings: Settings, topic: str, partitions: int) -> Consumer:
    conf = consumer_config(
        settings,
        f"test-reader-{uuid.uuid4().hex[:8]}",
        role="test-reader",
        **{"enable.auto.commit": False, "isolation.level": "read_committed"},
    )
    reader = Consumer(conf)
    reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    return reader


def read_topic(
    settings: Settings,
    topic: str,
    expected: set[str],
    *,
    partitions: int | None = None,
    timeout_s: float = RESULT_TIMEOUT_S,
    linger_s: float = 1.0,
) -> list[tuple[Any, Result | None]]:
    """Messages of ``topic`` until every expected key is seen (plus ``linger_s`` for extras)."""
    codec = Codec("DetectionResult")
    reader = _reader(settings, topic, partitions or settings.topic_partitions)
    seen: list[tuple[Any, Result | None]] = []
    keys: set[str] = set()
    deadline = time.monotonic() + timeout_s
    done_at: float | None = time.monotonic() + linger_s if not expected else None
    try:
        while time.monotonic() < (done_at or deadline):
            msg = reader.poll(0.2)
            if msg is None or msg.error():
                continue
            decoded = None if topic == settings.topic_dlq else codec.decode(msg.value(), topic)
            seen.append((msg, decoded))
            keys.add((msg.key() or b"").decode("utf-8", "backslashreplace"))
            if done_at is None and expected <= keys:
                done_at = time.monotonic() + linger_s
    finally:
        reader.close()
    return seen


def results_by_id(settings: Settings, expected: set[str], **kwargs: Any) -> dict[str, list[Result]]:
    by_id: dict[str, list[Result]] = defaultdict(list)
    for _msg, record in read_topic(settings, settings.topic_detections, expected, **kwargs):
        assert record is not None
        by_id[record["request_id"]].append(record)
    missing = expected - set(by_id)
    assert not missing, f"{len(missing)} request(s) without a result, e.g. {sorted(missing)[:5]}"
    return by_id


# --- workers ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dark_cell_model(tmp_path_factory.mktemp("model") / "dark.onnx", imgsz=160, cell=32)


@pytest.fixture
def settings(kafka_settings: Settings, model_path: Path) -> Settings:
    extra = {**kafka_settings.kafka_extra, "session.timeout.ms": "6000"}
    return kafka_settings.model_copy(
        update={
            "model_path": model_path,
            "conf_threshold": 0.5,
            "max_batch": 8,
            "max_wait_ms": 20,
            "metrics_port": 0,
            "ort_intra_threads": 1,
            "decode_threads": 1,
            "shutdown_timeout_s": 8.0,
            "kafka_extra": extra,
        }
    )


@contextmanager
def worker_thread(
    settings: Settings, index: int = 0, worker: Worker | None = None
) -> Iterator[Worker]:
    worker = worker or Worker(settings, index)
    failures: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run, name=f"worker-{index}", daemon=True)
    thread.start()
    try:
        yield worker
        assert thread.is_alive(), f"worker stopped on its own: {failures}"
    finally:
        worker.stop()
        thread.join(STOP_BOUND_S + 5)
    assert not thread.is_alive(), "worker did not stop"
    assert not failures, failures


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``QRSIGHT_*`` environment that rebuilds ``settings`` in a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRSIGHT_")}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if name == "kafka_extra":
            for prop, val in value.items():
                env["QRSIGHT_KAFKA__" + prop.upper().replace(".", "_")] = str(val)
            continue
        if value is None:
            if name == "verifier_path":  # None is "off" here, not "the default"
                env["QRSIGHT_VERIFIER_PATH"] = "off"
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, list):
            value = ",".join(value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env["QRSIGHT_" + name.upper()] = str(value)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


_SPAWNED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _reap_processes() -> Iterator[None]:
    """Whatever a test leaves running (it failed half-way) is killed and reaped."""
    yield
    while _SPAWNED:
        proc = _SPAWNED.pop()
        if proc.poll() is None:
            for child in children(proc.pid):  # a supervisor's workers
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            proc.kill()
        proc.wait(10)


def spawn(settings: Settings, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "consumer.cli", *args],
            env=settings_env(settings),
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    _SPAWNED.append(proc)
    return proc


def spawn_worker(settings: Settings, log: Path, index: int = 0) -> subprocess.Popen[bytes]:
    return spawn(settings, log, "--worker-index", str(index))


def stop_within(proc: subprocess.Popen[bytes], bound_s: float = STOP_BOUND_S) -> float:
    """SIGTERM ``proc``; return how long it took to exit 0."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(bound_s + 5)
    took = time.monotonic() - started
    assert code == 0, f"exit code {code}"
    assert took <= bound_s, f"took {took:.1f}s to stop"
    return took


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def watermarks(reader: Consumer, tp: TopicPartition, tries: int = 10) -> tuple[int, int]:
    """Watermarks, retried while a new topic's leadership settles."""
    for attempt in range(tries):
        try:
            low, high = reader.get_watermark_offsets(tp, timeout=5)
            return int(low), int(high)
        except KafkaException:
            if attempt == tries - 1:
                raise
            time.sleep(0.3)
    raise AssertionError("unreachable")


def count_results(settings: Settings) -> int:
    """How many records the detections topic holds now (high watermarks)."""
    reader = _reader(settings, settings.topic_detections, settings.topic_partitions)
    try:
        total = 0
        for p in range(settings.topic_partitions):
            low, high = watermarks(reader, TopicPartition(settings.topic_detections, p))
            total += high - low
        return total
    finally:
        reader.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_pair() -> int:
    """A port ``p`` with ``p + 1`` free too (worker i listens on metrics_port + i)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def boxes(result: Result) -> list[tuple[float, ...]]:
    return [
        (d["x1"], d["y1"], d["x2"], d["y2"], d["confidence"], d["class_id"])
        for d in result["detections"]
    ]


# --- tests -----------------------------------------------------------------------------------
def test_500_images_give_500_ok_results_with_the_pipelines_boxes(settings: Settings) -> None:
    stream = good_stream(settings, 500, "img")
    publish(settings, stream)
    with worker_thread(settings):
        by_id = results_by_id(settings, {rid for rid, _, _ in stream})
    assert sum(len(v) for v in by_id.values()) == 500
    assert {r[0]["status"] for r in by_id.values()} == {"OK"}
    sample = stream[:40]
    with Pipeline(settings) as pipeline:
        jobs = [ImageJob(rid, jpeg(i)) for i, (rid, _, _) in enumerate(sample)]
        expected = pipeline.run(jobs)
    for (rid, _, _), want in zip(sample, expected, strict=True):
        got = by_id[rid][0]
        assert got["image"] == want["image"]
        assert len(boxes(got)) == len(boxes(want)), rid
        assert np.allclose(boxes(got), boxes(want), atol=1e-4), rid
    assert any(boxes(by_id[rid][0]) for rid, _, _ in sample), "the model found nothing at all"


def bad_inputs(settings: Settings) -> list[tuple[str, bytes | None, list[tuple[str, bytes]], str]]:
    """Ten kinds of bad input: (request id, value, headers, expected error code)."""
    good = jpeg(7)
    corrupt_png = bytearray(png(64, 48))
    corrupt_png[60:90] = b"\x00" * 30  # damage the compressed pixel data (IDAT)
    cid = names.H_CORRELATION_ID

    def raw(rid: str, value: bytes | None, code: str, *extra: tuple[str, bytes]) -> Any:
        return (rid, value, [(cid, rid.encode()), *extra], code)

    return [
        raw("bad-empty", b"", "empty_image"),
        raw("bad-text", b"hello, this is not an image", "bad_message"),
        raw("bad-avro", b"\x00\x00\x00\x00\x07\xff\xff\xff garbage", "bad_message"),
        raw("bad-truncated-jpeg", good[: len(good) // 2], "corrupt_image"),
        raw("bad-too-many-pixels", png(400, 300), "image_too_large"),
        raw("bad-gif", b"GIF89a\x10\x00\x10\x00\x00\x00\x00;", "unsupported_type"),
        raw("bad-corrupt-png", bytes(corrupt_png), "corrupt_image"),
        raw("bad-deadline-header", good, "bad_message", (names.H_DEADLINE_MS, b"soon")),
        raw("bad-reply-partition", good, "bad_reply_route", (names.H_REPLY_PARTITION, b"\x01")),
        (
            "bad-request-not-image",
            image_request(settings, "bad-request-not-image", b"just some text"),
            [],
            "unsupported_type",
        ),
        (
            "bad-request-empty-image",
            image_request(settings, "bad-request-empty-image", b""),
            [],
            "empty_image",
        ),
    ]


def test_bad_input_gets_error_result_and_dlq_copy_and_the_worker_keeps_going(
    settings: Settings,
) -> None:
    settings = settings.model_copy(update={"max_image_pixels": 100_000})
    bad = bad_inputs(settings)
    good = good_stream(settings, 30, "good")
    stream: list[Outgoing] = list(good[:10])
    for i, (rid, value, headers, _code) in enumerate(bad):
        stream.append((rid, value, headers))
        stream.append(good[10 + i] if 10 + i < len(good) else good[-1])
    stream.extend(good[10 + len(bad) :])
    publish(settings, stream)
    bad_ids = {rid for rid, *_ in bad}
    with worker_thread(settings):
        by_id = results_by_id(settings, {rid for rid, _, _ in stream})
        dlq = read_topic(settings, settings.topic_dlq, bad_ids)
    for rid, _, _ in good:
        assert [r["status"] for r in by_id[rid]] == ["OK"], rid
    for rid, _value, _headers, code in bad:
        (result,) = by_id[rid]
        assert result["status"] == "ERROR", rid
        assert error_code(result) == code, (rid, result["error"])
        assert result["error"]["message"]
    copies = {(m.key() or b"").decode(): m for m, _ in dlq}
    assert set(copies) == bad_ids, "exactly the bad messages are in the DLQ"
    for rid, value, headers, code in bad:
        msg = copies[rid]
        hdrs = names.header_dict(msg.headers())
        assert (msg.value() or b"") == (value or b""), rid
        assert hdrs[names.H_ERROR_CODE].decode() == code
        assert hdrs[names.H_ERROR_MESSAGE]
        assert hdrs[names.H_ERROR_TOPIC].decode() == settings.topic_images
        assert int(hdrs[names.H_ERROR_PARTITION]) >= 0 and int(hdrs[names.H_ERROR_OFFSET]) >= 0
        for name, val in headers:
            assert hdrs[name] == val, "original headers kept"


def test_deadlines_reply_routing_and_header_passthrough(settings: Settings) -> None:
    now = now_ms()
    trace = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    cid = names.H_CORRELATION_ID
    stream: list[Outgoing] = [
        (
            "late",
            jpeg(1),
            [(cid, b"late"), (names.H_DEADLINE_MS, names.encode_deadline(now - 1))],
        ),
        (
            "in-time",
            jpeg(2),
            [(cid, b"in-time"), (names.H_DEADLINE_MS, names.encode_deadline(now + 600_000))],
        ),
        (
            "reply-3",
            jpeg(3),
            [
                (cid, b"reply-3"),
                (names.H_REPLY_TOPIC, settings.topic_replies.encode()),
                (names.H_REPLY_PARTITION, names.encode_partition(3)),
                (names.H_TRACEPARENT, trace),
            ],
        ),
        ("no-id", jpeg(4), []),  # no correlation id, raw bytes: topic-partition-offset
    ]
    publish(settings, stream[:3])
    with worker_thread(settings):
        by_id = results_by_id(settings, {"late", "in-time", "reply-3"})
        publish(settings, stream[3:])
        every = read_topic(settings, settings.topic_detections, set(), linger_s=3.0)
        replies = read_topic(
            settings,
            settings.topic_replies,
            {"reply-3"},
            partitions=settings.replies_partitions,
        )
    assert by_id["late"][0]["status"] == "EXPIRED"
    assert by_id["late"][0]["detections"] == []
    assert by_id["in-time"][0]["status"] == "OK"
    assert by_id["reply-3"][0]["status"] == "OK"
    ((reply_msg, reply),) = replies
    assert reply_msg.partition() == 3
    assert reply is not None and reply["request_id"] == "reply-3"
    assert reply["detections"] == by_id["reply-3"][0]["detections"]
    hdrs = names.header_dict(reply_msg.headers())
    assert hdrs[names.H_CORRELATION_ID] == b"reply-3"
    assert hdrs[names.H_TRACEPARENT] == trace
    derived = [
        r
        for _m, r in every
        if r is not None and r["request_id"].startswith(settings.topic_images + "-")
    ]
    assert len(derived) == 1 and derived[0]["status"] == "OK", "id from topic-partition-offset"


REPLIES_MAX_BYTES = 1024  # a replies topic with a smaller max.message.bytes than results need


def shrink_topic(settings: Settings, topic: str, max_bytes: int) -> None:
    admin = AdminClient(admin_config(settings))
    entry = ConfigEntry(
        "max.message.bytes", str(max_bytes), incremental_operation=AlterConfigOpType.SET
    )
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[entry])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)


def test_a_reply_too_large_for_the_replies_topic_reaches_the_caller_as_an_error(
    settings: Settings,
) -> None:
    """A result the replies topic refuses (too large for its max.message.bytes) must not
    leave the caller waiting for its timeout (the API's 504): it gets an ERROR reply."""
    shrink_topic(settings, settings.topic_replies, REPLIES_MAX_BYTES)
    dark = cv2.imencode(".jpg", np.zeros((160, 160, 3), np.uint8))[1].tobytes()  # 25 boxes
    cid = names.H_CORRELATION_ID
    route = [
        (names.H_REPLY_TOPIC, settings.topic_replies.encode()),
        (names.H_REPLY_PARTITION, names.encode_partition(1)),
    ]
    publish(settings, [("big", dark, [(cid, b"big"), *route])])
    with worker_thread(settings):
        by_id = results_by_id(settings, {"big"})
        replies = read_topic(
            settings, settings.topic_replies, {"big"}, partitions=settings.replies_partitions
        )
    (event,) = by_id["big"]
    assert event["status"] == "OK" and len(event["detections"]) > 10
    assert len(replies) == 1, "no reply: the caller would wait for its timeout"
    ((msg, reply),) = replies
    assert msg.partition() == 1
    assert reply is not None and reply["request_id"] == "big"
    assert reply["status"] == "ERROR"
    assert reply["error"] is not None and reply["error"]["code"] == "result_undeliverable"


def test_metrics_and_health_endpoints(settings: Settings) -> None:
    port = free_port()
    settings = settings.model_copy(update={"metrics_port": port})
    from consumer.cli import _start_metrics

    publish(settings, good_stream(settings, 5, "m"))
    worker = Worker(settings, 0)
    server = _start_metrics(settings, 0, worker.metrics, lambda: worker.live)
    assert server is not None
    try:
        assert http_get(f"http://127.0.0.1:{port}/readyz")[0] == 503, "no model, no partitions"
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 30, "ready")
        results_by_id(settings, {f"m-{i}" for i in range(5)})
        assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        wait_for(
            lambda: (
                'qrsight_worker_images_total{status="OK"} 5.0'
                in http_get(f"http://127.0.0.1:{port}/metrics")[1]
            ),
            10,
            "images counter",
        )
        text = http_get(f"http://127.0.0.1:{port}/metrics")[1]
        for name in (
            "qrsight_worker_batch_size_bucket",
            'qrsight_worker_stage_seconds_bucket{le="0.001",stage="infer"}',
            'stage="produce"',
            'stage="decode"',
            "qrsight_worker_model_info",
            f"qrsight_worker_assigned_partitions {settings.topic_partitions}.0",
            "qrsight_worker_ready 1.0",
        ):
            assert name in text, name
        wait_for(
            lambda: (
                "qrsight_worker_consumer_lag{" in http_get(f"http://127.0.0.1:{port}/metrics")[1]
            ),
            10,
            "lag gauge",
        )
        worker.stop()
        thread.join(STOP_BOUND_S)
        assert not thread.is_alive()
        assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 503
    finally:
        worker.stop()
        server.close()


@contextmanager
def paced_publisher(settings: Settings, stream: list[Outgoing], pace_s: float) -> Iterator[None]:
    """Publish ``stream`` in the background, ``pace_s`` apart, so workers see a live stream."""
    thread = threading.Thread(target=publish, args=(settings, stream, pace_s), daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(120)


def test_sigterm_mid_stream_exits_0_in_time_and_a_new_worker_finishes(
    settings: Settings, tmp_path: Path
) -> None:
    stream = good_stream(settings, 300, "term")
    log = tmp_path / "worker.log"
    first = spawn_worker(settings, log)
    with paced_publisher(settings, stream, pace_s=0.01):
        wait_for(lambda: count_results(settings) >= 50, 60, "first results")
        stop_within(first)
        assert count_results(settings) < len(stream), "stopped mid-stream"
        second = spawn_worker(settings, log)
        try:
            by_id = results_by_id(settings, {rid for rid, _, _ in stream})
        finally:
            stop_within(second)
    assert {r["status"] for v in by_id.values() for r in v} == {"OK"}
    # the first worker committed what it had delivered: nothing was processed twice
    assert max(len(v) for v in by_id.values()) == 1, log.read_text()[-3000:]


def test_kill_9_then_restart_every_request_gets_a_result(
    settings: Settings, tmp_path: Path
) -> None:
    stream = good_stream(settings, 300, "kill")
    log = tmp_path / "worker.log"
    first = spawn_worker(settings, log)
    with paced_publisher(settings, stream, pace_s=0.01):
        wait_for(lambda: count_results(settings) >= 50, 60, "first results")
        first.kill()
        first.wait(10)
        assert count_results(settings) < len(stream), "killed mid-stream"
        second = spawn_worker(settings, log)
        try:
            by_id = results_by_id(settings, {rid for rid, _, _ in stream})
        finally:
            stop_within(second)
    assert {r["status"] for v in by_id.values() for r in v} == {"OK"}


def test_a_restarted_worker_does_not_redo_what_its_dead_predecessor_delivered(
    settings: Settings, tmp_path: Path
) -> None:
    """A worker killed while its last commit was in flight leaves the delivered offsets in
    its note; the next worker of that identity commits them instead of running and
    publishing that batch again, but never moves a committed offset backwards."""
    settings = settings.model_copy(update={"state_dir": tmp_path / "state"})
    stream = good_stream(settings, 30, "heir")
    where = publish(settings, stream)
    offsets: dict[int, list[int]] = defaultdict(list)
    for part, off in where.values():
        offsets[part].append(off)
    assert len(offsets) >= 2, "the keys spread over at least two partitions"
    parts = sorted(offsets)
    # the predecessor delivered the first 3 messages of each partition; partition parts[0]'s
    # group offset was meanwhile committed further (to its 5th message) by another member
    delivered = {
        (settings.topic_images, p): sorted(offsets[p])[min(3, len(offsets[p]) - 1)] for p in parts
    }
    ahead = sorted(offsets[parts[0]])[min(5, len(offsets[parts[0]]) - 1)]
    # the group has committed offsets (a note never wins over a missing one, -1001): the
    # first message of each partition, and partition parts[0] further
    committed = {p: sorted(offsets[p])[0] for p in parts} | {parts[0]: ahead}
    committer = Consumer(consumer_config(settings, settings.consumer_group, role="test"))
    committer.commit(
        offsets=[TopicPartition(settings.topic_images, p, o) for p, o in committed.items()],
        asynchronous=False,
    )
    committer.close()
    start = {p: delivered[(settings.topic_images, p)] for p in parts}
    start[parts[0]] = ahead
    worker = Worker(settings, 0)
    assert worker.journal.path is not None
    in_hand = [(settings.topic_images, p, o) for p, o in start.items()]
    CrashJournal(worker.journal.path, settings.crash_limit).note(in_hand, delivered)
    redo = {rid for rid, (p, o) in where.items() if o >= start[p]}
    with worker_thread(settings, worker=worker):
        by_id = results_by_id(settings, redo, linger_s=3.0)
    assert set(by_id) == redo, "only what the predecessor had not delivered is run"
    assert {len(v) for v in by_id.values()} == {1}


def test_exactly_once_kill_9_then_restart_gives_one_committed_result_each(
    settings: Settings, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"processing_guarantee": "exactly_once"})
    stream = good_stream(settings, 300, "eos")
    log = tmp_path / "worker.log"
    first = spawn_worker(settings, log)
    with paced_publisher(settings, stream, pace_s=0.01):
        wait_for(lambda: count_results(settings) >= 50, 60, "first results")
        first.kill()
        first.wait(10)
        second = spawn_worker(settings, log)
        try:
            by_id = results_by_id(settings, {rid for rid, _, _ in stream}, linger_s=3.0)
        finally:
            stop_within(second)
    counts = {rid: len(v) for rid, v in by_id.items()}
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}


def metric(port: int, name: str) -> float | None:
    _status, text = http_get(f"http://127.0.0.1:{port}/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_two_workers_share_partitions_and_stopping_one_loses_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port_pair()
    settings = settings.model_copy(update={"metrics_port": port})
    stream = good_stream(settings, 300, "pair")
    log = tmp_path / "workers.log"
    workers = [spawn_worker(settings, log, 0), spawn_worker(settings, log, 1)]
    try:
        assigned = "qrsight_worker_assigned_partitions"
        wait_for(
            lambda: all((metric(port + i, assigned) or 0) > 0 for i in (0, 1)),
            60,
            "both workers assigned",
        )
        assert sum(metric(port + i, assigned) or 0 for i in (0, 1)) == settings.topic_partitions
        with paced_publisher(settings, stream, pace_s=0.01):
            wait_for(lambda: count_results(settings) >= 50, 60, "first results")
            stop_within(workers[1])
            wait_for(
                lambda: metric(port, assigned) == settings.topic_partitions,
                30,
                "worker 0 takes every partition",
            )
        by_id = results_by_id(settings, {rid for rid, _, _ in stream})
        assert {r["status"] for v in by_id.values() for r in v} == {"OK"}
        done = metric(port, 'qrsight_worker_images_total{status="OK"}') or 0
        assert 0 < done < len(stream), "both workers did part of the work"
    finally:
        for proc in workers:
            if proc.poll() is None:
                stop_within(proc)


def test_two_workers_with_a_solo_session_answer_every_image_once_and_leave_the_board_clear(
    settings: Settings, tmp_path: Path
) -> None:
    """QRSIGHT_ORT_SOLO_THREADS: each worker marks its slot of the host's busy board for a
    batch and takes the wide session for a lone image only while the other is idle. A live
    stream at low load through two such workers: one OK result per image, and once they
    have stopped no slot is left marked."""
    settings = settings.model_copy(update={"ort_solo_threads": 2, "ort_solo_min_run_ms": 0})
    stream = good_stream(settings, 120, "solo")
    log = tmp_path / "workers.log"
    workers = [spawn_worker(settings, log, 0), spawn_worker(settings, log, 1)]
    try:
        with paced_publisher(settings, stream, pace_s=0.02):
            by_id = results_by_id(settings, {rid for rid, _, _ in stream})
    finally:
        for proc in workers:
            if proc.poll() is None:
                stop_within(proc)
    assert {len(v) for v in by_id.values()} == {1}
    assert {v[0]["status"] for v in by_id.values()} == {"OK"}
    board = board_path(settings.consumer_group)
    assert board.is_file(), "the workers made no busy board"
    assert board.read_bytes()[:SLOTS] == bytes(SLOTS)
    board.unlink()


GROUP_WAIT_SESSION_MS = 45_000  # librdkafka's default: how long the group waits for a dead member


def test_while_the_group_waits_for_a_dead_member_a_worker_holds_back_and_stops_in_time(
    settings: Settings, tmp_path: Path
) -> None:
    """Default session timeout, no group.instance.id: a worker is killed and a new one
    joins, so the group waits out the dead member's session; meanwhile the survivor's
    offset commits get no answer. It must not run ahead of them (everything it does in
    the window is done again if its partitions move), must say so in a metric, and a
    SIGTERM must not hang in a commit waiting for the rebalance."""
    port = free_port_pair()
    extra = {**settings.kafka_extra, "session.timeout.ms": str(GROUP_WAIT_SESSION_MS)}
    settings = settings.model_copy(update={"metrics_port": port, "kafka_extra": extra})
    log = tmp_path / "workers.log"
    survivor, doomed = spawn_worker(settings, log, 0), spawn_worker(settings, log, 1)
    assigned = "qrsight_worker_assigned_partitions"
    wait_for(
        lambda: all((metric(port + i, assigned) or 0) > 0 for i in (0, 1)), 60, "both assigned"
    )
    warm = good_stream(settings, 12, "warm")
    publish(settings, warm)
    results_by_id(settings, {rid for rid, _, _ in warm}, linger_s=0.5)
    before = count_results(settings)
    doomed.kill()
    doomed.wait(10)
    killed_at = time.monotonic()
    newcomer = spawn_worker(settings, log, 1)  # a new member: the group rebalances and waits
    try:
        time.sleep(8.0)  # the newcomer loads its model and joins; the survivor rejoins
        publish(settings, good_stream(settings, 150, "window"))
        time.sleep(8.0)
        ran = count_results(settings) - before
        held = metric(port, "qrsight_worker_fetch_paused")
        uncommitted = metric(port, "qrsight_worker_uncommitted_messages")
        assert time.monotonic() - killed_at < GROUP_WAIT_SESSION_MS / 1000 - 8, "still waiting"
        bound = 3 * settings.max_batch  # the hold bound (2 batches) + the batch in hand
        assert ran <= bound, f"ran {ran} images ahead of unconfirmed commits (bound {bound})"
        assert held == 1 and uncommitted is not None and uncommitted > 0, (held, uncommitted)
        stop_within(survivor, settings.shutdown_timeout_s)
    finally:
        for proc in (survivor, newcomer):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_supervisor_restarts_a_crashed_worker_and_stops_cleanly(
    settings: Settings, tmp_path: Path
) -> None:
    stream = good_stream(settings, 200, "sup")
    log = tmp_path / "supervisor.log"
    supervisor = spawn(settings, log, "--workers", "2")
    try:
        wait_for(lambda: len(children(supervisor.pid)) == 2, 30, "two workers")
        victim = children(supervisor.pid)[0]
        with paced_publisher(settings, stream, pace_s=0.01):
            wait_for(lambda: count_results(settings) >= 30, 60, "first results")
            os.kill(victim, signal.SIGKILL)
            wait_for(
                lambda: (
                    len(children(supervisor.pid)) == 2 and victim not in children(supervisor.pid)
                ),
                30,
                "a replacement worker",
            )
        by_id = results_by_id(settings, {rid for rid, _, _ in stream})
        assert {r["status"] for v in by_id.values() for r in v} == {"OK"}
    finally:
        took = stop_within(supervisor, STOP_BOUND_S + 2)
    assert took <= STOP_BOUND_S + 2
    text = log.read_text()
    assert "worker exited, restarting" in text
    assert children(supervisor.pid) == []


class BrokenModel(Pipeline):
    """A pipeline whose model fails (e.g. the GPU went away): not the input's fault."""

    def run(self, jobs: Any, stages: Any = None) -> list[dict[str, Any]]:
        raise ModelError("the model failed: CUDA error (test)")


def test_a_model_failure_stops_the_worker_without_committing_and_nothing_is_lost(
    settings: Settings,
) -> None:
    stream = good_stream(settings, 20, "model")
    publish(settings, stream)
    broken = Worker(settings, 0, pipeline=BrokenModel(settings))
    with pytest.raises(ModelError):
        broken.run()
    assert count_results(settings) == 0, "no result for a batch the model did not run"
    dlq = read_topic(settings, settings.topic_dlq, set(), linger_s=1.0)
    assert dlq == [], "a model failure is not poison: nothing goes to the DLQ"
    with worker_thread(settings):
        by_id = results_by_id(settings, {rid for rid, _, _ in stream})
    assert {r["status"] for v in by_id.values() for r in v} == {"OK"}


def test_shipped_model_through_kafka_matches_qrsight_detect_on_the_samples(
    settings: Settings,
) -> None:
    """The real detector: what the worker publishes is what ``Pipeline`` (qrsight-detect) gives."""
    assert DEFAULT_MODEL.exists(), f"the shipped model is missing: {DEFAULT_MODEL}"
    settings = settings.model_copy(update={"model_path": DEFAULT_MODEL, "conf_threshold": None})
    samples = REPO_ROOT / "samples"
    manifest = [json.loads(line) for line in (samples / "manifest.jsonl").read_text().splitlines()]
    data = {m["path"]: (samples / m["path"]).read_bytes() for m in manifest}
    publish(settings, [(p, b, [(names.H_CORRELATION_ID, p.encode())]) for p, b in data.items()])
    with worker_thread(settings):
        by_id = results_by_id(settings, set(data))
    with Pipeline(settings) as pipeline:
        expected = pipeline.run([ImageJob(p, b) for p, b in data.items()])
    for want in expected:
        (got,) = by_id[want["request_id"]]
        assert got["status"] == "OK"
        assert (got["image"], got["model"]) == (want["image"], want["model"])
        assert len(boxes(got)) == len(boxes(want))
        assert np.allclose(boxes(got), boxes(want), atol=1e-3), want["request_id"]
        assert [d["text"] for d in got["detections"]] == [d["text"] for d in want["detections"]]
    for m in manifest:
        texts = {d["text"] for d in by_id[m["path"]][0]["detections"]}
        assert set(m["texts"]) <= texts, (m["path"], texts)
