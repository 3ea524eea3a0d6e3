"""The worker's /metrics, /healthz and /readyz (an HTTP server on a free port, no Kafka)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from consumer.metrics import MetricsServer, WorkerMetrics


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def served() -> Iterator[tuple[WorkerMetrics, int, list[bool]]]:
    metrics = WorkerMetrics(0)
    live = [True]
    server = MetricsServer(metrics, 0, lambda: live[0], host="127.0.0.1").start()
    yield metrics, server.port, live
    server.close()


def test_ready_needs_the_model_and_partitions(
    served: tuple[WorkerMetrics, int, list[bool]],
) -> None:
    metrics, port, _ = served
    assert get(port, "/readyz")[0] == 503
    metrics.set_model({"name": "qrsight-qr", "version": "1", "input_size": 640})
    assert get(port, "/readyz")[0] == 503, "model loaded, no partitions yet"
    metrics.set_assigned(3)
    assert get(port, "/readyz")[0] == 200
    metrics.set_assigned(0)
    assert get(port, "/readyz")[0] == 503, "all partitions revoked"


def test_live_follows_the_worker(served: tuple[WorkerMetrics, int, list[bool]]) -> None:
    _, port, live = served
    assert get(port, "/healthz")[0] == 200
    live[0] = False
    assert get(port, "/healthz")[0] == 503
    assert get(port, "/nope")[0] == 404


def test_metrics_exposition(served: tuple[WorkerMetrics, int, list[bool]]) -> None:
    metrics, port, _ = served
    metrics.set_model({"name": "qrsight-qr", "version": "1"})
    timings = {
        "queue_ms": 12.0,
        "decode_ms": 3.0,
        "infer_ms": 40.0,
        "post_ms": 1.0,
        "total_ms": 56.0,
    }
    metrics.observe_result({"status": "OK", "timings": timings})
    metrics.observe_result({"status": "ERROR", "timings": timings})
    metrics.observe_produce(0.004, 2)
    metrics.batch_size.observe(2)
    metrics.dlq.labels("corrupt_image").inc()
    metrics.set_lag("qr.images", 1, 17)
    status, text = get(port, "/metrics")
    assert status == 200
    for line in (
        'qrsight_worker_images_total{status="OK"} 1.0',
        'qrsight_worker_images_total{status="ERROR"} 1.0',
        'qrsight_worker_stage_seconds_count{stage="infer"} 2.0',
        'qrsight_worker_stage_seconds_count{stage="produce"} 2.0',
        'qrsight_worker_stage_seconds_sum{stage="queue"} 0.024',
        "qrsight_worker_batch_size_count 1.0",
        'qrsight_worker_dlq_messages_total{code="corrupt_image"} 1.0',
        'qrsight_worker_consumer_lag{partition="1",topic="qr.images"} 17.0',
        'qrsight_worker_model_info{name="qrsight-qr",version="1"} 1.0',
    ):
        assert line in text, line
    metrics.drop_lag("qr.images", 1)
    assert "qrsight_worker_consumer_lag{" not in get(port, "/metrics")[1]


def test_a_solo_session_s_use_is_read_at_each_scrape(
    served: tuple[WorkerMetrics, int, list[bool]],
) -> None:
    metrics, port, _ = served
    assert "qrsight_worker_solo_runs" not in get(port, "/metrics")[1]  # no solo session
    counts = [(0, 0)]
    metrics.watch_solo(lambda: counts[0])
    counts[0] = (7, 3)  # seven lone batches, three of them while the other workers idled
    text = get(port, "/metrics")[1]
    assert "qrsight_worker_lone_batches_total 7.0" in text
    assert "qrsight_worker_solo_runs_total 3.0" in text
