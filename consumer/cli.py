"""``qrsight-consumer [--workers N]``: the detection workers.

Without ``--worker-index`` it supervises N worker processes (default ``QRSIGHT_WORKERS``);
with it, it is one worker (what the supervisor starts). Exit codes: 0 clean stop,
1 failure (model, broker, delivery: restart me), 78 configuration error (fix a setting).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType

from confluent_kafka.admin import AdminClient

from consumer.metrics import MetricsServer, WorkerMetrics
from consumer.supervisor import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, Supervisor, static_identity
from consumer.watchdog import HangWatchdog
from core.runtime.errors import ConfigError
from core.runtime.gpu import default_workers, place_worker
from core.runtime.kafka_security import check_connection
from core.runtime.logs import configure_from_settings, configure_logging
from core.runtime.settings import Settings, env_name, load_settings
from core.runtime.telemetry import setup_tracing

logger = logging.getLogger("consumer")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="qrsight-consumer",
        description="Detect QR codes in the images of QRSIGHT_TOPIC_IMAGES and publish results "
        "to QRSIGHT_TOPIC_DETECTIONS. Settings come from QRSIGHT_* environment variables.",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes to supervise (default: QRSIGHT_WORKERS)",
    )
    parser.add_argument(
        "--worker-index",
        type=int,
        default=None,
        help="run a single worker in this process with this index (metrics port = "
        "QRSIGHT_METRICS_PORT + index); this is what the supervisor starts",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        configure_logging("INFO")
        logger.error("configuration error: %s", exc.message)
        return EXIT_CONFIG
    configure_from_settings(settings)
    if args.worker_index is not None:
        return run_worker(settings, args.worker_index)
    workers = args.workers if args.workers is not None else default_workers(settings)
    if workers < 1:
        logger.error("--workers must be at least 1, got %d", workers)
        return EXIT_CONFIG
    identity, lock = static_identity(
        settings.state_dir,
        settings.consumer_group,
        settings.group_instance_id,
        settings.static_membership,
    )
    env = {env_name("group_instance_id"): identity} if identity else None
    logger.info("supervising workers=%d group_instance_id=%s", workers, identity or "-")
    supervisor = Supervisor(workers, settings.shutdown_timeout_s, env=env)
    supervisor.install_signal_handlers()
    try:
        return supervisor.run()
    finally:
        if lock is not None:
            lock.close()


def run_worker(settings: Settings, index: int) -> int:
    """One worker in this process until SIGTERM/SIGINT (0) or a failure (1)."""
    from consumer.worker import Worker

    settings = place_worker(settings, index)  # its GPU, and GPU defaults (core/runtime/gpu.py)
    try:
        setup_tracing("qrsight-worker")
    except ConfigError as exc:
        logger.error("configuration error worker=%d error=%s", index, exc.message)
        return EXIT_CONFIG
    metrics = WorkerMetrics(index)
    watchdog = HangWatchdog(settings.pipeline_timeout_s)  # this process is the worker's own
    worker = Worker(settings, index, metrics=metrics, watchdog=watchdog)
    _install_stop_handlers(worker.stop, settings.shutdown_timeout_s, worker.journal.stopping)
    server = _start_metrics(settings, index, metrics, lambda: worker.live)
    try:
        # a refused login or certificate is a setting to fix: say so now, not retry for ever
        check_connection(settings, f"worker-{index}", AdminClient)
        worker.run()
    except ConfigError as exc:
        logger.error("configuration error worker=%d error=%s", index, exc.message)
        return EXIT_CONFIG
    except Exception:
        logger.exception("worker failed worker=%d", index)
        return EXIT_FAILURE
    finally:
        if server is not None:
            server.close()
    return EXIT_OK


def _start_metrics(
    settings: Settings, index: int, metrics: WorkerMetrics, live: Callable[[], bool]
) -> MetricsServer | None:
    if settings.metrics_port == 0:
        return None
    try:
        return MetricsServer(metrics, settings.metrics_port + index, live).start()
    except OSError as exc:
        raise SystemExit(
            f"cannot listen on metrics port {settings.metrics_port + index}: {exc} "
            "(set QRSIGHT_METRICS_PORT, or 0 to turn metrics off)"
        ) from exc


def _install_stop_handlers(
    stop: Callable[[], None], timeout_s: float, told: Callable[[], None] = lambda: None
) -> None:
    """SIGTERM/SIGINT stop the worker; if it is not out within ``timeout_s``, exit 1.
    ``told`` runs first: the crash journal records that this worker was told to stop, so
    its death from here on is not blamed on the batch in hand (consumer.journal)."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        logger.info("stopping signal=%s timeout_s=%.1f", signal.Signals(signum).name, timeout_s)
        told()
        stop()
        watchdog = threading.Timer(timeout_s, _too_slow, args=(timeout_s,))
        watchdog.daemon = True
        watchdog.start()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def _too_slow(timeout_s: float) -> None:
    logger.error("worker did not stop within %.1fs (QRSIGHT_SHUTDOWN_TIMEOUT_S)", timeout_s)
    logging.shutdown()
    os._exit(EXIT_FAILURE)


if __name__ == "__main__":
    sys.exit(main())
