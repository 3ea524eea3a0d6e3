"""End to end on one GPU: images/s through Kafka with 1, 2, 4 worker processes sharing it.

    python -m bench.gpu_e2e --out DIR [--budget-s 400] [--images 4000] [--workers 1,2,4]
                                [--models default,ref] [--decoders nvimgcodec,cpu] [--dry-run]

Run by ``bench/gpu_e2e.sh`` on the GPU machine (a broker started there, on the same
host as the workers, as issue 21 asks). For each (model, decoder, workers) — in the order
that gives the most important figures first, while the time budget lasts:

1. fresh topics (8 partitions) and ``python -m consumer.cli --workers N`` with the GPU
   defaults of ``core/runtime/gpu.py`` (each worker on the GPU, one ORT thread, payload threads =
   cores / N), ``QRSIGHT_MAX_BATCH=32`` and ``QRSIGHT_DECODE_THREADS=4`` as the GPU
   overlay sets them, and ``QRSIGHT_IMAGE_DECODER`` = ``nvimgcodec`` (JPEGs decoded on the
   GPU) or ``cpu`` (OpenCV);
2. wait until the group has N members, then a warm-up burst (every worker's padded batch
   shape, cuDNN's algorithm search, nvJPEG's buffers);
3. the measured burst: ``--images`` Avro ``ImageRequest`` s (640x480 JPEGs with 1 to 3 QR
   codes, ``bench/pipeline.py``'s maker) produced as fast as one producer goes; img/s =
   the middle 90 % of the results divided by the time between their broker timestamps;
   every result must be ``OK``. CPU (``/proc/stat``) and GPU (``nvidia-smi``) use are
   sampled during the burst, and the mean stage times come from the results' ``timings``.

Models: ``default`` = the shipped detector with payload reading and the verifier;
``ref`` = the YOLOv8n-sized graph of ``training/yolov8n_ref.py`` at 640 (random weights:
its scores are noise around 0.5, so ``QRSIGHT_CONF_THRESHOLD=0.9`` keeps its boxes out and
payload reading is off — it measures decoding, letterbox, a YOLOv8n's inference and Kafka;
NMS on thousands of noise boxes per image would measure nothing a trained model does).

Writes ``results.jsonl`` (a row per configuration, as it ends), ``results.json`` and
``results.md`` (the table, the goals: >= 1,500 img/s with the default model, >= 1,000 img/s
with the YOLOv8n-sized graph) to ``--out``. ``--dry-run``: CPU provider, tiny sizes, to
check the whole path on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from bench.pipeline import broker, make_images
from core.runtime.kafka import consumer_config, producer_config
from core.runtime.results import image_request
from core.runtime.settings import Settings, load_settings
from producer_tools.topics import create_topics
from schemas.codec import Codec

ROOT = Path(__file__).resolve().parent.parent

GOALS = {"default": 1500.0, "ref": 1000.0}
PARTITIONS = 8
REF_CONF = "0.9"  # above every score of the reference graph (0.5 zeroed, about 0.53 random)
# a case that takes longer has failed (a worker crash loop, a hang): the others still run
JOIN_TIMEOUT_S = 90
WARM_TIMEOUT_S = 120
BURST_TIMEOUT_S = 90


@dataclass(frozen=True)
class Case:
    model: str  # default | ref
    decoder: str  # nvimgcodec | cpu
    workers: int

    @property
    def label(self) -> str:
        return f"{self.model} decoder={self.decoder} workers={self.workers}"


@dataclass
class Row:
    case: Case
    img_s: float = 0.0
    images: int = 0
    ok: int = 0
    detections_per_image: float = 0.0
    produce_img_s: float = 0.0
    cpu_busy_pct: float = 0.0
    gpu_util_pct: float | None = None
    gpu_mem_mib: float | None = None
    stage_ms: dict[str, float] = field(default_factory=dict)
    startup_s: float = 0.0
    seconds: float = 0.0
    error: str | None = None


def plan(models: Sequence[str], decoders: Sequence[str], workers: Sequence[int]) -> list[Case]:
    """Every combination, most important first: the default model before the reference,
    then for each decoder the worker counts in order."""
    return [Case(m, d, w) for m in models for d in decoders for w in workers]


def say(message: str) -> None:
    print(f"[gpu-e2e {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- settings per case -----------------------------------------------------------------------
def case_env(
    case: Case, bootstrap: str, ref_model: Path | None, *, dry_run: bool, max_batch: int
) -> dict[str, str]:
    uid = uuid.uuid4().hex[:8]
    env = {
        "QRSIGHT_KAFKA_BOOTSTRAP": bootstrap,
        "QRSIGHT_TOPIC_IMAGES": f"qr.gpu.{uid}.images",
        "QRSIGHT_TOPIC_DETECTIONS": f"qr.gpu.{uid}.detections",
        "QRSIGHT_TOPIC_REPLIES": f"qr.gpu.{uid}.replies",
        "QRSIGHT_TOPIC_DLQ": f"qr.gpu.{uid}.dlq",
        "QRSIGHT_CONSUMER_GROUP": f"qrsight-gpu-{uid}",
        "QRSIGHT_TOPIC_PARTITIONS": str(PARTITIONS),
        "QRSIGHT_REPLIES_PARTITIONS": "1",
        "QRSIGHT_METRICS_PORT": "0",
        "QRSIGHT_LOG_LEVEL": "WARNING",
        "QRSIGHT_WORKERS": str(case.workers),
        "QRSIGHT_MAX_BATCH": str(max_batch),
        "QRSIGHT_DECODE_THREADS": "4",
        "QRSIGHT_IMAGE_DECODER": case.decoder,
        "QRSIGHT_STATE_DIR": f"/tmp/qrsight-gpu-e2e/{uid}",
    }
    if case.model == "ref":
        if ref_model is None:
            raise SystemExit(
                "the ref model needs --ref-model (python -m bench.gpu_carry builds it)"
            )
        env.update(
            QRSIGHT_MODEL_PATH=str(ref_model),
            QRSIGHT_IMGSZ="640",
            QRSIGHT_VERIFIER_PATH="off",
            QRSIGHT_DECODE_PAYLOADS="false",
            QRSIGHT_CONF_THRESHOLD=REF_CONF,
        )
    if dry_run:  # the CPU provider, everything else as on the GPU
        env.update(
            QRSIGHT_ONNX_PROVIDERS="CPUExecutionProvider",
            QRSIGHT_PAD_BATCH="true",
            QRSIGHT_DEVICE_PREPROCESS="true",
            QRSIGHT_ORT_INTRA_THREADS="1",
        )
    return env


# --- sampling CPU and GPU use ----------------------------------------------------------------
def cpu_times() -> tuple[float, float]:
    with open("/proc/stat") as f:
        values = [float(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)
    return sum(values) - idle, sum(values)


class GpuSampler:
    """``nvidia-smi`` utilization and memory every 200 ms while running (no GPU: nothing)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        try:
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "200",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        except OSError:
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            with contextlib.suppress(ValueError):
                util, mem = (float(x) for x in line.split(",")[:2])
                self.samples.append((util, mem))

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(5)

    def summary(self) -> tuple[float | None, float | None]:
        if not self.samples:
            return None, None
        arr = np.array(self.samples)
        return float(arr[:, 0].mean()), float(arr[:, 1].max())


