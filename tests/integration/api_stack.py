"""The API as it runs in production, for the API suites, the fuzzing and the soak: real
detection workers (``python -m consumer.cli``) and the app under real gunicorn
(``python -m api.cli``) on a free port, on fresh topics of a real broker.

No tests here; ``tests/integration/test_api*.py`` and ``tests/chaos/soak_api.py`` use it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import jwt
import numpy as np
import requests
from pydantic import SecretStr

from core.runtime.settings import DEFAULT_MODEL, Settings, env_name
from producer_tools.topics import create_topics
from tests.integration.kafka_topics import delete_topics, fresh_settings
from tests.unit.onnx_models import make_fixed_output_model
from tests.unit.qr_factory import CodeSpec, scene

REPO = Path(__file__).resolve().parents[2]
KAFKA_SH = REPO / "deploy" / "local" / "kafka.sh"
SECRET = "integration-test-secret-long-enough-for-hs256"
# The stand-in model's one fixed box (YOLOv8 layout, cx cy w h score in a 640 input).
FIXED_BOX = (320.0, 320.0, 200.0, 200.0)
IMAGE_SIZE = 640
BOOT_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a subprocess these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRSIGHT_")}
    for name, value in settings.model_dump(exclude_defaults=True).items():
        if name == "kafka_extra":
            env.update(
                {
                    f"QRSIGHT_KAFKA__{k.upper().replace('.', '_')}": v
                    for k, v in settings.kafka_extra_values().items()
                }
            )
        elif isinstance(value, SecretStr):
            env[env_name(name)] = value.get_secret_value()
        elif isinstance(value, list):
            env[env_name(name)] = ",".join(value)
        elif value is not None:
            env[env_name(name)] = str(value)
    env["PYTHONPATH"] = str(REPO)
    return env


def model_path(tmp: Path) -> tuple[Path, bool]:
    """The shipped model if there is one (real boxes), else a graph with one fixed box."""
    if DEFAULT_MODEL.is_file():
        return DEFAULT_MODEL, True
    out = np.array([[*FIXED_BOX, 0.9]], np.float32).T  # (5, 1)
    return make_fixed_output_model(tmp / "fixed.onnx", out, "yolov8", imgsz=640), False


def qr_png(text: str) -> tuple[bytes, np.ndarray]:
    image, codes = scene(
        [CodeSpec(text, center=(320, 320), module_px=6)], size=(IMAGE_SIZE, IMAGE_SIZE)
    )
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes(), codes[0].xyxy


def token(subject: str, secret: str = SECRET, **claims: Any) -> dict[str, str]:
    signed = jwt.encode({"sub": subject, "exp": int(time.time()) + 3600, **claims}, secret)
    return {"Authorization": f"Bearer {signed}"}


def payloads(body: dict[str, Any]) -> set[str]:
    """The decoded texts of a response (boxes the reader could not decode left out)."""
    return {r["text"] for r in body["results"] if r["text"] is not None}


@dataclass
class Stack:
    url: str
    settings: Settings
    real_model: bool
    procs: list[subprocess.Popen[bytes]]
    api_log: Path
    api: subprocess.Popen[bytes] | None = None  # the gunicorn master (default: the last proc)
    workers_log: Path | None = None
    metrics_dir: Path = field(default_factory=Path)

    def stop(self, drop_topics: bool = True) -> None:
        """Stop the processes (SIGTERM, then SIGKILL) and drop the stack's topics."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if drop_topics:
            delete_topics(self.settings)

    def api_worker_pids(self) -> list[int]:
        """The gunicorn worker processes (children of the master)."""
        master = (self.api or self.procs[-1]).pid
        path = Path(f"/proc/{master}/task/{master}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def metrics(self) -> str:
        return requests.get(f"{self.url}/api/v1/metrics", timeout=10).text


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)


