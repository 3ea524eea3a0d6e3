"""Through Kafka vs in-process: what do Kafka, Avro and micro-batching cost?

    python -m bench.pipeline [--images 200] [--max-batch 8] [--sweep] [--model PATH]

Generates M real-looking 640x480 JPEGs (skimage's photos with 1-3 QR codes drawn by
segno, reproducible from ``--seed``), then in one run:

1. in-process baseline: ``core.vision.pipeline.Pipeline`` over the same JPEG bytes (decode →
   preprocess → ONNX Runtime → NMS → payloads), chunks of ``max_batch``, no Kafka;
2. through Kafka: the images as Avro ``ImageRequest`` in ``qr.images``, one worker
   process (``python -m consumer.cli --worker-index 0``) with the same model, batch and
   threads; throughput from the result records' timestamps, after the first batch;
3. latency: images published at half that throughput, latency = result timestamp minus
   request timestamp (both set by producers on this machine);
4. the baseline again (the machine is shared: the ratio uses the mean of both runs).

Prints ``ratio = kafka / in-process`` (goal >= 0.90). Needs a broker:
``QRSIGHT_KAFKA_BOOTSTRAP`` if set, else one started with ``deploy/local/kafka.sh`` on a
free port in a temp dir (stopped at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from core.runtime.kafka import consumer_config, producer_config
from core.runtime.results import image_request
from core.runtime.settings import Settings, load_settings
from core.vision.pipeline import ImageJob, Pipeline
from producer_tools.topics import create_topics
from schemas.codec import Codec

ROOT = Path(__file__).resolve().parent.parent

KAFKA_SH = ROOT / "deploy" / "local" / "kafka.sh"
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "camera",
    "brick",
    "grass",
    "gravel",
)
SIZE = (480, 640)  # H, W


# --- images ----------------------------------------------------------------------------------
def _photos() -> list[np.ndarray]:
    import skimage.data

    out = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else img[..., ::-1]
        out.append(np.ascontiguousarray(img[..., :3]))
    return out


def _background(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = SIZE
    scale = max(h / photo.shape[0], w / photo.shape[1]) * float(rng.uniform(1.0, 1.6))
    big = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    y = int(rng.integers(0, big.shape[0] - h + 1))
    x = int(rng.integers(0, big.shape[1] - w + 1))
    return big[y : y + h, x : x + w].copy()


def _paste_code(img: np.ndarray, rng: np.random.Generator, payload: str) -> None:
    import segno

    module_px = int(rng.integers(2, 6))
    code = segno.make(payload, error="m")
    m = np.array([list(row) for row in code.matrix], dtype=bool)
    gray = np.where(np.pad(m, 4), 0, 255).astype(np.uint8)
    gray = np.kron(gray, np.ones((module_px, module_px), np.uint8))
    side = gray.shape[0]
    if side >= min(SIZE) - 10:
        return
    angle = float(rng.uniform(-30, 30))
    diag = int(side * 1.5) + 2
    rot = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
    rot[:, 2] += (diag - side) / 2
    patch = cv2.warpAffine(gray, rot, (diag, diag), borderValue=0)
    mask = cv2.warpAffine(np.full_like(gray, 255), rot, (diag, diag), borderValue=0) > 127
    h, w = SIZE
    if diag >= min(h, w):
        return
    y, x = int(rng.integers(0, h - diag)), int(rng.integers(0, w - diag))
    region = img[y : y + diag, x : x + diag]
    region[mask] = patch[mask][:, None]


def make_images(count: int, seed: int) -> list[bytes]:
    """``count`` 640x480 JPEGs: a photo crop with 1-3 QR codes, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    images = []
    for i in range(count):
        img = _background(photos[int(rng.integers(len(photos)))], rng)
        for j in range(int(rng.integers(1, 4))):
            _paste_code(img, rng, f"https://example.com/qrsight/{seed}/{i}/{j}")
        quality = int(rng.integers(80, 96))
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        images.append(buf.tobytes())
    return images


