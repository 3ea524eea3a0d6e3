"""The on-device letterbox (core/vision/letterbox_graph.py), run here on the CPU provider: the same
batch as the host letterbox within one grey level, the same detections through the
detector, and the shipped graph is the one the code builds."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from core.runtime.settings import DEFAULT_MODEL, load_settings
from core.vision.detector import Detector
from core.vision.letterbox_graph import (
    INPUT_NAMES,
    LETTERBOX_MODEL,
    axis_taps,
    build_letterbox_graph,
    letterbox_inputs,
)
from core.vision.postprocess import PAD_VALUE, letterbox_batch

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted((REPO / "samples").glob("*.jpg"))
ONE_LEVEL = 1.0 / 255 + 1e-6
W_UP = [0, 0, 0.25, 0.75, 0, 0]


@pytest.fixture(scope="module")
def graph() -> ort.InferenceSession:
    return ort.InferenceSession(str(LETTERBOX_MODEL), providers=["CPUExecutionProvider"])


def run_graph(
    graph: ort.InferenceSession, images: list[np.ndarray], hw: tuple[int, int], batch: int = 0
) -> tuple[np.ndarray, list[object]]:
    inputs, metas = letterbox_inputs(images, hw, batch or None)
    return graph.run(None, inputs)[0], list(metas)


def test_the_shipped_graph_is_the_one_the_code_builds() -> None:
    assert LETTERBOX_MODEL.read_bytes() == build_letterbox_graph().SerializeToString(), (
        "models/qrsight-letterbox-v1.onnx is stale: run `python -m core.vision.letterbox_graph`"
    )
    session = ort.InferenceSession(str(LETTERBOX_MODEL), providers=["CPUExecutionProvider"])
    assert tuple(i.name for i in session.get_inputs()) == INPUT_NAMES


SIZES = [(480, 640), (416, 416), (100, 37), (1000, 300), (3, 900), (417, 415), (1, 1)]


@pytest.mark.parametrize("hw", [(416, 416), (640, 640), (320, 480)])
def test_same_batch_as_the_host_letterbox_within_one_grey_level(
    graph: ort.InferenceSession, hw: tuple[int, int]
) -> None:
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]
    images += [cv2.imread(str(p)) for p in SAMPLES]
    got, metas = run_graph(graph, images, hw)
    want, want_metas = letterbox_batch(images, hw)
    assert metas == want_metas
    assert got.shape == want.shape and got.dtype == np.float32
    diff = np.abs(got - want)
    assert diff.max() <= ONE_LEVEL, "OpenCV's fixed-point rounding differs by one level at most"
    assert (diff > 1e-6).mean() < 0.15, "and only here and there (random noise: worst case)"


@pytest.mark.parametrize("hw", [(480, 640), (640, 640)])
def test_exact_where_no_resize_is_needed(graph: ort.InferenceSession, hw: tuple[int, int]) -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)  # fits as it is
    got, _ = run_graph(graph, [image], hw)
    want, _ = letterbox_batch([image], hw)
    np.testing.assert_array_equal(got, want)


def test_padding_images_are_blank_and_real_ones_unchanged(graph: ort.InferenceSession) -> None:
    image = cv2.imread(str(SAMPLES[0]))
    alone, _ = run_graph(graph, [image], (416, 416))
    padded, metas = run_graph(graph, [image], (416, 416), batch=4)
    assert padded.shape[0] == 4 and len(metas) == 1
    np.testing.assert_array_equal(padded[0], alone[0])
    np.testing.assert_allclose(padded[1:], PAD_VALUE / 255, rtol=1e-6)


@pytest.mark.parametrize(
    ("axis", "want"),
    [
        # no resize: each output pixel is its source pixel
        ((4, 0, 4, 4), ([0, 1, 2, 3], [1, 2, 3, 3], [0, 0, 0, 0], [1, 1, 1, 1])),
        # 2x upscale with a border of 1 on each side: OpenCV's half-pixel centres, edges clamped
        ((6, 1, 4, 2), ([0, 0, 0, 0, 1, 0], [0, 1, 1, 1, 1, 0], W_UP, [0, 1, 1, 1, 1, 0])),
        # 2x downscale: between the two source pixels
        ((2, 0, 2, 4), ([0, 2], [1, 3], [0.5, 0.5], [1, 1])),
    ],
    ids=["same-size", "upscale", "downscale"],
)
def test_axis_taps_follow_opencv_inter_linear(
    axis: tuple[int, int, int, int], want: tuple[list[int], list[int], list[float], list[int]]
) -> None:
    """axis = (outputs, pad, resized size, source size); want = (i0, i1, weight, inside)."""
    i0, i1, weight, inside = axis_taps(*axis)
    np.testing.assert_array_equal(i0, want[0])
    np.testing.assert_array_equal(i1, want[1])
    np.testing.assert_allclose(weight, want[2])
    np.testing.assert_array_equal(inside, want[3])


def test_letterbox_inputs_refuse_what_the_host_letterbox_refuses() -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        letterbox_inputs([np.zeros((8, 8), np.uint8)], (32, 32))


def test_detector_gives_the_same_detections_with_the_device_letterbox() -> None:
    images = [cv2.imread(str(p)) for p in SAMPLES]
    host = Detector(DEFAULT_MODEL)
    device = Detector(DEFAULT_MODEL, device_preprocess=True, pad_to=8, pad=True)
    assert host.letterbox is None and device.letterbox is not None
    for a, b in zip(host.predict(images), device.predict(images), strict=True):
        assert len(a) == len(b)
        np.testing.assert_allclose(a.xyxy, b.xyxy, atol=0.5)
        np.testing.assert_allclose(a.confidence, b.confidence, atol=2e-3)


def test_device_letterbox_is_off_on_the_cpu_unless_asked() -> None:
    assert Detector.from_settings(load_settings({})).letterbox is None
    on = load_settings({"QRSIGHT_DEVICE_PREPROCESS": "true"})
    assert Detector.from_settings(on).letterbox is not None


def test_without_scale_up_the_host_letterboxes_small_images_as_they_are() -> None:
    """The device letterbox always enlarges; with QRSIGHT_SCALEUP=false it is not used."""
    asked = {"QRSIGHT_DEVICE_PREPROCESS": "true", "QRSIGHT_SCALEUP": "false"}
    detector = Detector.from_settings(load_settings(asked))
    assert detector.letterbox is None
    _, (lb,) = detector.run_images([np.zeros((100, 150, 3), np.uint8)])
    assert lb.scale == 1.0
