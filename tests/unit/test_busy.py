"""The host's busy board: a worker sees another worker's model run, never its own, and a
restarted worker clears the mark its killed predecessor left."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.runtime.busy import BusyBoard, board_path
from core.vision.detector import Detector
from tests.unit.onnx_models import make_dark_cell_model


def _hold(directory: str, started: Any, release: Any) -> None:
    board = BusyBoard("g", 1, Path(directory))
    with board.running():
        started.set()
        release.wait(30)


def test_a_worker_sees_another_process_running_and_not_itself(tmp_path: Path) -> None:
    me = BusyBoard("g", 0, tmp_path)
    assert not me.others_busy()
    with me.running():
        assert not me.others_busy()  # its own run does not count
    ctx = multiprocessing.get_context("spawn")
    started, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold, args=(str(tmp_path), started, release))
    other.start()
    try:
        assert started.wait(30)
        assert me.others_busy()
    finally:
        release.set()
        other.join(30)
    assert not me.others_busy()


def test_groups_have_their_own_board_and_a_restart_clears_a_stale_mark(tmp_path: Path) -> None:
    assert board_path("a/b c", tmp_path).parent == tmp_path
    assert board_path("a", tmp_path) != board_path("b", tmp_path)
    killed = BusyBoard("g", 3, tmp_path)
    killed._map[killed.slot] = 1  # killed mid-run: the mark stays
    other_group = BusyBoard("h", 0, tmp_path)
    me = BusyBoard("g", 0, tmp_path)
    assert me.others_busy() and not other_group.others_busy()
    BusyBoard("g", 3, tmp_path)  # worker 3 restarted
    assert not me.others_busy()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dark_cell_model(tmp_path_factory.mktemp("m") / "dark.onnx", imgsz=160)


def test_a_lone_image_takes_the_solo_session_only_while_the_others_are_idle(
    model: Path, tmp_path: Path
) -> None:
    detector = Detector(model, ["CPUExecutionProvider"], intra_threads=1, solo_threads=2)
    assert detector.solo_session is not None
    used = []
    for name in ("session", "solo_session"):
        real = getattr(detector, name)

        class Spy:
            def __init__(self, real: object, name: str) -> None:
                self.real, self.name = real, name

            def run(self, *args: object) -> object:
                used.append(self.name)
                return self.real.run(*args)  # type: ignore[attr-defined]

        setattr(detector, name, Spy(real, name))
    one = np.full((1, 3, 160, 160), 0.5, np.float32)
    two = np.full((2, 3, 160, 160), 0.5, np.float32)
    detector._run(one)
    detector._run(two)
    detector.busy = BusyBoard("g", 0, tmp_path)
    detector._run(one)
    other = BusyBoard("g", 1, tmp_path)
    with other.running():
        detector._run(one)
    assert used == ["solo_session", "session", "solo_session", "session"]


def test_a_worker_is_busy_for_its_whole_batch_not_only_the_model_run(
    model: Path, tmp_path: Path
) -> None:
    """Pipeline.run marks the board from the first decode to the last record, once per
    batch; a detector without a board runs as before."""
    import cv2

    from core.runtime.settings import load_settings
    from core.vision.pipeline import ImageJob, Pipeline

    marks: list[bool] = []

    class Watching(BusyBoard):
        def others_busy(self) -> bool:
            marks.append(bool(self._map[self.slot]))  # is this worker marked mid-batch?
            return super().others_busy()

    settings = load_settings({}, model_path=model, decode_payloads=False, verifier_path=None)
    detector = Detector(model, ["CPUExecutionProvider"], intra_threads=1, solo_threads=2)
    detector.busy = Watching("g", 0, tmp_path)
    ok, png = cv2.imencode(".png", np.full((64, 64, 3), 40, np.uint8))
    assert ok
    with Pipeline(settings, detector) as pipeline:
        (result,) = pipeline.run([ImageJob("r", png.tobytes())])
    assert result["status"] == "OK"
    assert marks == [True]  # asked once, while the batch was in hand
    assert detector.busy._map[0] == 0  # and cleared after it
