"""A batch's memory budget: a batch of images that are each within the limits must not add
up, decoded, to more memory than the worker has (QRSIGHT_BATCH_MEMORY_MB)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.runtime.settings import REPO_ROOT, Settings, load_settings
from core.vision.images import ImageLimits
from core.vision.pipeline import (
    DEFAULT_BUDGET_BYTES,
    MIB,
    ImageJob,
    Pipeline,
    batch_budget_bytes,
    decoded_bytes,
)
from tests.unit.onnx_models import make_dark_cell_model

ATTACK_PIXELS = 40_000_000  # the default QRSIGHT_MAX_IMAGE_PIXELS
ATTACK_SIZE = (5000, 8000)  # height, width: exactly at the limit

# Runs one batch in a fresh process and reports the process's peak RSS during the run
# (VmHWM after, less VmRSS before: what the batch added at its worst).
MEASURE = """
import json, sys
from pathlib import Path
import cv2, numpy as np
from core.runtime.settings import load_settings
from core.vision.pipeline import ImageJob, Pipeline

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

png, count = Path(sys.argv[1]).read_bytes(), int(sys.argv[2])
small = cv2.imencode(".png", np.full((64, 64, 3), 255, np.uint8))[1].tobytes()
with Pipeline(load_settings()) as pipeline:
    pipeline.run([ImageJob("warm", small)])
    before = status("VmRSS")
    results = pipeline.run([ImageJob(f"r{i}", png) for i in range(count)])
    peak = status("VmHWM")
print(json.dumps({"added": peak - before, "statuses": [r["status"] for r in results]}))
"""


@pytest.fixture(scope="module")
def dark_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dark_cell_model(tmp_path_factory.mktemp("m") / "dark.onnx", imgsz=160)


def solid_rgba16_png(path: Path, size: tuple[int, int]) -> Path:
    """A solid-colour 16-bit RGBA PNG: a few hundred KB that decode to 8 bytes a pixel."""
    pixels = np.full((*size, 4), (40000, 30000, 20000, 50000), np.uint16)
    ok, buf = cv2.imencode(".png", pixels)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def peak_added(png: Path, count: int, model: Path, budget_mb: int) -> tuple[int, list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRSIGHT_")}
    env |= {
        "PYTHONPATH": str(REPO_ROOT),
        "QRSIGHT_MODEL_PATH": str(model),
        "QRSIGHT_VERIFIER_PATH": "off",
        "QRSIGHT_ORT_INTRA_THREADS": "1",
        "QRSIGHT_BATCH_MEMORY_MB": str(budget_mb),
    }
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(png), str(count)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return int(report["added"]), list(report["statuses"])


@pytest.mark.slow
def test_a_batch_of_maximal_16bit_rgba_pngs_stays_within_the_memory_budget(
    dark_model: Path, tmp_path: Path
) -> None:
    """Eight solid-colour 16-bit RGBA PNGs at the pixel limit (each accepted on its own)
    took a worker past 1.5 GiB when a batch held every decoded image at once."""
    png = solid_rgba16_png(tmp_path / "attack.png", ATTACK_SIZE)
    budget_mb = 768
    added, statuses = peak_added(png, 8, dark_model, budget_mb)
    assert statuses == ["OK"] * 8
    assert added <= budget_mb * MIB, f"peak RSS grew by {added / MIB:.0f} MiB"


def test_a_batch_runs_in_parts_that_fit_the_budget_with_the_same_results(
    dark_model: Path, tmp_path: Path
) -> None:
    images = [np.full((200 + 40 * i, 300, 3), 255, np.uint8) for i in range(6)]
    for i, img in enumerate(images):
        img[50:120, 60 + 10 * i : 130 + 10 * i] = 0
    jobs = [
        ImageJob(f"r{i}", cv2.imencode(".png", img)[1].tobytes()) for i, img in enumerate(images)
    ]
    base = load_settings({}, model_path=dark_model, verifier_path=None, max_batch=4)
    costs = [decoded_bytes(j.data, ImageLimits.from_settings(base)) for j in jobs]
    budget = costs[0] + costs[1]  # bytes: the first two together, then one or two at a time
    with Pipeline(base) as whole, Pipeline(base) as split:
        split.budget_bytes = budget
        parts = split.parts(jobs)
        assert len(parts) > 2 and [i for p in parts for i in p] == list(range(6))
        assert all(sum(costs[i] for i in p) <= budget for p in parts if len(p) > 1)
        expected, got = whole.run(jobs), split.run(jobs)
    strip = [{k: v for k, v in r.items() if k not in ("timings", "created_at")} for r in expected]
    assert [
        {k: v for k, v in r.items() if k not in ("timings", "created_at")} for r in got
    ] == strip


def test_an_image_over_the_budget_runs_alone(dark_model: Path) -> None:
    small = cv2.imencode(".png", np.full((64, 64, 3), 255, np.uint8))[1].tobytes()
    big = cv2.imencode(".png", np.full((1000, 1000, 3), 255, np.uint8))[1].tobytes()
    settings = load_settings({}, model_path=dark_model, verifier_path=None)
    with Pipeline(settings) as pipeline:
        pipeline.budget_bytes = decoded_bytes(big, pipeline.limits) // 2
        jobs = [ImageJob(n, d) for n, d in (("a", small), ("b", big), ("c", small))]
        assert pipeline.parts(jobs) == [[0], [1], [2]]
        assert [r["status"] for r in pipeline.run(jobs)] == ["OK"] * 3


@pytest.mark.parametrize(
    ("fmt", "per_pixel"), [(".jpg", 6), (".png", 18), (".webp", 9), (".bmp", 9)]
)
def test_decoded_bytes_from_the_header(fmt: str, per_pixel: int) -> None:
    data = cv2.imencode(fmt, np.zeros((100, 150, 3), np.uint8))[1].tobytes()
    limits = ImageLimits(10**8, 10**5, 10**8)
    assert decoded_bytes(data, limits) == 100 * 150 * per_pixel
    assert decoded_bytes(b"not an image", limits) == 0


@pytest.mark.parametrize(
    ("setting", "limit", "expected"),
    [
        (None, None, DEFAULT_BUDGET_BYTES),
        (None, 2 << 30, 512 * MIB),  # the Kubernetes worker limit, 2 GiB
        (100, 2 << 30, 100 * MIB),
    ],
)
def test_the_budget_defaults_to_a_quarter_of_the_memory_limit(
    setting: int | None, limit: int | None, expected: int
) -> None:
    settings: Settings = load_settings({}, batch_memory_mb=setting)
    assert batch_budget_bytes(settings, limit) == expected
