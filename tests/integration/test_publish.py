"""``qrsight-publish`` on a real broker: bounded memory on big folders, and ``--wait``
answers identical to ``qrsight-detect --json`` for the same images."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.runtime.settings import REPO_ROOT, Settings

SAMPLES = REPO_ROOT / "samples"


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRSIGHT_")}
    for name in (
        "kafka_bootstrap",
        "topic_images",
        "topic_detections",
        "topic_replies",
        "topic_dlq",
        "consumer_group",
        "topic_partitions",
        "replies_partitions",
    ):
        env[f"QRSIGHT_{name.upper()}"] = str(getattr(settings, name))
    env.update(extra)
    return env


def peak_rss_mb(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Run a command; return its peak resident memory (MB) and its stderr."""
    proc = subprocess.Popen(
        args, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    with proc.stderr:
        err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, err[-2000:]
    return usage.ru_maxrss / 1024, err


def image_folder(root: Path, count: int, distinct: int = 20) -> Path:
    """``count`` JPEGs of ~150 KB (noisy photos compress badly), as hard links to
    ``distinct`` files: the publisher reads every one of them."""
    rng = np.random.default_rng(7)
    originals = []
    for i in range(distinct):
        noise = rng.integers(0, 255, size=(480, 640, 3), dtype=np.uint8)
        path = root / f"orig-{i}.jpg"
        cv2.imwrite(str(path), noise, [cv2.IMWRITE_JPEG_QUALITY, 90])
        originals.append(path)
    folder = root / f"images-{count}"
    folder.mkdir()
    for i in range(count):
        os.link(originals[i % distinct], folder / f"{i:05d}.jpg")
    return folder


def test_publishing_2000_images_keeps_memory_flat_and_shows_progress(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    env = settings_env(kafka_settings)
    publish = [sys.executable, "-m", "producer_tools.publish"]
    small, small_err = peak_rss_mb([*publish, str(image_folder(tmp_path, 200))], env)
    big, big_err = peak_rss_mb([*publish, str(image_folder(tmp_path, 2000))], env)
    size = (tmp_path / "orig-0.jpg").stat().st_size
    assert size > 100_000
    # 1,800 more images (≈ 270 MB more) may not cost more than the bounded queue (16 MB)
    # and some slack: memory does not grow with the folder.
    assert big - small < 40, (small, big)
    assert "sent=2000 delivered=2000 failed=0 undelivered=0" in big_err
    assert re.search(r"published: .*2000/?\S* *img|2000img", big_err), big_err[-500:]
    assert "sent=200 delivered=200" in small_err


@pytest.fixture
def worker(kafka_settings: Settings, tmp_path: Path) -> Iterator[dict[str, str]]:
    env = settings_env(kafka_settings, QRSIGHT_METRICS_PORT="0", QRSIGHT_MAX_WAIT_MS="10")
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "consumer.cli", "--workers", "1"],
        env=env,
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_wait_output_matches_qrsight_detect(worker: dict[str, str]) -> None:
    def run(*args: str) -> dict[str, dict[str, object]]:
        done = subprocess.run(
            [sys.executable, "-m", *args],
            env=worker,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=180,
            check=True,
        )
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        return {str(r["source"]): r for r in lines}

    waited = run("producer_tools.publish", "samples", "--wait", "--quiet", "--timeout", "60")
    offline = run("producer_tools.detect", "samples", "--json")
    assert set(waited) == set(offline) and len(waited) == 4
    for source, result in waited.items():
        mine, theirs = result, offline[source]
        assert mine["status"] == theirs["status"] == "OK"
        assert mine["image"] == theirs["image"]
        assert mine["model"] == theirs["model"]
        assert same_detections(mine["detections"], theirs["detections"]), source


def same_detections(a: object, b: object) -> bool:
    """Equal boxes, classes and payloads; scores within float noise of a batch change."""
    assert isinstance(a, list) and isinstance(b, list)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        box_x = [x[k] for k in ("x1", "y1", "x2", "y2")]
        box_y = [y[k] for k in ("x1", "y1", "x2", "y2")]
        close_score = abs(x["confidence"] - y["confidence"]) <= 1e-3
        if not (np.allclose(box_x, box_y, atol=0.05) and close_score):
            return False
        if (x["class_id"], x["label"], x["text"]) != (y["class_id"], y["label"], y["text"]):
            return False
    return True
