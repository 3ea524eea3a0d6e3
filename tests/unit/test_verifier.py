"""The crop verifier: geometry of its crops, the shipped model's verdicts, the keep rule,
and which detector it is used with."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.runtime.errors import ConfigError
from core.runtime.settings import DEFAULT_MODEL, DEFAULT_VERIFIER, load_settings
from core.vision.detections import Detections
from core.vision.pipeline import ImageJob, Pipeline
from core.vision.verifier import Verifier, crop_patches, file_sha256, load_verifier
from tests.unit.onnx_models import make_dark_cell_model, with_metadata
from tests.unit.qr_factory import CodeSpec, scene


@pytest.fixture(scope="module")
def verifier() -> Verifier:
    return Verifier(DEFAULT_VERIFIER, intra_threads=1)


@pytest.fixture(scope="module")
def dark_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dark_cell_model(tmp_path_factory.mktemp("m") / "dark.onnx")


def png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def symbol(fmt: str, content: str, module_px: int = 6) -> np.ndarray:
    """A zxing-cpp symbol (Data Matrix, Aztec...) on white as BGR, 4 px margin."""
    import zxingcpp

    bc = zxingcpp.create_barcode(content, getattr(zxingcpp.BarcodeFormat, fmt))
    img = np.asarray(zxingcpp.write_barcode_to_image(bc, scale=module_px))
    gray = img if img.ndim == 2 else img[..., 0]
    return cv2.cvtColor(np.pad(gray, 24, constant_values=255), cv2.COLOR_GRAY2BGR)


def test_crops_are_squares_around_the_box_with_grey_outside_the_image() -> None:
    gray = np.zeros((100, 200), np.uint8)
    gray[40:60, 90:110] = 255  # a white 20 px square in the middle
    (centre, corner) = crop_patches(
        gray, np.array([[90, 40, 110, 60], [-10, -10, 10, 10]], np.float32), size=50, margin=2.0
    )
    # margin 2: a 40 px window, the square is its middle half
    assert centre[13:37, 13:37].min() == 255 and centre[:10].max() == 0
    # the part of the window outside the image is the letterbox grey
    assert corner[:18, :18].min() == 114 == corner[:18, :18].max()
    assert corner[30:, 30:].max() == 0


def test_shipped_verifier_confirms_qr_codes(verifier: Verifier) -> None:
    image, codes = scene(
        [
            CodeSpec("https://example.org/ticket/4711", center=(150, 140), module_px=4),
            CodeSpec("GATE 7 ROW 12", center=(460, 150), module_px=3.2, angle=25),
            CodeSpec("x" * 90, center=(320, 350), module_px=2.5, angle=-60),
        ]
    )
    boxes = np.array([c.xyxy for c in codes])
    assert (verifier.scores(image, boxes) >= verifier.threshold).all()


@pytest.mark.parametrize(
    ("fmt", "content"), [("Aztec", "AZTEC 0123456789"), ("DataMatrix", "DM-42")]
)
def test_shipped_verifier_rejects_other_2d_symbols(
    verifier: Verifier, fmt: str, content: str
) -> None:
    image = symbol(fmt, content)
    h, w = image.shape[:2]
    box = np.array([[24, 24, w - 24, h - 24]], np.float32)
    assert verifier.scores(image, box)[0] < verifier.threshold


def test_filter_keeps_read_codes_and_other_classes(verifier: Verifier) -> None:
    image = np.full((200, 200, 3), 255, np.uint8)
    image[50:150, 50:150] = 0  # a black square: no QR code
    box = [50.0, 50.0, 150.0, 150.0]
    dets = Detections(
        xyxy=np.array([box, box, box], np.float32),
        confidence=np.array([0.9, 0.8, 0.7], np.float32),
        class_id=np.array([0, 0, 1]),
        text=[None, "read by zxing", None],
    )
    assert verifier.scores(image, dets.xyxy[:1])[0] < verifier.threshold
    kept = verifier.filter(image, dets, qr_id=0)
    assert kept.text == ["read by zxing", None] and kept.class_id.tolist() == [0, 1]
    assert len(verifier.filter(image, dets, qr_id=None)) == 3  # a model without a QR class


def test_a_detector_model_is_not_a_verifier(dark_model: Path) -> None:
    with pytest.raises(ConfigError, match="QRSIGHT_VERIFIER_PATH"):
        Verifier(dark_model)
    with pytest.raises(ConfigError, match="QRSIGHT_VERIFIER_PATH"):
        Verifier(dark_model.parent / "missing.onnx")


def test_the_verifier_goes_with_the_detector_it_was_trained_for(
    verifier: Verifier, dark_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert verifier.detector_sha256 == file_sha256(DEFAULT_MODEL)
    assert load_verifier(load_settings({}), DEFAULT_MODEL) is not None
    assert load_verifier(load_settings({"QRSIGHT_VERIFIER_PATH": "off"}), DEFAULT_MODEL) is None
    # another detector (the default path or one named explicitly): left out, with a warning
    explicit = {"QRSIGHT_VERIFIER_PATH": str(DEFAULT_VERIFIER)}
    for env in ({}, explicit):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="core.vision.verifier"):
            assert load_verifier(load_settings(env, model_path=dark_model), dark_model) is None
        assert "trained for another detector" in caplog.text
        assert "QRSIGHT_VERIFIER_PATH=off" in caplog.text


def test_pipeline_drops_boxes_the_verifier_rejects(
    dark_model: Path, tmp_path: Path, verifier: Verifier
) -> None:
    """The dark-cell model boxes a black square; a verifier for any detector (no
    ``detector_sha256``) drops those unread boxes, and without it they stay."""
    # for any detector, and judging by its own score alone (this toy detector's 0.9+ would
    # outweigh it in the shipped calibration, fitted to the shipped detector's scores)
    any_detector = with_metadata(
        DEFAULT_VERIFIER, tmp_path / "verifier.onnx", detector_sha256=None, calibration="[0, 1, 0]"
    )
    image = np.full((320, 320, 3), 255, np.uint8)
    image[64:128, 64:128] = 0
    job = [ImageJob("r", png(image))]
    counts = []
    for path in (str(any_detector), "off"):
        settings = load_settings(
            {"QRSIGHT_VERIFIER_PATH": path}, model_path=dark_model, decode_payloads=False
        )
        with Pipeline(settings) as pipeline:
            assert (pipeline.verifier is None) == (path == "off")
            (result,) = pipeline.run(job)
        assert result["status"] == "OK"
        counts.append(len(result["detections"]))
    assert counts == [0, 16]


def test_verifier_scores_follow_the_crop_not_the_batch(verifier: Verifier) -> None:
    image, codes = scene([CodeSpec("batch", center=(200, 200), module_px=4)])
    box = codes[0].xyxy[None]
    empty = np.array([[400, 300, 500, 400]], np.float32)
    alone = verifier.scores(image, box)
    together = verifier.scores(image, np.concatenate([empty, box, empty]))
    assert np.allclose(alone, together[1], atol=1e-5)
    assert verifier.scores(image, np.zeros((0, 4), np.float32)).shape == (0,)


def test_calibration_is_read_from_the_metadata_and_checked(tmp_path: Path) -> None:
    good = with_metadata(DEFAULT_VERIFIER, tmp_path / "a.onnx", calibration="[1.5, 2.0, -0.5]")
    assert Verifier(good).calibration == (1.5, 2.0, -0.5)
    none = with_metadata(DEFAULT_VERIFIER, tmp_path / "b.onnx", calibration=None)
    assert Verifier(none).calibration is None
    bad = with_metadata(DEFAULT_VERIFIER, tmp_path / "c.onnx", calibration="[1.5, 2.0]")
    with pytest.raises(ConfigError, match="calibration"):
        Verifier(bad)


def test_calibrated_probability_rises_with_both_scores(tmp_path: Path) -> None:
    path = with_metadata(DEFAULT_VERIFIER, tmp_path / "v.onnx", calibration="[1.0, 1.0, 0.0]")
    v = Verifier(path)
    # a = b = 1, c = 0: logit(p) = logit(det) + logit(ver)
    assert v.probability(np.array([0.5]), np.array([0.5]))[0] == pytest.approx(0.5)
    assert v.probability(np.array([0.5]), np.array([0.9]))[0] == pytest.approx(0.9)
    grid = v.probability(np.array([0.3, 0.3, 0.6]), np.array([0.2, 0.7, 0.7]))
    assert grid[0] < grid[1] < grid[2]


def test_calibrated_confidence_is_the_probability_read_boxes_are_sure(tmp_path: Path) -> None:
    """Read box → 1.0; unread boxes → P(code), dropped below the threshold; other
    classes keep the detector's confidence."""
    path = with_metadata(
        DEFAULT_VERIFIER, tmp_path / "v.onnx", calibration="[1.0, 1.0, 0.0]", threshold="0.5"
    )
    v = Verifier(path)
    image, codes = scene([CodeSpec("calibrated", center=(200, 200), module_px=4)])
    code = codes[0].xyxy
    blank = np.array([500, 300, 600, 400], np.float32)
    dets = Detections(
        xyxy=np.array([code, code, blank, blank], np.float32),
        confidence=np.array([0.3, 0.6, 0.6, 0.4], np.float32),
        class_id=np.array([0, 0, 0, 1]),
        text=["read", None, None, None],
    )
    judged = v.judge(image, dets, qr_id=0)
    assert judged[0] == 1.0 and np.isnan(judged[3])
    scores = v.scores(image, dets.xyxy[1:3])
    assert np.allclose(judged[1:3], v.probability(dets.confidence[1:3], scores))
    assert judged[1] >= 0.5 > judged[2]  # a code on white vs an empty white patch
    out = v.apply(dets, judged)
    assert out.text == ["read", None, None] and out.class_id.tolist() == [0, 0, 1]
    assert np.allclose(out.confidence, [1.0, judged[1], 0.4])
    # a box read after it was judged (a harder read) is kept at 1.0
    late = Detections(
        xyxy=dets.xyxy, confidence=dets.confidence, class_id=dets.class_id,
        text=["read", None, "read later", None],
    )  # fmt: skip
    out = v.apply(late, judged)
    assert len(out) == 4 and out.confidence[2] == 1.0


