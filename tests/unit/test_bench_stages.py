"""``bench.stages``: its section of ``bench/RESULTS.md`` and its verdict on the zxing-cpp goal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.stages import (
    BEGIN,
    END,
    Before,
    camera_frames,
    dev_photos,
    found_share,
    goal_line,
    write_results,
)


def test_the_stages_section_replaces_its_last_run_and_keeps_the_rest(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## P1\n\ntable\n")
    write_results(f"{BEGIN}\nfirst run\n{END}", results)
    write_results(f"{BEGIN}\nsecond run\n{END}", results)
    text = results.read_text()
    assert "## P1\n\ntable" in text
    assert "second run" in text
    assert "first run" not in text
    assert text.count(BEGIN) == 1


def test_payloads_found_count_each_expected_text_once() -> None:
    assert found_share(["a", "b"], ["b", None, "b", "c"]) == (1, 2)


def result(qrsight_ms: float, zxing_ms: float) -> dict[str, Any]:
    stages = {"decode": 3.0, "letterbox": 1.0, "inference": 4.0, "NMS": 0.5}
    return {
        "readers": {
            "zxing-cpp": {"ms": {"total": zxing_ms}},
            "qrsight Pipeline.run, 1 thread": {"ms": {"total": qrsight_ms}},
            "qrsight stages, 1 thread": {"ms": stages},
        }
    }


def test_the_zxing_goal_is_met_at_twice_its_time_and_missed_above_with_the_reason() -> None:
    assert "(goal ≤ 2x: met)" in goal_line(result(7.0, 3.5))
    missed = goal_line(result(11.0, 3.5))
    assert "**3.14x**" in missed and "missed" in missed
    assert "cost 8.50 ms (2.43x zxing-cpp's whole read" in missed


def test_a_folder_without_a_manifest_gives_its_images_with_no_payload_expected(
    tmp_path: Path,
) -> None:
    ok, buf = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    assert ok
    (tmp_path / "a.png").write_bytes(buf.tobytes())
    (photo,) = dev_photos(tmp_path)
    assert photo.name == "a.png" and photo.texts == () and photo.data == buf.tobytes()


def test_the_goal_line_gives_the_ratio_to_the_pipeline_before_the_issue() -> None:
    measured = result(8.0, 4.0)
    before = {"ms": {"total": 10.0}, "found": 3, "rev": "abc1234"}
    measured["readers"]["qrsight Pipeline.run, before issue 32, 1 thread"] = before
    line = goal_line(measured)
    assert "**2.00x** zxing-cpp's" in line and "met" in line
    assert (
        "(commit abc1234, 10.00 ms on one core, in a process of its own, interleaved) **0.80x**"
        in line
    )
    assert "commit" not in goal_line(result(8.0, 4.0))
    failed = result(8.0, 4.0) | {"before_error": "commit abc1234 not available here"}
    assert "was not measured (commit abc1234 not available here)" in goal_line(failed)


def test_the_pipeline_of_an_earlier_commit_is_timed_on_the_same_images() -> None:
    """``--before`` runs another commit's Pipeline.run from git; here this checkout's HEAD
    on two generated frames, one round (a clone without the commit gets a reason instead)."""
    frames = camera_frames((640, 480), 2, seed=5)
    old = Before("HEAD")
    try:
        assert old.error == ""
        for frame in frames:
            ms, texts = old.time(frame, rounds=1)
            assert ms > 0 and texts == list(frame.texts)
    finally:
        old.close()
    missing = Before("0" * 40)
    assert "not available here" in missing.error
    missing.close()
