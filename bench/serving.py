"""Serving designs side by side: qrsight (HTTP → Kafka → workers) vs the seed's design vs
the in-process ceiling, with the CPU each process spends per image.

    python -m bench.serving [--models default,ref] [--concurrency 1,4,8,16,32]
                            [--duration 20] [--images ../shared/data/qr-real-dev]
                            [--scaling 1,2] [--out bench/results/serving-DATE]

For each model (``default``: the shipped detector with payload reading and its verifier;
``ref``: the YOLOv8n-sized graph of ``training/yolov8n_ref.py``, random weights seeded,
640x640, payload reading off as in the issue's figures), in one run on one machine:

1. **In-process**: ``Pipeline.run`` on one image at a time in this process (p50 per
   image: the c=1 baseline), and the **ceiling**: N plain processes (N = 1 .. cores, ORT
   threads = cores / N each) running ``Pipeline.run`` over the images in chunks of
   ``QRSIGHT_MAX_BATCH``, no server, no Kafka; the best total img/s over N.
2. **Seed's design** (``bench/seed_server.py``): gunicorn ``-w 4 -k gevent``, one ONNX
   Runtime session per worker, one inference per request.
3. **qrsight** as ``make up`` runs it (``producer_tools.stack.serving_env``: worker
   count and ORT threads from the core count; every other setting its default, except
   ``QRSIGHT_RATE_LIMIT=off``, since every client here has one address): the API under
   gunicorn, the workers, a Kafka broker on this machine.

Each design is driven closed-loop: c client threads, each posting the images one after
another (keep-alive, raw body) for ``--duration`` seconds per level, after a warm-up.
Per level: img/s, p50/p99 latency, errors, and CPU-seconds per image for every process
group (broker, API, workers, seed server, the clients), read from ``/proc`` over the
same window. ``--scaling`` runs qrsight again with QRSIGHT_WORKERS = each value, at the
highest concurrency. Everything goes to ``--out/serving.json``; ``bench/suite.py`` (``make
bench``) turns it into tables and plots.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.runtime.busy import board_path
from core.runtime.settings import Settings, env_name, load_settings
from core.vision.images import CONTENT_TYPES, sniff
from core.vision.pipeline import ImageJob, Pipeline
from producer_tools.stack import serving_env
from producer_tools.topics import create_topics

ROOT = Path(__file__).resolve().parent.parent

KAFKA_SH = ROOT / "deploy" / "local" / "kafka.sh"
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "qr-real-dev"
MODEL_CACHE = ROOT / "runs" / "bench"  # the exported YOLOv8n-sized graph (not committed)


def shown(path: Path) -> str:
    """``path`` as results record it: relative to the repository (``../shared/...`` for a
    data folder beside it), so they name no directory of the machine they ran on."""
    return os.path.relpath(Path(path).resolve(), ROOT)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
READY_TIMEOUT_S = 180.0
SEED_WORKERS = 4
NO_SOLO_DESIGN = "qrsight-no-solo"  # qrsight with QRSIGHT_ORT_SOLO_THREADS = 0
WARM_S = 10.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- images and models -----------------------------------------------------------------------
@dataclass(frozen=True)
class Image:
    name: str
    data: bytes
    content_type: str


def load_images(source: Path, limit: int | None = None) -> list[Image]:
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"no images under {source} (pass --images DIR)")
    out = []
    for path in files[:limit]:
        data = path.read_bytes()
        out.append(Image(str(path.relative_to(source)), data, CONTENT_TYPES[sniff(data)]))
    return out


@dataclass(frozen=True)
class Model:
    """One model served by every design: its file, and whether payloads are read."""

    key: str
    label: str
    path: Path
    decode: bool


def reference_model(folder: Path) -> Path:
    """The YOLOv8n-sized graph (random weights, seeded), exported once into ``folder``."""
    path = folder / "yolov8n-sized.onnx"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        import torch

        from training.yolov8n_ref import export_reference

        torch.manual_seed(0)
        say(f"exporting the YOLOv8n-sized graph to {path}")
        export_reference(path)
    return path


def models(keys: Sequence[str], cache: Path) -> list[Model]:
    base = load_settings({})
    found = {
        "default": lambda: Model(
            "default", f"{base.model_path.stem} (payloads + verifier)", base.model_path, True
        ),
        "ref": lambda: Model(
            "ref", "YOLOv8n-sized graph @640 (no payloads)", reference_model(cache), False
        ),
    }
    unknown = [k for k in keys if k not in found]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}: choose from {sorted(found)}")
    return [found[k]() for k in keys]


# --- CPU time from /proc -----------------------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, float]]:
    """pid → (parent pid, CPU seconds used so far) for every live process."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        # fields[0] is state (field 3); ppid is field 4, utime 14, stime 15
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return table