def test_an_uncalibrated_verifier_keeps_the_detector_confidence(tmp_path: Path) -> None:
    path = with_metadata(DEFAULT_VERIFIER, tmp_path / "v1.onnx", calibration=None)
    v = Verifier(path)
    image, codes = scene([CodeSpec("v1", center=(200, 200), module_px=4)])
    dets = Detections(
        xyxy=codes[0].xyxy[None], confidence=np.array([0.3], np.float32), class_id=np.array([0])
    )
    judged = v.judge(image, dets, qr_id=0)
    assert np.allclose(judged, v.scores(image, dets.xyxy))  # the raw score
    out = v.apply(dets, judged)
    assert len(out) == 1 and out.confidence[0] == pytest.approx(0.3)


def test_a_confident_unread_box_without_finder_patterns_is_not_reported_as_sure(
    dark_model: Path, tmp_path: Path
) -> None:
    """A verifier that judges every box 0.95 (``sigmoid(3)``): a black square has no
    finder pattern at all, so with the structure check (the default) its boxes are
    dropped (the veto); without the veto they are reported at the cap, 0.5; a cap below
    the threshold drops them too; a cap of 1 (no check) leaves the verifier's
    confidence. Judged all but certain (the detector's score of a black cell, 1.0), they
    are capped, not dropped."""
    trusting = with_metadata(
        DEFAULT_VERIFIER, tmp_path / "verifier.onnx", detector_sha256=None, calibration="[0, 0, 3]"
    )
    certain = with_metadata(
        DEFAULT_VERIFIER, tmp_path / "certain.onnx", detector_sha256=None, calibration="[1, 0, 0]"
    )
    image = np.full((320, 320, 3), 255, np.uint8)
    image[64:128, 64:128] = 0
    job = [ImageJob("r", png(image))]
    kept = {}
    for cap in (None, "no veto", 0.3, 1.0, "certain"):
        extra: dict[str, object] = {"verifier_path": trusting}
        if cap == "no veto":
            extra["structure_veto"] = False
        elif cap == "certain":
            extra["verifier_path"] = certain
        elif cap is not None:
            extra["structure_cap"] = cap
        settings = load_settings({}, model_path=dark_model, **extra)
        with Pipeline(settings) as pipeline:
            (result,) = pipeline.run(job)
        assert result["status"] == "OK"
        kept[cap] = [d["confidence"] for d in result["detections"]]
    assert kept[1.0] and min(kept[1.0]) > 0.9
    assert kept[None] == []
    assert kept["no veto"] and max(kept["no veto"]) == pytest.approx(0.5)
    assert kept["certain"] and max(kept["certain"]) == pytest.approx(0.5)
    assert len(kept["no veto"]) == len(kept[1.0])
    assert kept[0.3] == []


