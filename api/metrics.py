"""Prometheus metrics of the API, correct across gunicorn workers.

When ``PROMETHEUS_MULTIPROC_DIR`` is set (``api/gunicorn.conf.py`` sets it up before any
worker imports prometheus_client, which reads it at import), every worker writes its
samples to files there and ``/api/v1/metrics`` aggregates all of them; gunicorn's
``child_exit`` hook marks dead workers. Without it (one process), the default registry
is served.
"""

from __future__ import annotations

import os

from flask import Blueprint, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

# prometheus_client's own switch; it reads the same variable when it is imported.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

REQUESTS = Counter(
    "qrsight_api_requests",
    "HTTP requests served, by route and status",
    ["route", "method", "status"],
)
LATENCY = Histogram(
    "qrsight_api_request_seconds",
    "HTTP request duration, by route",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
IN_FLIGHT = Gauge(
    "qrsight_api_in_flight_requests",
    "requests being served now",
    multiprocess_mode="livesum",
)
DETECT_IN_FLIGHT = Gauge(
    "qrsight_api_detect_in_flight",
    "/detect requests admitted and not finished (uploading or awaiting their reply)",
    multiprocess_mode="livesum",
)
REPLY_WAITERS = Gauge(
    "qrsight_api_reply_waiters",
    "requests awaiting their Kafka reply (entries of the correlation map)",
    multiprocess_mode="livesum",
)
REPLY_READER_RESTARTS = Counter(
    "qrsight_api_reply_reader_restarts",
    "times the reply reader thread died and was started again",
)
WRITE_CIRCUIT_OPEN = Gauge(
    "qrsight_api_write_circuit_open",
    "1 while Kafka does not take this process's writes and /detect answers 503 at once "
    "(api/circuit.py)",
    multiprocess_mode="livemax",
)
DETECT_RESULTS = Counter(
    "qrsight_api_detect_results",
    "/detect outcomes by error code ('ok' for success)",
    ["code"],
)
REPLY_PARTITION = Gauge(
    "qrsight_api_reply_partition",
    "replies-topic partition each API process reads (one sample per process)",
    multiprocess_mode="liveall",
)

bp = Blueprint("metrics", __name__, url_prefix="/api/v1")


def registry() -> CollectorRegistry:
    if os.environ.get(MULTIPROC_ENV):
        collected = CollectorRegistry()
        multiprocess.MultiProcessCollector(collected)
        return collected
    return REGISTRY


@bp.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(registry()), mimetype=CONTENT_TYPE_LATEST)
