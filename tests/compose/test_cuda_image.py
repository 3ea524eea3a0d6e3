"""The CUDA image (``deploy/docker/Dockerfile.cuda``), built by ``deploy/local/containers.sh
build-cuda``, checked without a GPU: its entry point, user, onnxruntime-gpu and every
qrsight entry point's imports on its own Python, and the detector end to end on the CPU
provider. (Here its ``nvidia/cuda`` base is a local stand-in without the CUDA libraries, so
nothing here says the CUDA provider runs.)"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
import yaml

from core.runtime.settings import REPO_ROOT

SAMPLES = REPO_ROOT / "samples"
CPU_ONLY = ["-e", "QRSIGHT_ONNX_PROVIDERS=CPUExecutionProvider"]


@pytest.fixture(scope="module")
def image() -> str:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    name = str(compose["services"]["consumer-gpu"]["image"])
    exists = subprocess.run(["podman", "image", "exists", name], check=False, timeout=60)
    assert exists.returncode == 0, f"no {name}: run deploy/local/containers.sh build-cuda"
    return name


def run(image: str, *args: str, options: tuple[str, ...] = ()) -> str:
    done = subprocess.run(
        ["podman", "run", "--rm", *options, image, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_cuda_image_config(image: str) -> None:
    (found,) = json.loads(
        subprocess.run(
            ["podman", "image", "inspect", image], capture_output=True, check=True, timeout=60
        ).stdout
    )
    # built with --format docker: an OCI image config has no HEALTHCHECK
    assert found["Healthcheck"]["Test"][-1] == "/usr/local/bin/qrsight-healthcheck"
    config = found["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["tini", "--"]
    assert config["Cmd"] == ["qrsight-consumer"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["QRSIGHT_ONNX_PROVIDERS"] == "CUDAExecutionProvider,CPUExecutionProvider"


def test_cuda_image_has_onnxruntime_gpu_for_cuda_12(image: str) -> None:
    probe = (
        "import json, importlib.metadata as m, onnxruntime as ort; "
        "print(json.dumps({'providers': ort.get_available_providers(), "
        "'dists': sorted(d.metadata['Name'] for d in m.distributions() "
        "if d.metadata['Name'].startswith('onnxruntime')), 'version': ort.__version__}))"
    )
    found: dict[str, Any] = json.loads(run(image, "python", "-c", probe))
    assert "CUDAExecutionProvider" in found["providers"]
    assert found["dists"] == ["onnxruntime-gpu"], "the CPU onnxruntime must be gone"
    major, minor = (int(part) for part in found["version"].split(".")[:2])
    assert (major, minor) < (1, 27), "onnxruntime-gpu 1.27+ is built for CUDA 13"


def test_every_entry_point_imports_on_the_images_python(image: str) -> None:
    modules = "consumer.cli, api.cli, api.app, producer_tools.topics, producer_tools.detect"
    out = run(image, "python", "-c", f"import sys, {modules}; print(sys.version_info[:2])")
    assert out.strip().startswith("(3, 1")
    assert "qrsight-consumer" in run(image, "qrsight-consumer", "--help")


def test_detector_reads_every_sample_on_the_cpu_provider(image: str) -> None:
    rows = [json.loads(line) for line in (SAMPLES / "manifest.jsonl").read_text().splitlines()]
    out = run(
        image,
        "qrsight-detect",
        "/samples",
        "--json",
        options=(*CPU_ONLY, "-v", f"{SAMPLES}:/samples:ro"),
    )
    results = {
        json.loads(line)["source"].rsplit("/", 1)[-1]: json.loads(line) for line in out.splitlines()
    }
    for row in rows:
        result = results[row["path"]]
        texts = sorted(d["text"] for d in result["detections"] if d.get("text"))
        assert texts == sorted(row["texts"]), row["path"]
