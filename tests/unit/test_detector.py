"""The detector end to end on tiny ONNX graphs with known outputs (golden boxes)."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from core.runtime.errors import ConfigError, ModelError
from core.runtime.settings import DEFAULT_MODEL, load_settings
from core.vision.detections import Detections, ModelInfo
from core.vision.detector import Detector, choose_providers, parse_imgsz, parse_names
from tests.unit.onnx_models import make_dark_cell_model, make_fixed_output_model
from tests.unit.qr_factory import CodeSpec, scene

NAMES = {0: "qr", 1: "micro_qr"}

# Golden boxes in the pixels of a 320x240 image (letterboxed to 640: scale 2, pad_y 80).
#        x1,  y1,  x2,  y2, score, class
SCENE = np.array(
    [
        [50, 50, 100, 100, 0.9, 0],  # A: kept
        [52, 52, 102, 102, 0.8, 0],  # B: IoU 0.92 with A, same class: suppressed by NMS
        [52, 52, 102, 102, 0.7, 1],  # C: same place, other class: kept (class-aware)
        [200, 100, 300, 200, 0.3, 0],  # D: kept
        [10, 10, 20, 20, 0.2, 0],  # E: under the 0.25 default confidence
    ],
    np.float32,
)
AFTER_NMS = SCENE[[0, 2, 3]]
AFTER_E2E = SCENE[[0, 1, 2, 3]]  # end-to-end models get no NMS


def scene_in_letterbox() -> np.ndarray:
    """SCENE's boxes in 640x640 letterbox pixels (x*2, y*2+80), as xyxy."""
    boxes = SCENE[:, :4] * 2
    boxes[:, [1, 3]] += 80
    return boxes


def output_for(layout: str) -> np.ndarray:
    """SCENE as the raw output of a model of ``layout``, padded like a real export."""
    xyxy = scene_in_letterbox()
    cxcywh = np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
    scores, classes = SCENE[:, 4], SCENE[:, 5].astype(int)
    onehot = np.eye(len(NAMES), dtype=np.float32)[classes]
    if layout == "yolov8":  # [4+nc, 8400]
        out = np.zeros((4 + len(NAMES), 8400), np.float32)
        out[:4, : len(SCENE)] = cxcywh.T
        out[4:, : len(SCENE)] = (onehot * scores[:, None]).T
    elif layout == "yolov5":  # [25200, 5+nc]: objectness x class score
        out = np.zeros((25200, 5 + len(NAMES)), np.float32)
        out[: len(SCENE), :4] = cxcywh
        out[: len(SCENE), 4] = 1.0
        out[: len(SCENE), 5:] = onehot * scores[:, None]
        out[len(SCENE) :, 4] = 0.01  # background rows: low objectness
    else:  # end2end [300, 6]
        out = np.zeros((300, 6), np.float32)
        out[: len(SCENE), :4] = xyxy
        out[: len(SCENE), 4] = scores
        out[: len(SCENE), 5] = classes
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    paths = {
        layout: make_fixed_output_model(
            root / f"{layout}.onnx", output_for(layout), layout, 640, NAMES
        )
        for layout in ("yolov5", "yolov8", "end2end")
    }
    paths["batch1"] = make_fixed_output_model(
        root / "batch1.onnx", output_for("yolov8"), "yolov8", 640, NAMES, batch=1
    )
    paths["nometa"] = make_fixed_output_model(
        root / "plain-export.onnx",
        output_for("yolov8"),
        "yolov8",
        640,
        {},
        metadata={"description": "", "version": ""},
    )
    paths["dark"] = make_dark_cell_model(root / "dark.onnx")
    return paths


def blank(width: int, height: int) -> np.ndarray:
    return np.full((height, width, 3), 200, np.uint8)


def assert_boxes(dets: Detections, expected: np.ndarray, scale: float = 1.0) -> None:
    assert np.allclose(dets.xyxy, expected[:, :4] * scale, atol=1e-3), dets.xyxy
    assert np.allclose(dets.confidence, expected[:, 4], atol=1e-6)
    assert dets.class_id.tolist() == expected[:, 5].astype(int).tolist()


# --- golden boxes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "expected"),
    [("yolov5", AFTER_NMS), ("yolov8", AFTER_NMS), ("end2end", AFTER_E2E)],
)
def test_golden_boxes_per_layout(
    models: dict[str, Path], layout: str, expected: np.ndarray
) -> None:
    detector = Detector(models[layout])
    assert detector.layout == layout
    # 320x240 (scale 2, pad_y 80) and 640x480 (scale 1, pad_y 80): same letterbox output,
    # so the second image's boxes are the first's times two.
    small, large = detector.predict([blank(320, 240), blank(640, 480)])
    assert_boxes(small, expected)
    assert_boxes(large, expected, scale=2.0)