def tree_cpu(roots: dict[str, Sequence[int]]) -> dict[str, float]:
    """CPU seconds of each role's process trees (the roots and all their descendants).

    Children that exited meanwhile are not counted (their time moves to the parent only
    when it reaps them), so sample while the processes run."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _cpu) in table.items():
        children.setdefault(ppid, []).append(pid)
    out = {}
    for role, pids in roots.items():
        total, stack, seen = 0.0, list(pids), set()
        while stack:
            pid = stack.pop()
            if pid in seen or pid not in table:
                continue
            seen.add(pid)
            total += table[pid][1]
            stack.extend(children.get(pid, []))
        out[role] = total
    return out


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


# --- closed-loop load --------------------------------------------------------------------------
@dataclass
class Level:
    design: str
    concurrency: int
    images: int
    seconds: float
    img_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_s_per_image: dict[str, float] = field(default_factory=dict)
    # c = 1 only: p50 of the result's own timings and of the round trip outside them
    stages_p50_ms: dict[str, float] = field(default_factory=dict)


def _pct(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def closed_loop(
    url: str,
    images: Sequence[Image],
    concurrency: int,
    *,
    duration_s: float,
    roots: dict[str, Sequence[int]],
    design: str,
) -> Level:
    """``concurrency`` clients posting images back to back for ``duration_s``."""
    parsed = urllib.request.urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    path = parsed.path + (f"?{parsed.query}" if parsed.query else "")
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    # at c = 1 the client also reads each answer's timings (cheap at that rate), to split
    # the round trip into the worker's share and the rest
    stages: list[dict[str, float]] = []
    stop = threading.Event()

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        i = k * 7
        while not stop.is_set():
            img = images[i % len(images)]
            i += 1
            started = time.perf_counter()
            try:
                conn.request("POST", path, img.data, {"Content-Type": img.content_type})
                resp = conn.getresponse()
                body = resp.read()
                ok = resp.status == 200
                if ok and concurrency == 1:
                    rtt = (time.perf_counter() - started) * 1000
                    timings = (json.loads(body).get("timings") or {}) if body else {}
                    if "total_ms" in timings:
                        stages.append(timings | {"outside_ms": rtt - timings["total_ms"]})
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=60)
            if ok:
                lat[k].append((time.perf_counter() - started) * 1000)
            else:
                errors[k] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(concurrency)]
    cpu0, mine0, t0 = tree_cpu(roots), self_cpu(), time.perf_counter()
    for t in threads:
        t.start()
    stop.wait(duration_s)
    stop.set()
    for t in threads:
        t.join(90)
    seconds = time.perf_counter() - t0
    cpu1, mine1 = tree_cpu(roots), self_cpu()
    samples = [x for part in lat for x in part]
    n = len(samples)
    per_image = {role: (cpu1[role] - cpu0[role]) / max(n, 1) for role in roots}
    per_image["client"] = (mine1 - mine0) / max(n, 1)
    return Level(
        design,
        concurrency,
        n,
        seconds,
        n / seconds,
        _pct(samples, 0.5),
        _pct(samples, 0.99),
        sum(errors),
        per_image,
        {k: statistics.median(x[k] for x in stages) for k in stages[0]} if stages else {},
    )


def warm_up(url: str, images: Sequence[Image], count: int) -> None:
    """A few requests (all must succeed): models loaded, partitions assigned, JIT paths run.

    A 503 is retried until READY_TIMEOUT_S: /ready answered by one gunicorn worker says
    nothing of the others, which may still be assigning their reply partitions."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    for img in list(images[:count]) * 2:
        req = urllib.request.Request(
            url, data=img.data, headers={"Content-Type": img.content_type}, method="POST"
        )
        while True:
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    resp.read()
                break
            except urllib.error.HTTPError as exc:
                if exc.code != 503 or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def wait_http(url: str, procs: Sequence[subprocess.Popen[bytes]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args!r} exited with {proc.returncode} while starting")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout_s:.0f}s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- in-process baseline and ceiling -----------------------------------------------------------
def pipeline_settings(model: Model, ort_threads: int) -> Settings:
    return load_settings(
        {}, model_path=model.path, ort_intra_threads=ort_threads, decode_payloads=model.decode
    )


def single_image_ms(model: Model, images: Sequence[Image], duration_s: float) -> list[float]:
    """Per-image latency of ``Pipeline.run([one image])`` in this process, ORT default threads."""
    samples: list[float] = []
    with Pipeline(pipeline_settings(model, 0)) as pipeline:
        for img in images[:4]:
            pipeline.run([ImageJob("warm", img.data)])
        end = time.perf_counter() + duration_s
        i = 0
        while time.perf_counter() < end:
            started = time.perf_counter()
            pipeline.run([ImageJob(f"one-{i}", images[i % len(images)].data)])
            samples.append((time.perf_counter() - started) * 1000)
            i += 1
    return samples


def _plain_process(
    model: Model, ort_threads: int, data: list[bytes], duration_s: float, sync: tuple[Any, Any]
) -> None:
    barrier, out = sync
    pipeline = Pipeline(pipeline_settings(model, ort_threads))
    step = pipeline.settings.max_batch
    jobs = [ImageJob(f"p-{i}", d) for i, d in enumerate(data)]
    pipeline.run(jobs[:step])
    barrier.wait()
    cpu0, t0 = self_cpu(), time.perf_counter()
    done, first = 0, 0
    while time.perf_counter() - t0 < duration_s:
        chunk = [jobs[(first + k) % len(jobs)] for k in range(step)]
        first += step
        done += len(pipeline.run(chunk))
    out.put((done, time.perf_counter() - t0, self_cpu() - cpu0))
    pipeline.close()


def ceiling(model: Model, images: Sequence[Image], duration_s: float) -> list[dict[str, float]]:
    """img/s of N plain ``Pipeline.run`` processes for N = 1 .. cores (ORT threads cores/N)."""
    cores = os.cpu_count() or 1
    ctx = multiprocessing.get_context("spawn")
    rows = []
    data = [img.data for img in images]
    for n in range(1, cores + 1):
        threads = max(1, cores // n)
        barrier, out = ctx.Barrier(n), ctx.Queue()
        procs = [
            ctx.Process(
                target=_plain_process, args=(model, threads, data, duration_s, (barrier, out))
            )
            for _ in range(n)
        ]
        for p in procs:
            p.start()
        parts = [out.get(timeout=duration_s + 300) for _ in procs]
        for p in procs:
            p.join(60)
        img_s = sum(done / sec for done, sec, _ in parts)
        cpu = sum(c for _, _, c in parts) / max(sum(d for d, _, _ in parts), 1)
        rows.append(
            {"processes": n, "ort_threads": threads, "img_s": img_s, "cpu_s_per_image": cpu}
        )
        say(f"  ceiling: {n} process(es) x {threads} ORT thread(s): {img_s:.1f} img/s")
    return rows


# --- the designs -------------------------------------------------------------------------------
@contextlib.contextmanager
def broker(
    env_extra: dict[str, str] | None = None, root: Path = ROOT
) -> Iterator[tuple[str, list[int]]]:
    """(bootstrap, pids to account): ``QRSIGHT_KAFKA_BOOTSTRAP`` (not accounted), else a
    broker of our own on a free port in a temp dir, stopped at the end.

    ``env_extra`` reaches ``deploy/local/kafka.sh`` (``KAFKA_HEAP_OPTS``,
    ``KAFKA_JVM_PERFORMANCE_OPTS``, ``KAFKA_OVERRIDES``); ``root`` is the checkout whose
    ``kafka.sh`` and server template start it (the jars are this checkout's)."""
    external = os.environ.get("QRSIGHT_KAFKA_BOOTSTRAP")
    if external and env_extra is None and root == ROOT:
        yield external, []
        return
    with tempfile.TemporaryDirectory(prefix="qrsight-bench-kafka-") as home:
        port = free_port()
        env = {**os.environ, "KAFKA_HOME_DIR": home, "QRSIGHT_KAFKA_PORT": str(port)}
        env.setdefault("KAFKA_LIB_DIR", str(ROOT / ".kafka" / "lib"))
        env.update(env_extra or {})
        env.pop("KAFKA_CONTROLLER_PORT", None)
        script = root / "deploy" / "local" / "kafka.sh"
        say(f"starting a Kafka broker on 127.0.0.1:{port} ({script})")
        subprocess.run([str(script), "up"], env=env, check=True, capture_output=True)
        try:
            pid = int((Path(home) / "kafka.pid").read_text().strip())
            yield f"127.0.0.1:{port}", [pid]
        finally:
            subprocess.run([str(script), "down"], env=env, check=False, capture_output=True)


@contextlib.contextmanager
def seed_server(model: Model, logs: Path) -> Iterator[tuple[str, dict[str, list[int]]]]:
    port = free_port()
    app = f"bench.seed_server:create_app(model={str(model.path)!r})"
    cmd = [sys.executable, "-m", "gunicorn", "-w", str(SEED_WORKERS), "-k", "gevent"]
    cmd += ["-b", f"127.0.0.1:{port}", "--timeout", "120", app]
    with open(logs / f"seed-{model.key}.log", "ab") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log)
        try:
            wait_http(f"http://127.0.0.1:{port}/health", [proc], READY_TIMEOUT_S)
            query = "" if model.decode else "?decode=false"
            yield f"http://127.0.0.1:{port}/detect{query}", {"seed": [proc.pid]}
        finally:
            stop_all([proc])


@contextlib.contextmanager
def qrsight(
    model: Model,
    bootstrap: str,
    logs: Path,
    workers: int | None = None,
    *,
    root: Path = ROOT,
    env_extra: dict[str, str] | None = None,
    name: str = "",
) -> Iterator[tuple[str, dict[str, list[int]], int]]:
    """The API and the workers as `make up` starts them, on fresh topics.

    ``root``: the checkout whose code runs (``bench/kafka_cost.py`` compares revisions);
    ``env_extra``: settings on top of `make up`'s (e.g. ``QRSIGHT_KAFKA__*``)."""
    uid = uuid.uuid4().hex[:8]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("QRSIGHT_")}
    environ.update(
        {
            env_name("kafka_bootstrap"): bootstrap,
            env_name("topic_images"): f"bench.{uid}.images",
            env_name("topic_detections"): f"bench.{uid}.detections",
            env_name("topic_replies"): f"bench.{uid}.replies",
            env_name("topic_dlq"): f"bench.{uid}.dlq",
            env_name("consumer_group"): f"bench-{uid}",
            env_name("api_host"): "127.0.0.1",
            env_name("api_port"): str(free_port()),
            env_name("metrics_port"): "0",
            env_name("rate_limit"): "off",
            env_name("model_path"): str(model.path),
            "PYTHONPATH": str(root),
        }
    )
    environ.update(env_extra or {})
    if workers is not None:
        environ[env_name("workers")] = str(workers)
    settings = load_settings(environ)
    count, env = serving_env(settings, environ)
    create_topics(settings)
    procs: list[subprocess.Popen[bytes]] = []
    with open(logs / f"qrsight-{name or model.key}-{count}w.log", "ab") as log:
        try:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "consumer.cli", "--workers", str(count)],
                    cwd=root,
                    env=env,
                    stdout=log,
                    stderr=log,
                )
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "api.cli"], cwd=root, env=env, stdout=log, stderr=log
                )
            )
            base = f"http://127.0.0.1:{settings.api_port}"
            wait_http(f"{base}/api/v1/ready", procs, READY_TIMEOUT_S)
            query = "" if model.decode else "?decode=false"
            roots = {"workers": [procs[0].pid], "api": [procs[1].pid]}
            yield f"{base}/api/v1/detect{query}", roots, count
        finally:
            stop_all(procs)
            # the workers' busy board of this run's group (a solo session's), not left behind
            board_path(settings.consumer_group).unlink(missing_ok=True)