def all_workers_ready(stack: Stack, workers: int) -> bool:
    """Every gunicorn worker has built its app (one partition sample each) and says ready."""
    text = stack.metrics()
    if len(re.findall(r"^qrsight_api_reply_partition\{", text, re.MULTILINE)) != workers:
        return False
    return all(
        requests.get(f"{stack.url}/api/v1/ready", timeout=5).status_code == 200
        for _ in range(4 * workers)
    )


def wait_ready(stack: Stack, workers: int) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while time.monotonic() < deadline:
        for proc in stack.procs:
            assert proc.poll() is None, stack.api_log.read_text()[-3000:]
        try:
            if all_workers_ready(stack, workers):
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise AssertionError("API not ready:\n" + stack.api_log.read_text()[-3000:])


def warm_up(stack: Stack, headers: dict[str, str] | None = None) -> None:
    """One round trip, so the detection worker has loaded its model and joined its group."""
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while time.monotonic() < deadline:
        response = requests.post(
            f"{stack.url}/api/v1/detect?timeout_ms=30000",
            data=qr_png("warm-up")[0],
            headers={"Content-Type": "image/png", **(headers or {})},
            timeout=40,
        )
        if response.status_code == 200:
            return
        assert response.status_code == 504, response.text
    raise AssertionError("no detection answer in time")


def make_stack(
    kafka_bootstrap: str,
    tmp: Path,
    *,
    api_workers: int,
    detection_workers: int,
    **overrides: Any,
) -> Stack:
    uid = uuid.uuid4().hex[:8]
    model, real = model_path(tmp)
    values: dict[str, Any] = {
        "topic_partitions": 2,
        "model_path": model,
        "api_host": "127.0.0.1",
        "api_port": free_port(),
        "api_workers": api_workers,
        "api_threads": 32,
        "metrics_port": free_port(),
        "ort_intra_threads": 1,
        "max_image_bytes": 2_000_000,
    }
    values.update(overrides)
    settings = fresh_settings(kafka_bootstrap, uid, **values)
    create_topics(settings)
    env = settings_env(settings)
    metrics_dir = tmp / f"metrics-{uid}"
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    procs = []
    workers_log = None
    if detection_workers:
        workers_log = tmp / f"workers-{uid}.log"
        procs.append(
            start(
                [sys.executable, "-m", "consumer.cli", "--workers", str(detection_workers)],
                env,
                workers_log,
            )
        )
    api_log = tmp / f"api-{uid}.log"
    api = start([sys.executable, "-m", "api.cli"], env, api_log)
    procs.append(api)
    stack = Stack(
        f"http://127.0.0.1:{settings.api_port}",
        settings,
        real,
        procs,
        api_log,
        api,
        workers_log,
        metrics_dir,
    )
    try:
        wait_ready(stack, api_workers)
    except BaseException:
        stack.stop()
        raise
    return stack


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@contextlib.contextmanager
def broker() -> Iterator[str]:
    """``QRSIGHT_KAFKA_BOOTSTRAP`` if set, else a broker of its own on a free port (stopped
    at the end), for the scripts that run outside pytest (``tests/chaos/soak_api.py``)."""
    external = os.environ.get("QRSIGHT_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="qrsight-kafka-") as home:
        env = {
            **os.environ,
            "KAFKA_HOME_DIR": home,
            "QRSIGHT_KAFKA_PORT": str(port),
            "KAFKA_START_TIMEOUT": os.environ.get("KAFKA_START_TIMEOUT", "180"),
        }
        env.pop("KAFKA_CONTROLLER_PORT", None)
        up = subprocess.run(
            [str(KAFKA_SH), "up"], env=env, capture_output=True, text=True, check=False
        )
        if up.returncode != 0:
            raise RuntimeError(f"{KAFKA_SH} up failed:\n{up.stdout}\n{up.stderr}")
        try:
            yield f"127.0.0.1:{port}"
        finally:
            subprocess.run([str(KAFKA_SH), "down"], env=env, capture_output=True, check=False)