def test_golden_boxes_of_a_fixed_batch_model_run_one_by_one(
    models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="core.vision.detector"):
        detector = Detector(models["batch1"])
    assert detector.fixed_batch == 1
    assert "fixed batch" in caplog.text
    results = detector.predict([blank(320, 240), blank(640, 480), blank(320, 240)])
    assert len(results) == 3
    assert_boxes(results[1], AFTER_NMS, scale=2.0)
    assert_boxes(results[2], AFTER_NMS)


def dark_squares(n: int) -> list[np.ndarray]:
    """``n`` white 320x240 images, each with a black square somewhere else."""
    images = []
    for i in range(n):
        image = np.full((240, 320, 3), 255, np.uint8)
        x, y = 20 + 37 * i % 240, 10 + 23 * i % 160
        image[y : y + 64, x : x + 64] = 0
        images.append(image)
    return images


def batch_sizes(caplog: pytest.LogCaptureFixture) -> list[int]:
    """The batch sizes the ONNX session ran, from the detector's debug log."""
    return [
        int(r.getMessage().split("batch=")[1].split()[0])
        for r in caplog.records
        if r.getMessage().startswith("inference batch=")
    ]


@pytest.mark.parametrize("count", [1, 3, 4, 6])
def test_padded_batches_run_one_shape_and_give_the_same_boxes(
    models: dict[str, Path], caplog: pytest.LogCaptureFixture, count: int
) -> None:
    images = dark_squares(count)
    plain = Detector(models["dark"]).predict(images)
    padded = Detector(models["dark"], pad_to=4, pad=True)
    with caplog.at_level(logging.DEBUG, logger="core.vision.detector"):
        result = padded.predict(images)
    assert batch_sizes(caplog) == [4] * ((count + 3) // 4)
    assert len(result) == count
    for got, want in zip(result, plain, strict=True):
        assert len(want.xyxy) > 0
        assert np.allclose(got.xyxy, want.xyxy) and np.allclose(got.confidence, want.confidence)


@pytest.mark.parametrize(("pad", "probe"), [(True, [4]), (False, [1])])
def test_loading_probes_symbolic_outputs_with_the_run_shape(
    caplog: pytest.LogCaptureFixture, pad: bool, probe: list[int]
) -> None:
    # the shipped model's anchor axis is symbolic, so loading runs one blank batch; when
    # padding, that batch has the padded shape (on a GPU: the one kernel search it needs)
    with caplog.at_level(logging.DEBUG, logger="core.vision.detector"):
        Detector(DEFAULT_MODEL, pad_to=4, pad=pad)
    assert batch_sizes(caplog) == probe


def test_a_cpu_batch_runs_at_the_smallest_input_that_holds_it() -> None:
    """The shipped model takes any multiple of 32: with QRSIGHT_RECT a 16:9 frame runs at
    416 x 256 on the CPU (Ultralytics' minimal padding) and its code is found where the
    square run finds it; by default, and for padded batches (a GPU's), the square."""
    frame, placed = scene([CodeSpec("rect letterbox", (900, 500), module_px=10)], (1080, 1920))
    rect = Detector.from_settings(load_settings({"QRSIGHT_RECT": "true"}))
    assert rect.rect and rect.preprocess([frame])[0].shape == (1, 3, 256, 416)
    square = Detector(DEFAULT_MODEL)
    assert not square.rect and square.preprocess([frame])[0].shape == (1, 3, 416, 416)
    assert not Detector(DEFAULT_MODEL, rect=True, pad_to=4, pad=True).rect
    (a,), (b,) = rect.predict([frame]), square.predict([frame])
    want = placed[0].xyxy
    assert len(a) == len(b) == 1 and np.abs(a.xyxy[0] - want).max() < 0.1 * (want[2] - want[0])
    assert np.abs(a.xyxy - b.xyxy).max() < 2 and abs(a.confidence[0] - b.confidence[0]) < 0.02
    small = cv2.resize(frame[250:750, 650:1150], (250, 250))  # the code at 5 px a module
    unscaled = Detector(DEFAULT_MODEL, rect=True, scaleup=False)
    assert unscaled.preprocess([small])[0].shape == (1, 3, 256, 256)
    assert len(unscaled.predict([small])[0]) == 1


def test_batches_are_not_padded_on_cpu_by_default(
    models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings({"QRSIGHT_MAX_BATCH": "8"}, model_path=models["dark"])
    detector = Detector.from_settings(settings)
    assert detector.providers == ["CPUExecutionProvider"]
    with caplog.at_level(logging.DEBUG, logger="core.vision.detector"):
        detector.predict(dark_squares(3))
    assert batch_sizes(caplog) == [3]
    forced = {"QRSIGHT_MAX_BATCH": "8", "QRSIGHT_PAD_BATCH": "true"}
    detector = Detector.from_settings(load_settings(forced, model_path=models["dark"]))
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="core.vision.detector"):
        detector.predict(dark_squares(3))
    assert batch_sizes(caplog) == [8]


class _Spy:
    """Counts the runs of the session it wraps."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.batches: list[int] = []

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
        self.batches.append(len(next(iter(feeds.values()))))
        return self.session.run(names, feeds)


def test_a_lone_image_runs_in_the_solo_session_with_the_same_boxes(
    models: dict[str, Path],
) -> None:
    """QRSIGHT_ORT_SOLO_THREADS: a batch of one image runs in the second session (more
    threads), a fuller batch in the main one; the boxes are the same as without it."""
    env = {
        "QRSIGHT_ORT_INTRA_THREADS": "1",
        "QRSIGHT_ORT_SOLO_THREADS": "2",
        "QRSIGHT_ORT_SOLO_MIN_RUN_MS": "0",  # this small graph's lone run is short
    }
    solo = Detector.from_settings(load_settings(env, model_path=models["dark"]))
    plain = Detector(models["dark"], intra_threads=1)
    assert plain.solo_session is None
    main, second = _Spy(solo.session), _Spy(solo.solo_session)
    solo.session, solo.solo_session = main, second
    for images in (dark_squares(1), dark_squares(3)):
        for got, want in zip(solo.predict(images), plain.predict(images), strict=True):
            np.testing.assert_allclose(got.xyxy, want.xyxy)
            np.testing.assert_allclose(got.confidence, want.confidence)
    assert second.batches == [1]
    assert main.batches == [3]


def test_conf_per_call_per_image_and_from_settings(models: dict[str, Path]) -> None:
    detector = Detector(models["yolov8"])
    (only_a,) = detector.predict([blank(320, 240)], conf=0.85)
    assert_boxes(only_a, SCENE[[0]])
    strict, default = detector.predict([blank(320, 240)] * 2, conf=[0.5, None])
    assert_boxes(strict, SCENE[[0, 2]])
    assert_boxes(default, AFTER_NMS)
    settings = load_settings({}, model_path=models["yolov8"], conf_threshold=0.5, max_detections=1)
    (capped,) = Detector.from_settings(settings).predict([blank(320, 240)])
    assert_boxes(capped, SCENE[[0]])


def test_iou_threshold_from_settings_changes_suppression(models: dict[str, Path]) -> None:
    settings = load_settings({}, model_path=models["yolov8"], iou_threshold=0.95)
    (dets,) = Detector.from_settings(settings).predict([blank(320, 240)])
    assert_boxes(dets, SCENE[[0, 1, 2, 3]])  # B survives: its IoU 0.92 is under 0.95


def test_stages_compose_to_predict(models: dict[str, Path]) -> None:
    detector = Detector(models["yolov5"])
    batch, metas = detector.preprocess([blank(320, 240)])
    assert batch.shape == (1, 3, 640, 640) and batch.dtype == np.float32
    raw = detector.infer(batch)
    assert raw.shape == (1, 25200, 7)
    assert_boxes(detector.postprocess(raw, metas)[0], AFTER_NMS)
    assert detector.infer(batch[:0]).shape == (0, 25200, 7)


# --- metadata, loading -------------------------------------------------------------------


def test_model_info_from_ultralytics_metadata(models: dict[str, Path]) -> None:
    info = Detector(models["yolov8"]).info
    assert info == ModelInfo("qrsight test model", "0.0-test", 640, "yolov8", NAMES)
    assert info.to_record() == {
        "name": "qrsight test model",
        "version": "0.0-test",
        "input_size": 640,
    }


def test_model_info_without_metadata_falls_back_to_file_and_shape(models: dict[str, Path]) -> None:
    info = Detector(models["nometa"]).info
    assert (info.name, info.version, info.labels) == ("plain-export", "unknown", {0: "0", 1: "1"})


@pytest.mark.parametrize(
    ("text", "names", "imgsz"),
    [
        ("{0: 'qr'}", {0: "qr"}, None),
        ("{0: 'qr', 1: 'micro'}", {0: "qr", 1: "micro"}, None),
        ("['a', 'b']", {0: "a", 1: "b"}, None),
        ("[640, 640]", {}, (640, 640)),
        ("[384, 640]", {}, (384, 640)),
        ("320", {}, (320, 320)),
        ("__import__('os').system('false')", {}, None),  # never evaluated
        ("{0: 'qr'", {}, None),
        ("", {}, None),
        ("[0, -1]", {}, None),
    ],
)
def test_metadata_parsing_is_literal_only(
    text: str, names: dict[int, str], imgsz: tuple[int, int] | None
) -> None:
    assert parse_names(text) == names
    assert parse_imgsz(text) == imgsz


def test_missing_model_names_the_setting_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(ConfigError, match="QRSIGHT_MODEL_PATH") as info:
        Detector(missing)
    assert str(missing) in info.value.message


def test_a_file_that_is_not_onnx_is_a_model_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match=str(bad)):
        Detector(bad)


def test_providers_default_order_and_override() -> None:
    chosen = choose_providers()
    assert chosen[-1] == "CPUExecutionProvider"
    assert chosen == sorted(
        chosen,
        key=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"].index,
    )
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="QRSIGHT_ONNX_PROVIDERS"):
        choose_providers(["NoSuchExecutionProvider"])


# --- Detections --------------------------------------------------------------------------

F4 = np.zeros((2, 4), np.float32)
F2 = np.zeros(2, np.float32)
I2 = np.zeros(2, np.int64)
CORNERS = np.zeros((4, 2), np.float32)
OK: AbstractContextManager[Any] = nullcontext()


def raises(match: str) -> AbstractContextManager[Any]:
    return pytest.raises(ValueError, match=match)


@pytest.mark.parametrize(
    ("kwargs", "outcome"),
    [
        ({}, OK),
        ({"text": ["a", None], "corners": [CORNERS, None]}, OK),
        ({"xyxy": F4.astype(np.float64), "class_id": I2.astype(np.int32)}, OK),  # cast
        ({"xyxy": np.zeros((2, 5), np.float32)}, raises(r"xyxy must have shape \(N, 4\)")),
        ({"xyxy": np.zeros(4, np.float32)}, raises("xyxy must have shape")),
        ({"xyxy": [[0, 0, 1, 1]] * 2}, raises("xyxy must be a numpy array")),
        ({"xyxy": F4.astype(np.int64)}, raises("xyxy must have dtype")),
        ({"confidence": np.zeros(3, np.float32)}, raises("confidence has 3 entries")),
        ({"confidence": np.zeros((2, 1), np.float32)}, raises("confidence must have shape")),
        ({"class_id": F2}, raises("class_id must have dtype")),
        ({"class_id": np.zeros(1, np.int64)}, raises("class_id has 1 entries")),
        ({"text": ["a"]}, raises("text has 1 entries")),
        ({"text": ["a", 3]}, raises("text entries must be str")),
        ({"corners": [CORNERS]}, raises("corners has 1 entries")),
        ({"corners": [np.zeros((3, 2)), None]}, raises(r"corners\[0\] must be a \(4, 2\)")),
    ],
)
def test_detections_validation(
    kwargs: dict[str, Any], outcome: AbstractContextManager[Any]
) -> None:
    args: dict[str, Any] = {"xyxy": F4, "confidence": F2, "class_id": I2}
    with outcome:
        dets = Detections(**(args | kwargs))
        assert dets.xyxy.dtype == np.float32 and dets.class_id.dtype == np.int64
        assert len(dets) == 2 and len(dets.text or []) == 2 and len(dets.corners or []) == 2


def test_detections_empty_subset_and_records() -> None:
    assert len(Detections.empty()) == 0 and Detections.empty().to_records() == []
    dets = Detections(
        xyxy=np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32),
        confidence=np.array([0.5, 0.25], np.float32),
        class_id=np.array([0, 7]),
        text=["hello", None],
        corners=[np.array([[1, 2], [3, 2], [3, 4], [1, 4]]), None],
    )
    assert len(dets[np.array([False, True])]) == 1
    assert dets.to_records({0: "qr"}) == [
        {
            "x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0, "confidence": 0.5, "class_id": 0,
            "label": "qr", "text": "hello",
            "corners": [
                {"x": 1.0, "y": 2.0}, {"x": 3.0, "y": 2.0},
                {"x": 3.0, "y": 4.0}, {"x": 1.0, "y": 4.0},
            ],
        },
        {
            "x1": 5.0, "y1": 6.0, "x2": 7.0, "y2": 8.0, "confidence": 0.25, "class_id": 7,
            "label": "7", "text": None, "corners": None,
        },
    ]  # fmt: skip
