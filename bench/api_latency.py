"""Round-trip latency of ``POST /api/v1/detect`` through Kafka vs. in-process inference.

    QRSIGHT_KAFKA_BOOTSTRAP=127.0.0.1:9092 python -m bench.api_latency [--requests 200]

Starts, on fresh topics of the given broker, one detection worker
(``python -m consumer.cli``) and the API under gunicorn (``python -m api.cli``), then
measures, for the same image:

- in process: ``core.vision.pipeline.Pipeline.run`` on one image (what a worker does per image);
- round trip: HTTP → API → Kafka → worker → Kafka → API → HTTP, at concurrency 1, 4, 16
  (each client thread sends its requests one after another on a keep-alive session).

The overhead is round-trip p50 at concurrency 1 minus in-process p50 (goal: ≤ 5 ms on
loopback). The model is ``QRSIGHT_MODEL_PATH`` (default the shipped one); ``--image``
picks the photo (default: a generated 640x480 QR scene).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import requests

from core.runtime.settings import Settings, env_name, load_settings
from core.vision.pipeline import ImageJob, Pipeline
from producer_tools.topics import create_topics

REPO = Path(__file__).resolve().parent.parent

READY_TIMEOUT_S = 120


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": statistics.median(ordered), "p95": pick(0.95), "p99": pick(0.99)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def default_image() -> bytes:
    from tests.unit.qr_factory import CodeSpec, scene

    image, _ = scene([CodeSpec("https://example.com/bench", center=(320, 240), module_px=5)])
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def bench_settings(base: Settings, api_workers: int) -> Settings:
    uid = uuid.uuid4().hex[:8]
    return base.model_copy(
        update={
            "topic_images": f"bench.images.{uid}",
            "topic_detections": f"bench.detections.{uid}",
            "topic_replies": f"bench.replies.{uid}",
            "topic_dlq": f"bench.dlq.{uid}",
            "consumer_group": f"bench-workers-{uid}",
            "api_host": "127.0.0.1",
            "api_port": free_port(),
            "api_workers": api_workers,
            "metrics_port": free_port(),
            "rate_limit": "off",
            "auth_enabled": False,
        }
    )


def stand_in_model(settings: Settings, folder: Path) -> Settings:
    """The configured model, or (none shipped yet) a test graph with one fixed box."""
    if settings.model_path.is_file():
        return settings
    import numpy as np

    from tests.unit.onnx_models import make_fixed_output_model

    out = np.array([[320.0, 240.0, 200.0, 200.0, 0.9]], np.float32).T
    path = make_fixed_output_model(folder / "fixed.onnx", out, "yolov8", imgsz=640)
    print(f"note: {settings.model_path} not found; using a stand-in graph (fixed box)")
    return settings.model_copy(update={"model_path": path})


def child_env(settings: Settings, metrics_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in (
        "topic_images",
        "topic_detections",
        "topic_replies",
        "topic_dlq",
        "consumer_group",
        "api_host",
        "api_port",
        "api_workers",
        "metrics_port",
        "rate_limit",
        "auth_enabled",
        "model_path",
    ):
        env[env_name(name)] = str(getattr(settings, name))
    env["PYTHONPATH"] = str(REPO)
    env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    env["QRSIGHT_LOG_LEVEL"] = "WARNING"
    return env


def in_process_ms(settings: Settings, image: bytes, runs: int) -> list[float]:
    pipeline = Pipeline(settings)
    pipeline.run([ImageJob("warmup", image)])
    samples = []
    for i in range(runs):
        started = time.perf_counter()
        pipeline.run([ImageJob(f"bench-{i}", image)])
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def wait_serving(url: str, image: bytes, procs: list[subprocess.Popen[bytes]]) -> None:
    """Until /ready is 200 and one detection round trip succeeds (worker warmed up)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit("a child process exited during start-up")
        try:
            if requests.get(f"{url}/api/v1/ready", timeout=2).status_code == 200:
                r = requests.post(
                    f"{url}/api/v1/detect?timeout_ms=30000",
                    data=image,
                    headers={"Content-Type": "image/jpeg"},
                    timeout=35,
                )
                if r.status_code == 200:
                    return
        except requests.RequestException:
            pass  # still starting
        time.sleep(0.5)
    raise SystemExit("the API did not become ready in time")


def round_trips(
    url: str, image: bytes, concurrency: int, total: int
) -> tuple[list[float], list[float], float]:
    per_thread = max(1, total // concurrency)

    def client(_: int) -> tuple[list[float], list[float]]:
        session = requests.Session()
        rt, worker = [], []
        for _ in range(per_thread):
            started = time.perf_counter()
            r = session.post(
                f"{url}/api/v1/detect",
                data=image,
                headers={"Content-Type": "image/jpeg"},
                timeout=60,
            )
            rt.append((time.perf_counter() - started) * 1000)
            r.raise_for_status()
            worker.append(float(r.json()["timings"]["total_ms"]))
        return rt, worker

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        parts = list(pool.map(client, range(concurrency)))
    wall = time.perf_counter() - started
    rt = [x for p in parts for x in p[0]]
    worker = [x for p in parts for x in p[1]]
    return rt, worker, len(rt) / wall


def row(label: str, samples: list[float], extra: str = "") -> str:
    p = percentiles(samples)
    return f"{label:<28} p50={p['p50']:7.2f}  p95={p['p95']:7.2f}  p99={p['p99']:7.2f} ms {extra}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="round trips per level")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    parser.add_argument("--api-workers", type=int, default=1, help="gunicorn workers")
    parser.add_argument("--image", type=Path, help="image to send (default: a QR scene)")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="qrsight-bench-"))
    settings = stand_in_model(bench_settings(load_settings(), args.api_workers), scratch)
    image = args.image.read_bytes() if args.image else default_image()
    create_topics(settings)
    print(
        f"model={settings.model_path.name} image_bytes={len(image)} "
        f"broker={settings.kafka_bootstrap} api_workers={args.api_workers}"
    )
    local = in_process_ms(settings, image, max(50, args.requests // 2))
    print(row("in-process Pipeline.run", local))
    with tempfile.TemporaryDirectory() as metrics_dir:
        env = child_env(settings, metrics_dir)
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "consumer.cli", "--workers", "1"], cwd=REPO, env=env
            ),
            subprocess.Popen(
                [sys.executable, "-m", "api.cli", "--access-logfile", os.devnull],
                cwd=REPO,
                env=env,
            ),
        ]
        url = f"http://127.0.0.1:{settings.api_port}"
        try:
            wait_serving(url, image, procs)
            results: dict[int, Any] = {}
            for level in (int(c) for c in args.concurrency.split(",")):
                rt, worker, rate = round_trips(url, image, level, args.requests)
                results[level] = (rt, worker)
                print(row(f"round trip, concurrency {level}", rt, f"({rate:.1f} req/s)"))
                print(row(f"  worker total_ms, conc. {level}", worker))
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(30)
    one = results.get(1) or next(iter(results.values()))
    overhead = statistics.median(one[0]) - statistics.median(local)
    transport = statistics.median(a - b for a, b in zip(one[0], one[1], strict=True))
    print(f"overhead at p50 (round trip - in-process): {overhead:.2f} ms (goal <= 5 ms)")
    print(f"transport at p50 (round trip - worker's own total_ms): {transport:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