@dataclass(frozen=True)
class Plan:
    """What every design is run with."""

    images: Sequence[Image]
    levels: Sequence[int]
    duration_s: float
    scaling: Sequence[int]
    logs: Path


def drive(
    design: str, url: str, roots: dict[str, list[int]], plan: Plan, levels: Sequence[int]
) -> list[Level]:
    images, duration_s = plan.images, plan.duration_s
    warm_up(url, images, 4)
    # a warm-up under load: the broker's JIT, the servers' pools and caches, not counted
    closed_loop(
        url, images, max(levels), duration_s=min(duration_s, WARM_S), roots=roots, design=design
    )
    out = []
    for c in levels:
        level = closed_loop(url, images, c, duration_s=duration_s, roots=roots, design=design)
        cpu = " ".join(f"{k} {v * 1000:.1f}" for k, v in level.cpu_s_per_image.items())
        say(
            f"  {design} c={c}: {level.img_s:.1f} img/s p50 {level.p50_ms:.0f} ms "
            f"p99 {level.p99_ms:.0f} ms errors {level.errors} | CPU ms/img: {cpu}"
        )
        out.append(level)
    return out


def run_model(
    model: Model,
    plan: Plan,
    kafka: tuple[str, list[int]],
    progress: Callable[[str], None] = say,
) -> dict[str, Any]:
    images, levels, duration_s, logs = plan.images, plan.levels, plan.duration_s, plan.logs
    progress(f"model {model.label}: in-process, one image at a time")
    single = single_image_ms(model, images, min(duration_s, 10.0))
    progress(f"  in-process p50 {statistics.median(single):.1f} ms per image")
    progress(f"model {model.label}: in-process ceiling")
    ceil = ceiling(model, images, duration_s)
    result: dict[str, Any] = {
        "model": asdict(model) | {"path": shown(model.path)},
        "in_process_ms": {"p50": statistics.median(single), "p99": _pct(single, 0.99)},
        "ceiling": ceil,
        "levels": [],
        "scaling": [],
    }
    progress(f"model {model.label}: the seed's design (gunicorn -w {SEED_WORKERS} -k gevent)")
    with seed_server(model, logs) as (url, roots):
        result["levels"] += [asdict(x) for x in drive("seed", url, roots, plan, levels)]
    bootstrap, broker_pids = kafka
    with qrsight(model, bootstrap, logs) as (url, roots, workers):
        progress(f"model {model.label}: qrsight (`make up` defaults: {workers} worker(s))")
        roots["broker"] = broker_pids
        result["qrsight_workers"] = workers
        result["levels"] += [asdict(x) for x in drive("qrsight", url, roots, plan, levels)]
    # the same without the solo session for a lone image (QRSIGHT_ORT_SOLO_THREADS = 0;
    # `make up` gives it every core): what the cores other workers leave idle give
    no_solo = {env_name("ort_solo_threads"): "0"}
    with qrsight(model, bootstrap, logs, env_extra=no_solo, name=f"{model.key}-no-solo") as (
        url,
        roots,
        _,
    ):
        progress(f"model {model.label}: qrsight, no solo session")
        roots["broker"] = broker_pids
        result["levels"] += [asdict(x) for x in drive(NO_SOLO_DESIGN, url, roots, plan, levels)]
    for n in plan.scaling:
        with qrsight(model, bootstrap, logs, workers=n) as (url, roots, _):
            progress(f"model {model.label}: qrsight with {n} worker(s), c={max(levels)}")
            roots["broker"] = broker_pids
            row = drive(f"qrsight-{n}w", url, roots, plan, [max(levels)])[0]
            result["scaling"].append(asdict(row) | {"workers": n})
    return result