# --- broker and settings ---------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def broker() -> Iterator[str]:
    """``QRSIGHT_KAFKA_BOOTSTRAP``, else a local broker of our own for the run."""
    external = os.environ.get("QRSIGHT_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    with tempfile.TemporaryDirectory(prefix="qrsight-bench-kafka-") as home:
        port = _free_port()
        env = {**os.environ, "KAFKA_HOME_DIR": home, "QRSIGHT_KAFKA_PORT": str(port)}
        env.pop("KAFKA_CONTROLLER_PORT", None)
        print(f"starting a broker on 127.0.0.1:{port} with {KAFKA_SH}", flush=True)
        subprocess.run([str(KAFKA_SH), "up"], env=env, check=True, capture_output=True)
        try:
            yield f"127.0.0.1:{port}"
        finally:
            subprocess.run([str(KAFKA_SH), "down"], env=env, check=False, capture_output=True)


@dataclass(frozen=True)
class Config:
    max_batch: int
    max_wait_ms: int
    decode_threads: int
    ort_threads: int

    def env(self) -> dict[str, str]:
        return {
            "QRSIGHT_MAX_BATCH": str(self.max_batch),
            "QRSIGHT_MAX_WAIT_MS": str(self.max_wait_ms),
            "QRSIGHT_DECODE_THREADS": str(self.decode_threads),
            "QRSIGHT_ORT_INTRA_THREADS": str(self.ort_threads),
        }

    def label(self) -> str:
        return (
            f"batch={self.max_batch} wait_ms={self.max_wait_ms} "
            f"decode_threads={self.decode_threads} ort_threads={self.ort_threads}"
        )


def bench_env(bootstrap: str, model: Path | None, cfg: Config) -> dict[str, str]:
    uid = uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if k.startswith("QRSIGHT_")}
    env.update(
        {
            "QRSIGHT_KAFKA_BOOTSTRAP": bootstrap,
            "QRSIGHT_TOPIC_IMAGES": f"qr.bench.{uid}.images",
            "QRSIGHT_TOPIC_DETECTIONS": f"qr.bench.{uid}.detections",
            "QRSIGHT_TOPIC_REPLIES": f"qr.bench.{uid}.replies",
            "QRSIGHT_TOPIC_DLQ": f"qr.bench.{uid}.dlq",
            "QRSIGHT_CONSUMER_GROUP": f"qrsight-bench-{uid}",
            "QRSIGHT_TOPIC_PARTITIONS": "3",
            "QRSIGHT_REPLIES_PARTITIONS": "1",
            "QRSIGHT_METRICS_PORT": "0",
            "QRSIGHT_LOG_LEVEL": "WARNING",
            **cfg.env(),
        }
    )
    if model is not None:
        env["QRSIGHT_MODEL_PATH"] = str(model)
    return env


# --- the two measurements --------------------------------------------------------------------
def in_process(settings: Settings, images: Sequence[bytes]) -> float:
    """Images/s of ``Pipeline.run`` over ``images`` in chunks of ``max_batch``."""
    step = settings.max_batch
    jobs = [ImageJob(f"b-{i}", data) for i, data in enumerate(images)]
    with Pipeline(settings) as pipeline:
        pipeline.run(jobs[:step])  # warm-up
        start = time.perf_counter()
        for first in range(0, len(jobs), step):
            results = pipeline.run(jobs[first : first + step])
            assert all(r["status"] == "OK" for r in results), results[0].get("error")
        return len(jobs) / (time.perf_counter() - start)


