"""``qrsight-detect`` as a user runs it: a subprocess on a folder of files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.unit.onnx_models import make_dark_cell_model

REPO = Path(__file__).resolve().parents[2]


def qrsight_detect(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRSIGHT_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "producer_tools.detect", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dark_cell_model(tmp_path_factory.mktemp("model") / "dark.onnx")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """good.png (a black square), notes.jpg (text), sub/broken.jpg (truncated), readme.txt."""
    image = np.full((240, 320, 3), 255, np.uint8)
    image[40:120, 40:120] = 0
    cv2.imwrite(str(tmp_path / "good.png"), image)
    (tmp_path / "notes.jpg").write_text("not an image, whatever the name says\n")
    (tmp_path / "sub").mkdir()
    jpeg = cv2.imencode(".jpg", image)[1].tobytes()
    (tmp_path / "sub" / "broken.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "readme.txt").write_text("skipped: not an image extension\n")
    return tmp_path


def test_json_gives_one_line_per_input_and_goes_on_after_bad_files(
    folder: Path, model: Path
) -> None:
    done = qrsight_detect("--json", "--batch", "2", "--model", model, folder)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    by_source = {Path(r["source"]).relative_to(folder).as_posix(): r for r in records}
    assert len(records) == 3 and set(by_source) == {"good.png", "notes.jpg", "sub/broken.jpg"}
    good = by_source["good.png"]
    assert good["status"] == "OK" and good["image"] == {"width": 320, "height": 240}
    assert good["detections"] and all(
        40 <= d["x1"] < d["x2"] <= 120 and 40 <= d["y1"] < d["y2"] <= 120
        for d in good["detections"]
    )
    assert by_source["notes.jpg"]["error"]["code"] == "unsupported_type"
    assert by_source["sub/broken.jpg"]["error"]["code"] == "corrupt_image"


def test_files_given_by_name_are_sniffed_and_missing_ones_reported(
    folder: Path, model: Path, tmp_path: Path
) -> None:
    annotated = tmp_path / "annotated"
    done = qrsight_detect(
        "--model", model, "--no-decode", "--annotate", annotated,
        folder / "good.png", folder / "readme.txt", folder / "missing.png",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{folder / 'good.png'}: OK 320x240 ")
    assert "ERROR unsupported_type" in lines[1]
    assert "ERROR not_found" in lines[2]
    drawn = cv2.imread(str(annotated / "good.png"))
    assert drawn is not None and drawn.shape == (240, 320, 3)
    assert not np.array_equal(drawn, cv2.imread(str(folder / "good.png")))  # boxes drawn


def test_a_missing_model_is_a_config_error_naming_the_setting(folder: Path, tmp_path: Path) -> None:
    done = qrsight_detect("--json", "--model", tmp_path / "nope.onnx", folder)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "QRSIGHT_MODEL_PATH" in done.stderr and "--model" in done.stderr
    assert str(tmp_path / "nope.onnx") in done.stderr