def machine() -> dict[str, Any]:
    import platform
    from importlib import metadata

    import gunicorn
    import onnxruntime as ort
    from confluent_kafka import libversion, version

    cpu = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    kafka_version = next(iter(sorted((ROOT / ".kafka" / "lib").glob("kafka_2*.jar"))), None)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "confluent_kafka": version()[0],
        "librdkafka": libversion()[0],
        "kafka_broker_jar": kafka_version.name if kafka_version else "?",
        "flask": metadata.version("flask"),
        "gunicorn": gunicorn.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default,ref", help="default and/or ref")
    parser.add_argument("--concurrency", default="1,4,8,16,32")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--scaling", default="", help="QRSIGHT_WORKERS values to also run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or ROOT / "bench" / "results" / f"serving-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    images = load_images(args.images, args.max_images)
    levels = [int(c) for c in args.concurrency.split(",")]
    scaling = [int(n) for n in args.scaling.split(",") if n]
    report = {"machine": machine(), "images": len(images), "duration_s": args.duration}
    say(f"{len(images)} images from {args.images}; results in {out}")
    plan = Plan(images, levels, args.duration, scaling, out)
    with broker() as kafka:
        report["models"] = [
            run_model(m, plan, kafka) for m in models(args.models.split(","), MODEL_CACHE)
        ]
    (out / "serving.json").write_text(json.dumps(report, indent=1))
    say(f"wrote {out / 'serving.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
