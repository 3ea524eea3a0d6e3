"""Prometheus metrics and the liveness/readiness endpoints of one worker process.

Each worker has its own registry and serves ``/metrics``, ``/healthz`` (live) and
``/readyz`` (ready = model loaded and partitions assigned) on
``QRSIGHT_METRICS_PORT + worker index``; port 0 turns the server off.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

PREFIX = "qrsight_worker_"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
STAGES = ("queue", "decode", "infer", "post", "produce", "total")


class WorkerMetrics:
    """The worker's metrics, in a registry of their own (several workers can share a process)."""

    def __init__(self, worker: int = 0) -> None:
        self.registry = CollectorRegistry()
        self.worker = str(worker)
        reg = self.registry
        self.images = Counter(
            PREFIX + "images", "images processed, by result status", ["status"], registry=reg
        )
        self.batch_size = Histogram(
            PREFIX + "batch_size", "messages per micro-batch", buckets=BATCH_BUCKETS, registry=reg
        )
        self.stage_seconds = Histogram(
            PREFIX + "stage_seconds",
            "per-image latency of each stage (queue: from submitted_at or the message timestamp)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.lag = Gauge(
            PREFIX + "consumer_lag",
            "messages behind the partition's high watermark",
            ["topic", "partition"],
            registry=reg,
        )
        self.dlq = Counter(
            PREFIX + "dlq_messages",
            "messages copied to the dead-letter topic",
            ["code"],
            registry=reg,
        )
        self.retries = Counter(
            PREFIX + "retries",
            "retries of batches that failed for a reason other than their input",
            registry=reg,
        )
        self.quarantined = Counter(
            PREFIX + "quarantined",
            "messages isolated and copied to the DLQ because processing them kept failing "
            "(reason: error = an exception each retry, crash = the worker died with it)",
            ["reason"],
            registry=reg,
        )
        self.dropped_revoked = Counter(
            PREFIX + "revoked_dropped",
            "fetched messages left unprocessed because their partition was revoked during "
            "the fetch (the new owner processes them)",
            registry=reg,
        )
        self.transactions_aborted = Counter(
            PREFIX + "transactions_aborted",
            "exactly-once batches whose transaction was aborted and given back (the group "
            "moved on during the batch); their partitions' owner redoes them",
            registry=reg,
        )
        self.consumer_rebuilds = Counter(
            PREFIX + "consumer_rebuilds",
            "Kafka consumers replaced in place after librdkafka declared them fatally failed "
            "(e.g. a static member fenced after a broker outage)",
            registry=reg,
        )
        self.commit_failures = Counter(
            PREFIX + "commit_failures",
            "offset commits that failed (the next commit covers them)",
            registry=reg,
        )
        self.uncommitted = Gauge(
            PREFIX + "uncommitted_messages",
            "delivered messages whose offset commit the broker has not confirmed yet (done "
            "again if the partitions move or the worker dies before it is)",
            registry=reg,
        )
        self.fetch_paused = Gauge(
            PREFIX + "fetch_paused",
            "1 while the worker has paused fetching because too much delivered work awaits a "
            "confirmed commit (e.g. while the group waits out a dead member's session)",
            registry=reg,
        )
        self.commit_holds = Counter(
            PREFIX + "commit_holds",
            "times the worker paused fetching until its offset commits were confirmed",
            registry=reg,
        )
        self.dlq_truncated = Counter(
            PREFIX + "dlq_truncated",
            "DLQ copies cut to fit the topic's message size (header error.truncated)",
            registry=reg,
        )
        self.assigned = Gauge(
            PREFIX + "assigned_partitions", "partitions assigned to this worker", registry=reg
        )
        self.model = Info(PREFIX + "model", "the loaded detector", registry=reg)
        self.ready_flag = Gauge(
            PREFIX + "ready", "1 when the model is loaded and partitions are assigned", registry=reg
        )
        self.start_time = Gauge(
            PREFIX + "start_time_seconds",
            "when this worker process started (unix time); each change is a restart",
            registry=reg,
        )
        self.start_time.set_to_current_time()
        self.model_loaded = False
        self.partitions_assigned = False

    def watch_solo(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Export a solo session's use (``QRSIGHT_ORT_SOLO_THREADS``): ``counts`` gives
        the batches of one image and how many of them ran on the wide session; read at
        each scrape, nothing is added to the batch's path."""
        self.registry.register(_SoloRuns(counts))

    # --- updates ----------------------------------------------------------------------
    def set_model(self, info: Mapping[str, Any]) -> None:
        self.model.info({k: str(v) for k, v in info.items()})
        self.model_loaded = True
        self._update_ready()

    def set_assigned(self, count: int) -> None:
        self.assigned.set(count)
        self.partitions_assigned = count > 0
        self._update_ready()

    def observe_result(self, result: Mapping[str, Any]) -> None:
        self.images.labels(result.get("status", "UNKNOWN")).inc()
        timings = result.get("timings") or {}
        for stage in ("queue", "decode", "infer", "post", "total"):
            value = timings.get(f"{stage}_ms")
            if value is not None and value >= 0:
                self.stage_seconds.labels(stage).observe(float(value) / 1000.0)

    def observe_produce(self, seconds: float, count: int) -> None:
        """Per-image share of the batch's produce+delivery time."""
        for _ in range(count):
            self.stage_seconds.labels("produce").observe(seconds)

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        self.lag.labels(topic, str(partition)).set(max(lag, 0))

    def drop_lag(self, topic: str, partition: int) -> None:
        with contextlib.suppress(KeyError):
            self.lag.remove(topic, str(partition))

    @property
    def ready(self) -> bool:
        return self.model_loaded and self.partitions_assigned

    def _update_ready(self) -> None:
        self.ready_flag.set(1 if self.ready else 0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _SoloRuns(Collector):
    def __init__(self, counts: Callable[[], tuple[int, int]]) -> None:
        self._counts = counts

    def collect(self) -> list[CounterMetricFamily]:
        lone, solo = self._counts()
        return [
            CounterMetricFamily(
                PREFIX + "lone_batches",
                "batches of one image (with a solo session, QRSIGHT_ORT_SOLO_THREADS)",
                value=lone,
            ),
            CounterMetricFamily(
                PREFIX + "solo_runs",
                "batches of one image run on the solo session's threads (the other workers "
                "of the host idle)",
                value=solo,
            ),
        ]


def _handler(metrics: WorkerMetrics, live: Callable[[], bool]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = live()
                self._send(200 if ok else 503, b"ok\n" if ok else b"stopped\n")
            elif path == "/readyz":
                ok = metrics.ready
                self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("metrics request %s", format % args)

    return Handler


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on one port, in a daemon thread."""

    def __init__(
        self, metrics: WorkerMetrics, port: int, live: Callable[[], bool], host: str = "0.0.0.0"
    ) -> None:
        self.httpd = ThreadingHTTPServer((host, port), _handler(metrics, live))
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="metrics-http", daemon=True
        )

    def start(self) -> MetricsServer:
        self._thread.start()
        logger.info("metrics server listening port=%d", self.port)
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