# --- Kafka -----------------------------------------------------------------------------------
class Collector:
    """Reads ``qr.detections`` from the start: result key → (broker timestamp, record)."""

    def __init__(self, settings: Settings) -> None:
        conf = consumer_config(
            settings,
            f"gpu-e2e-reader-{uuid.uuid4().hex[:8]}",
            role="gpu-e2e-reader",
            **{"enable.auto.commit": False},
        )
        self.consumer = Consumer(conf)
        self.consumer.assign(
            [
                TopicPartition(settings.topic_detections, p, OFFSET_BEGINNING)
                for p in range(settings.topic_partitions)
            ]
        )
        self.codec = Codec("DetectionResult", settings.schema_registry_url)
        self.topic = settings.topic_detections
        self.got: dict[str, tuple[int, dict[str, Any]]] = {}

    def wait(self, keys: set[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not keys <= self.got.keys():
            if time.monotonic() > deadline:
                missing = len(keys - self.got.keys())
                raise TimeoutError(
                    f"{missing} of {len(keys)} results missing after {timeout_s:.0f}s"
                )
            for msg in self.consumer.consume(2000, 0.2):
                if msg.error() is None:
                    key = (msg.key() or b"").decode()
                    record = self.codec.decode(msg.value(), self.topic)
                    self.got.setdefault(key, (msg.timestamp()[1], record))

    def close(self) -> None:
        self.consumer.close()


def jpegs(count: int, seed: int) -> list[bytes]:
    """``bench/pipeline.py``'s 640x480 JPEGs (photo crops with QR codes); where
    scikit-image's photos cannot be loaded, the same codes on synthetic backgrounds."""
    import bench.pipeline as maker

    try:
        return make_images(count, seed)
    except Exception as exc:  # scikit-image missing or without its bundled photos
        say(f"scikit-image photos unavailable ({exc}): synthetic backgrounds instead")
    rng = np.random.default_rng(seed)
    grid = np.indices((480, 640)).sum(axis=0)[..., None]
    photos = [
        np.clip(rng.normal(128, 40, (480, 640, 3)) + (grid % (37 + 11 * k)), 0, 255).astype(
            np.uint8
        )
        for k in range(6)
    ]
    maker._photos = lambda: photos  # type: ignore[attr-defined]
    return make_images(count, seed)


def encode_requests(images: Sequence[bytes], prefix: str) -> list[tuple[bytes, bytes]]:
    codec = Codec("ImageRequest", None)
    out = []
    for i, data in enumerate(images):
        rid = f"{prefix}-{i}"
        record = image_request(rid, data, source="gpu-e2e", content_type="image/jpeg")
        out.append((rid.encode(), codec.encode(record, "qr.images")))
    return out


def produce(settings: Settings, requests: Sequence[tuple[bytes, bytes]]) -> float:
    """Produces every request; returns the produce rate (img/s, until all acknowledged)."""
    producer = Producer(producer_config(settings, role="gpu-e2e"))
    failed: list[object] = []
    start = time.perf_counter()
    for key, value in requests:
        while True:
            try:
                producer.produce(
                    settings.topic_images,
                    value,
                    key,
                    on_delivery=lambda err, _m: err and failed.append(err),
                )
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(120) or failed:
        raise RuntimeError(f"requests not delivered: {failed[:3]}")
    return len(requests) / (time.perf_counter() - start)


def group_members(admin: AdminClient, group: str) -> int:
    future = admin.describe_consumer_groups([group])[group]
    try:
        return len(future.result(timeout=10).members)
    except Exception:
        return 0


@contextlib.contextmanager
def workers(case: Case, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        out.write(f"\n===== {case.label}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "consumer.cli"],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=out,
        )
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- one case --------------------------------------------------------------------------------
def run_case(
    case: Case,
    env: dict[str, str],
    warm: Sequence[bytes],
    burst: Sequence[bytes],
    log: Path,
) -> Row:
    row = Row(case)
    t0 = time.monotonic()
    settings = load_settings(env)
    create_topics(settings)
    collector = Collector(settings)
    try:
        admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, "log_level": 3})
        with workers(case, env, log) as proc:
            deadline = time.monotonic() + JOIN_TIMEOUT_S
            while group_members(admin, settings.consumer_group) < case.workers:
                if proc.poll() is not None:
                    raise RuntimeError(f"the workers exited with {proc.returncode} (see {log})")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the workers did not all join in {JOIN_TIMEOUT_S} s")
                time.sleep(0.5)
            warm_requests = encode_requests(warm, "warm")
            produce(settings, warm_requests)
            collector.wait({k.decode() for k, _ in warm_requests}, WARM_TIMEOUT_S)
            row.startup_s = time.monotonic() - t0
            requests = encode_requests(burst, "run")
            busy0, total0 = cpu_times()
            with GpuSampler() as gpu:
                row.produce_img_s = produce(settings, requests)
                collector.wait({k.decode() for k, _ in requests}, BURST_TIMEOUT_S)
            busy1, total1 = cpu_times()
            row.gpu_util_pct, row.gpu_mem_mib = gpu.summary()
        row.cpu_busy_pct = 100.0 * (busy1 - busy0) / max(total1 - total0, 1e-9)
        measure(row, collector, [k.decode() for k, _ in requests])
    except Exception as exc:  # one failing case must not lose the others' figures
        row.error = f"{type(exc).__name__}: {exc}"
    finally:
        collector.close()
        row.seconds = time.monotonic() - t0
    return row


def measure(row: Row, collector: Collector, keys: Sequence[str]) -> None:
    results = [collector.got[k] for k in keys]
    stamps = np.sort(np.array([ts for ts, _ in results], np.float64))
    lo, hi = int(len(stamps) * 0.05), max(int(len(stamps) * 0.95) - 1, 0)
    span_s = max((stamps[hi] - stamps[lo]) / 1000.0, 1e-3)
    row.images = len(results)
    row.img_s = (hi - lo) / span_s if hi > lo else 0.0
    records = [r for _, r in results]
    row.ok = sum(r["status"] == "OK" for r in records)
    row.detections_per_image = float(np.mean([len(r["detections"]) for r in records]))
    timings = [r["timings"] for r in records if r.get("timings")]
    row.stage_ms = {
        name: float(np.mean([t[f"{name}_ms"] for t in timings]))
        for name in ("queue", "decode", "infer", "post", "total")
        if timings
    }
    if row.ok != row.images:
        row.error = f"{row.images - row.ok} result(s) not OK"


# --- preflight: the GPU paths are on, in one process -----------------------------------------
def preflight(images: Sequence[bytes], max_batch: int, *, dry_run: bool) -> dict[str, Any]:
    """Each decoder's pipeline in this process: which paths are on (CUDA provider, device
    letterbox, nvImageCodec on the GPU) and its img/s without Kafka (one process)."""
    from core.vision.pipeline import ImageJob, Pipeline

    base = {"QRSIGHT_MAX_BATCH": str(max_batch), "QRSIGHT_DECODE_THREADS": "4"}
    if dry_run:
        base.update(
            QRSIGHT_ONNX_PROVIDERS="CPUExecutionProvider",
            QRSIGHT_PAD_BATCH="true",
            QRSIGHT_DEVICE_PREPROCESS="true",
        )
    found: dict[str, Any] = {}
    jobs = [ImageJob(f"pre-{i}", d) for i, d in enumerate(images)]
    for decoder in ("nvimgcodec", "cpu"):
        settings = load_settings({**base, "QRSIGHT_IMAGE_DECODER": decoder})
        with Pipeline(settings) as pipeline:
            gpu = pipeline._gpu_decoder
            facts: dict[str, Any] = {
                "providers": pipeline.detector.providers,
                "device_letterbox": pipeline.detector.letterbox is not None,
                "gpu_decoder": None if gpu is None else ("cpu-backend" if gpu.cpu_only else "gpu"),
            }
            if gpu is not None:
                (image,) = gpu._decode([images[0]])
                facts["nvimgcodec_buffer"] = None if image is None else str(image.buffer_kind)
            pipeline.run(jobs[:max_batch])  # warm-up
            start = time.perf_counter()
            for first in range(0, len(jobs), max_batch):
                done = pipeline.run(jobs[first : first + max_batch])
                assert all(r["status"] == "OK" for r in done), done[0].get("error")
            facts["in_process_img_s"] = round(len(jobs) / (time.perf_counter() - start), 1)
        found[decoder] = facts
    return found


def preflight_problems(found: dict[str, Any]) -> list[str]:
    """What makes the GPU figures meaningless: no CUDA, or no GPU decoding."""
    gpu = found.get("nvimgcodec", {})
    problems = []
    if not gpu.get("providers") or gpu["providers"][0] != "CUDAExecutionProvider":
        problems.append(f"the detector does not run on CUDA: {gpu.get('providers')}")
    if gpu.get("gpu_decoder") != "gpu" or "DEVICE" not in str(gpu.get("nvimgcodec_buffer")):
        problems.append(
            f"nvImageCodec does not decode on the GPU: {gpu.get('gpu_decoder')}, "
            f"{gpu.get('nvimgcodec_buffer')}"
        )
    if not gpu.get("device_letterbox"):
        problems.append("the device letterbox is off")
    return problems


# --- report ----------------------------------------------------------------------------------
def markdown(rows: Sequence[Row], machine: dict[str, Any]) -> str:
    lines = [
        "# GPU end to end (bench/gpu_e2e.py)",
        "",
        "```",
        json.dumps(machine, indent=1),
        "```",
        "",
        "| model | decoder | workers | img/s | goal | CPU busy | GPU util | ms decode / infer"
        " / post / queue | OK | startup s | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        goal = GOALS.get(r.case.model, 0.0)
        met = "met" if r.img_s >= goal else "missed"
        gpu = "—" if r.gpu_util_pct is None else f"{r.gpu_util_pct:.0f} %"
        stages = " / ".join(
            f"{r.stage_ms.get(s, float('nan')):.1f}" for s in ("decode", "infer", "post", "queue")
        )
        lines.append(
            f"| {r.case.model} | {r.case.decoder} | {r.case.workers} | {r.img_s:,.0f} | "
            f"{goal:,.0f} ({met}) | {r.cpu_busy_pct:.0f} % | {gpu} | {stages} | "
            f"{r.ok}/{r.images} | {r.startup_s:.0f} | {r.error or ''} |"
        )
    return "\n".join(lines) + "\n"


def machine_info(dry_run: bool) -> dict[str, Any]:
    import onnxruntime as ort

    from core.runtime.gpu import visible_gpus

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "visible_gpus": visible_gpus(),
        "dry_run": dry_run,
    }
    with contextlib.suppress(Exception):
        from nvidia import nvimgcodec

        info["nvimgcodec"] = nvimgcodec.__version__
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        query = [
            "nvidia-smi",
            "--query-gpu=name,driver_version,memory.total",
            "--format=csv,noheader",
        ]
        info["gpu"] = subprocess.run(
            query, check=False, capture_output=True, text=True, timeout=20
        ).stdout.strip()
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--budget-s", type=float, default=400.0, help="stop starting new cases after"
    )
    parser.add_argument("--images", type=int, default=4000, help="measured images per case")
    parser.add_argument("--unique", type=int, default=1000, help="distinct JPEGs made")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--models", default="default,ref")
    parser.add_argument("--decoders", default="nvimgcodec,cpu")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--ref-model", type=Path, default=None)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="QRSIGHT_X=VALUE",
        help="a setting for every case's workers (repeatable), e.g. QRSIGHT_READ_WHOLE_IMAGE=false",
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU provider, tiny sizes")
    args = parser.parse_args(argv)
    start = time.monotonic()
    extra = dict(item.split("=", 1) for item in args.set)
    if not all(k.startswith("QRSIGHT_") for k in extra):
        parser.error("--set takes QRSIGHT_NAME=VALUE")
    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.dry_run)
    machine["settings"] = extra
    say(f"machine: {json.dumps(machine)}")
    cases = plan(
        args.models.split(","), args.decoders.split(","), [int(w) for w in args.workers.split(",")]
    )
    unique = jpegs(args.unique, seed=21)
    burst = [unique[i % len(unique)] for i in range(args.images)]
    warm = unique[: args.max_batch * 4]
    say(
        f"{len(unique)} distinct 640x480 JPEGs (mean {np.mean([len(u) for u in unique]) / 1024:.0f}"
        f" KiB), {len(burst)} per case, {len(cases)} cases"
    )
    found = preflight(unique[: args.max_batch * 8], args.max_batch, dry_run=args.dry_run)
    machine["preflight"] = found
    say(f"preflight: {json.dumps(found)}")
    problems = [] if args.dry_run else preflight_problems(found)
    if problems:
        (args.out / "results.json").write_text(json.dumps({"machine": machine}, indent=1))
        say("PREFLIGHT FAILED, no Kafka runs: " + "; ".join(problems))
        return 2
    rows: list[Row] = []
    log = args.out / "workers.log"
    with broker() as bootstrap:
        for case in cases:
            spent = time.monotonic() - start
            typical = max((r.seconds for r in rows), default=30.0)
            if spent + typical > args.budget_s:
                say(f"time budget: skipping {case.label} ({spent:.0f} s spent)")
                continue
            env = case_env(
                case, bootstrap, args.ref_model, dry_run=args.dry_run, max_batch=args.max_batch
            )
            env.update(extra)
            row = run_case(case, env, warm, burst, log)
            rows.append(row)
            say(
                f"{case.label}: {row.img_s:,.0f} img/s (CPU {row.cpu_busy_pct:.0f} %, GPU "
                f"{row.gpu_util_pct} %, stages {row.stage_ms}, {row.seconds:.0f} s)"
                + (f" ERROR {row.error}" if row.error else "")
            )
            with (args.out / "results.jsonl").open("a") as f:
                f.write(json.dumps({**asdict(row), "case": asdict(case)}) + "\n")
    result = {"machine": machine, "rows": [{**asdict(r), "case": asdict(r.case)} for r in rows]}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    (args.out / "results.md").write_text(markdown(rows, machine))
    say(f"done in {time.monotonic() - start:.0f} s: {args.out / 'results.md'}")
    return 0 if rows and not any(r.error for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
