"""The host's busy board: a worker sees another worker's batch, never its own, and how many
cores the others used lately; a restarted worker clears the mark its killed predecessor
left."""

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


class Clock:
    """The host's monotonic clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def busy_for(self, board: BusyBoard, seconds: float) -> None:
        with board.running():
            self.now += seconds


def test_the_others_load_is_their_busy_time_over_the_last_second(tmp_path: Path) -> None:
    clock = Clock()
    me = BusyBoard("g", 0, tmp_path, clock)
    other = BusyBoard("g", 1, tmp_path, clock)
    assert me.others_load() == 0.0  # first look: nothing to compare with
    for _ in range(10):  # another worker at full load: busy 95 ms, then 5 ms between batches
        clock.busy_for(other, 0.095)
        clock.now += 0.005
        me.others_load()
    assert me.others_load() == pytest.approx(0.95)
    assert not me.others_busy() and not me.others_idle(), "idle between two batches only"
    clock.busy_for(me, 0.5)  # this worker's own batches never count: of the last second,
    assert me.others_load() == pytest.approx(0.95 * 0.5)  # the other's half at 0.95
    for _ in range(20):  # one request at a time, alternating: the other runs every other one
        clock.busy_for(other, 0.10)
        clock.now += 0.01
        clock.busy_for(me, 0.10)
        clock.now += 0.01
        me.others_load()
    assert me.others_load() == pytest.approx(0.10 / 0.22, abs=0.05)
    assert me.others_idle()
    with other.running():  # busy now: not idle, whatever its past
        assert not me.others_idle()
    clock.now += 2.0
    assert me.others_load() == pytest.approx(0.0, abs=0.06)


def test_a_marked_slot_counts_its_batch_in_progress(tmp_path: Path) -> None:
    clock = Clock()
    me = BusyBoard("g", 0, tmp_path, clock)
    other = BusyBoard("g", 1, tmp_path, clock)
    me.others_load()
    with other.running():
        clock.now += 1.0
        assert me.others_load() == pytest.approx(1.0)


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
    assert (detector.lone_runs, detector.solo_runs) == (3, 2)  # what the worker exports


def test_a_solo_session_is_kept_only_for_a_model_whose_lone_run_is_long_enough(
    model: Path,
) -> None:
    """The extra threads pay only where a lone image's run is long next to the serving
    path's own costs: a run shorter than ``solo_min_run_ms`` (timed at load) keeps one
    session."""
    kept = Detector(model, ["CPUExecutionProvider"], intra_threads=1, solo_threads=2)
    assert kept.solo_session is not None  # 0: always
    short = Detector(
        model, ["CPUExecutionProvider"], intra_threads=1, solo_threads=2, solo_min_run_ms=10_000
    )
    assert short.solo_session is None
    one_batch = np.full((1, 3, 160, 160), 0.5, np.float32)
    short._run(one_batch)
    assert (short.lone_runs, short.solo_runs) == (0, 0)


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
