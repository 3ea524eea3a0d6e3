"""``make up``: the whole local stack in the foreground.

Starts (or reuses) the local Apache Kafka broker, creates the topics, then runs
``qrsight-consumer`` with workers sized to the machine and the API under gunicorn.
Ctrl-C (or SIGTERM) stops what it started in reverse order: API, workers, broker.
Each child runs in its own session, so the terminal's Ctrl-C reaches only this
process and the order holds; children also get SIGTERM if this process dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from core.runtime.errors import QrsightError
from core.runtime.settings import REPO_ROOT, Settings, env_name, load_settings

KAFKA_SCRIPT = REPO_ROOT / "deploy" / "local" / "kafka.sh"
STOP_TIMEOUT_S = 20.0
READY_TIMEOUT_S = 180.0


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the stack process dies (Linux prctl)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Stack:
    settings: Settings
    children: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    started_kafka: bool = False

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        print(f"[stack] starting {name}: {' '.join(args)}", flush=True)
        proc = subprocess.Popen(
            args,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (prctl only; the stack has no threads)
            cwd=REPO_ROOT,
        )
        self.children.append((name, proc))

    def kafka_up(self, env: dict[str, str]) -> None:
        status = subprocess.run(
            [str(KAFKA_SCRIPT), "status"], env=env, capture_output=True, check=False
        )
        self.started_kafka = status.returncode != 0
        subprocess.run([str(KAFKA_SCRIPT), "up"], env=env, check=True)

    def stop(self) -> None:
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                print(f"[stack] stopping {name} (pid {proc.pid})", flush=True)
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    print(f"[stack] {name} did not stop in {STOP_TIMEOUT_S:.0f}s: killing it")
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.children.clear()
        if self.started_kafka:
            print("[stack] stopping Kafka", flush=True)
            subprocess.run([str(KAFKA_SCRIPT), "down"], check=False)
            self.started_kafka = False

    def first_exited(self) -> tuple[str, int] | None:
        for name, proc in self.children:
            code = proc.poll()
            if code is not None:
                return name, code
        return None


def worker_count(settings: Settings, environ: dict[str, str]) -> int:
    """``QRSIGHT_WORKERS`` if set, else one worker per core, at most one per partition.

    One worker per core with one ONNX Runtime thread each (see :func:`serving_env`) gave
    the most images per second on CPU (``bench/serving.py``'s ceiling: N plain processes
    beat one process with N ORT threads, since decoding, NMS and payload reading run in
    Python between the model's runs)."""
    if settings.workers is not None:
        return settings.workers
    return max(1, min(os.cpu_count() or 1, settings.topic_partitions))


def serving_env(settings: Settings, environ: dict[str, str]) -> tuple[int, dict[str, str]]:
    """The worker count and the environment `make up` runs the workers and the API with
    (``bench/serving.py`` uses the same, so its figures are those of `make up`).

    With more than one worker, each also gets a solo session of every core
    (``QRSIGHT_ORT_SOLO_THREADS``): a lone image runs on the cores the others leave idle,
    while they are idle and were lately (``core/runtime/busy.py``; the workers of one
    ``consumer.cli`` share a host's board). Measured against it off, in one run:
    ``python -m bench.routing --compare solo`` (bench/README.md)."""
    workers = worker_count(settings, environ)
    env = dict(environ)
    cores = os.cpu_count() or 2
    env.setdefault(env_name("ort_intra_threads"), str(max(1, cores // workers)))
    if workers > 1:
        env.setdefault(env_name("ort_solo_threads"), str(cores))
    return workers, env


def wait_ready(url: str, stack: Stack, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        exited = stack.first_exited()
        if exited:
            raise RuntimeError(f"{exited[0]} exited with code {exited[1]} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the API was not ready at {url} after {timeout_s:.0f}s")


def banner(settings: Settings, workers: int) -> str:
    base = f"http://127.0.0.1:{settings.api_port}"
    return "\n".join(
        [
            "",
            "qrsight is up:",
            f"  web page   {base}/",
            f"  API        {base}/api/v1/detect   (docs: {base}/api/v1/openapi.json)",
            f"  metrics    {base}/api/v1/metrics, "
            f"http://127.0.0.1:{settings.metrics_port}/metrics (worker 0)",
            f"  Kafka      {settings.kafka_bootstrap}  ({workers} worker process(es))",
            "try:",
            f"  curl -s -F image=@samples/parcel-label.jpg {base}/api/v1/detect",
            "Ctrl-C stops everything.",
            "",
        ]
    )


def run(settings: Settings, environ: dict[str, str]) -> int:
    stack = Stack(settings)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    workers, env = serving_env(settings, environ)
    py = sys.executable
    try:
        stack.kafka_up(env)
        subprocess.run([py, "-m", "producer_tools.topics", "create"], env=env, check=True)
        stack.spawn("workers", [py, "-m", "consumer.cli", "--workers", str(workers)], env)
        stack.spawn("api", [py, "-m", "api.cli"], env)
        wait_ready(f"http://127.0.0.1:{settings.api_port}/api/v1/ready", stack, READY_TIMEOUT_S)
        print(banner(settings, workers), flush=True)
        while not stopping:
            exited = stack.first_exited()
            if exited:
                print(f"[stack] {exited[0]} exited with code {exited[1]}; stopping", flush=True)
                return 1
            time.sleep(0.5)
        return 0
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"[stack] {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.stop()
        print("[stack] stopped", flush=True)


def main() -> int:
    try:
        settings = load_settings()
    except QrsightError as exc:
        print(f"make up: {exc.message}", file=sys.stderr)
        return 2
    return run(settings, dict(os.environ))


if __name__ == "__main__":
    raise SystemExit(main())