class Results:
    """Result records: key → timestamp; the timings of ``lat-*`` results are decoded too."""

    def __init__(self, settings: Settings) -> None:
        group = f"bench-reader-{uuid.uuid4().hex[:8]}"
        conf = consumer_config(
            settings, group, role="bench-reader", **{"enable.auto.commit": False}
        )
        self.consumer = Consumer(conf)
        self.consumer.assign(
            [
                TopicPartition(settings.topic_detections, p, OFFSET_BEGINNING)
                for p in range(settings.topic_partitions)
            ]
        )
        self.ts: dict[str, int] = {}
        self.timings: dict[str, dict[str, float]] = {}
        self.codec = Codec("DetectionResult", settings.schema_registry_url)
        self.topic = settings.topic_detections

    def wait(self, keys: set[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not keys <= self.ts.keys():
            if time.monotonic() > deadline:
                missing = len(keys - self.ts.keys())
                raise SystemExit(f"{missing} result(s) missing after {timeout_s:.0f}s")
            for msg in self.consumer.consume(1000, 0.2):
                if msg.error() is None:
                    key = (msg.key() or b"").decode()
                    self.ts.setdefault(key, msg.timestamp()[1])
                    if key.startswith("lat-"):
                        record = self.codec.decode(msg.value(), self.topic)
                        self.timings[key] = record["timings"]

    def close(self) -> None:
        self.consumer.close()


def publish(
    settings: Settings, images: Sequence[bytes], prefix: str, rate: float | None = None
) -> dict[str, int]:
    """Avro ImageRequests; returns request id → the broker record's timestamp."""
    codec = Codec("ImageRequest", settings.schema_registry_url)
    producer = Producer(producer_config(settings, role="bench"))
    stamps: dict[str, int] = {}

    def delivered(err: object, msg: object) -> None:
        assert err is None, err
        stamps[msg.key().decode()] = msg.timestamp()[1]  # type: ignore[attr-defined]

    start = time.perf_counter()
    for i, data in enumerate(images):
        rid = f"{prefix}-{i}"
        record = image_request(rid, data, source="bench", content_type="image/jpeg")
        value = codec.encode(record, settings.topic_images)
        producer.produce(settings.topic_images, value, rid.encode(), on_delivery=delivered)
        producer.poll(0)
        if rate:
            time.sleep(max(0.0, start + (i + 1) / rate - time.perf_counter()))
    if producer.flush(60) or len(stamps) != len(images):
        raise SystemExit(f"only {len(stamps)} of {len(images)} requests were delivered")
    return stamps


def kafka_rate(results: Results, sent: dict[str, int]) -> float:
    """Images/s from the result records' timestamps, not counting the first batch."""
    stamps = sorted(results.ts[k] for k in sent)
    after = [t for t in stamps if t > stamps[0]]
    return len(after) / max((stamps[-1] - stamps[0]) / 1000.0, 1e-3)


@contextlib.contextmanager
def worker_process(settings: Settings, env: dict[str, str]) -> Iterator[Results]:
    """A warmed-up worker subprocess (model loaded, partitions assigned) and a result reader."""
    results = Results(settings)
    worker = subprocess.Popen(
        [sys.executable, "-m", "consumer.cli", "--worker-index", "0"],
        env={**os.environ, **env},
        cwd=ROOT,
    )
    try:
        warm = [make_images(1, 99)[0]] * (settings.max_batch * 2)
        results.wait(set(publish(settings, warm, "warm")), 180)
        yield results
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        results.close()


def run_one(
    bootstrap: str,
    model: Path | None,
    cfg: Config,
    images: Sequence[bytes],
    latency_images: int,
    *,
    rounds: int,
) -> dict[str, float]:
    """``rounds`` of (in-process, through Kafka), then in-process once more, then latency.

    The machine is shared, so each Kafka round is compared with the in-process runs just
    before and after it; the reported ratio is the median of those per-round ratios.
    """
    env = bench_env(bootstrap, model, cfg)
    settings = load_settings(env)
    if not settings.model_path.exists():
        raise SystemExit(
            f"no model at {settings.model_path}: pass --model or set QRSIGHT_MODEL_PATH"
        )
    create_topics(settings)
    local: list[float] = []
    kafka: list[float] = []
    with worker_process(settings, env) as results:
        local.append(in_process(settings, images))
        for r in range(rounds):
            sent = publish(settings, images, f"tput{r}")
            results.wait(set(sent), 600)
            kafka.append(kafka_rate(results, sent))
            local.append(in_process(settings, images))
        rate = float(np.median(kafka))
        paced = publish(settings, images[:latency_images], "lat", rate=rate / 2)
        results.wait(set(paced), 300)
        lat = np.array([float(results.ts[k] - t) for k, t in paced.items()])
        stages = {
            name: float(np.mean([t[f"{name}_ms"] for t in results.timings.values()]))
            for name in ("queue", "decode", "infer", "post", "total")
        }
    ratios = [k / ((local[i] + local[i + 1]) / 2) for i, k in enumerate(kafka)]
    row = {
        "in_process": float(np.median(local)),
        "kafka": rate,
        "ratio": float(np.median(ratios)),
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "max_ms": float(lat.max()),
    }
    print(
        f"{cfg.label()}: in-process {row['in_process']:.1f} img/s "
        f"[{' '.join(f'{x:.1f}' for x in local)}] | kafka {rate:.1f} img/s "
        f"[{' '.join(f'{x:.1f}' for x in kafka)}] | ratio {row['ratio']:.3f} "
        f"[{' '.join(f'{x:.2f}' for x in ratios)}] | latency at half rate "
        f"p50 {row['p50_ms']:.0f} ms p95 {row['p95_ms']:.0f} ms max {row['max_ms']:.0f} ms "
        f"(mean ms: {' '.join(f'{k} {v:.0f}' for k, v in stages.items())})",
        flush=True,
    )
    return row


SWEEP = (
    Config(1, 0, 1, 0),
    Config(4, 20, 2, 0),
    Config(8, 50, 2, 0),
    Config(16, 100, 2, 0),
    Config(8, 50, 1, 0),
    Config(8, 50, 2, 1),
)


def machine() -> str:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{cpu}, {os.cpu_count()} cores visible, python {platform.python_version()}, "
        f"onnxruntime {ort.__version__} ({','.join(ort.get_available_providers())})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="M images per measurement")
    parser.add_argument("--latency-images", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, default=None, help="default QRSIGHT_MODEL_PATH")
    parser.add_argument("--max-batch", type=int, default=None)
    parser.add_argument("--max-wait-ms", type=int, default=None)
    parser.add_argument("--decode-threads", type=int, default=None)
    parser.add_argument("--ort-threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="Kafka/in-process rounds")
    parser.add_argument("--sweep", action="store_true", help="a small sweep of the knobs")
    args = parser.parse_args(argv)
    defaults = load_settings({k: v for k, v in os.environ.items() if k.startswith("QRSIGHT_")})
    cfg = Config(
        args.max_batch or defaults.max_batch,
        defaults.max_wait_ms if args.max_wait_ms is None else args.max_wait_ms,
        args.decode_threads or defaults.decode_threads,
        (defaults.ort_intra_threads or 0) if args.ort_threads is None else args.ort_threads,
    )
    print(f"machine: {machine()}", flush=True)
    t0 = time.perf_counter()
    images = make_images(args.images, args.seed)
    mean_kb = sum(map(len, images)) / len(images) / 1024
    print(
        f"{len(images)} JPEGs 640x480 (mean {mean_kb:.0f} KiB), seed {args.seed}, "
        f"made in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    configs = SWEEP if args.sweep else (cfg,)
    with broker() as bootstrap:
        rows = [
            run_one(bootstrap, args.model, c, images, args.latency_images, rounds=args.rounds)
            for c in configs
        ]
    best = max(rows, key=lambda r: r["kafka"])
    if not args.sweep:
        print(f"ratio = {best['ratio']:.3f} (goal >= 0.90)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