def test_boxes_on_a_symbol_of_another_symbology_are_dropped(
    dark_model: Path, tmp_path: Path
) -> None:
    """A computer-generated Aztec code filling the image, boxed cell by cell by a model
    that scores darkness, judged a sure code by a trusting verifier: zxing-cpp reads the
    Aztec code under the boxes, so none is reported (``QRSIGHT_OTHER_SYMBOLS``, the
    default); with the check off they are, at the structure cap (the structure veto off,
    so that the read alone is tested)."""
    import zxingcpp

    trusting = with_metadata(
        DEFAULT_VERIFIER, tmp_path / "verifier.onnx", detector_sha256=None, calibration="[1, 0, 0]"
    )
    code = zxingcpp.create_barcode(
        "1Z 999 AA1 01 2345 6784 / qrsight", zxingcpp.BarcodeFormat.Aztec
    )
    image = np.asarray(zxingcpp.write_barcode_to_image(code, scale=12))
    image = cv2.cvtColor(np.pad(image, 12, constant_values=255), cv2.COLOR_GRAY2BGR)
    reported = {}
    for other in (True, False):
        settings = load_settings(
            {},
            model_path=dark_model,
            verifier_path=trusting,
            other_symbols=other,
            structure_veto=False,
        )
        with Pipeline(settings) as pipeline:
            (result,) = pipeline.run([ImageJob("r", png(image))])
        assert result["status"] == "OK"
        reported[other] = [d["confidence"] for d in result["detections"]]
    assert reported[False] and max(reported[False]) == pytest.approx(0.5)
    assert reported[True] == []
