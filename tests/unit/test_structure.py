"""The structure check: QR codes show their finder patterns; other symbols do not."""

from __future__ import annotations

import string

import cv2
import numpy as np
import pytest
import segno
import zxingcpp

from core.vision.detections import Detections
from core.vision.structure import box_structure, cap_unstructured, structure_score

TEXT = "qrsight structure check " * 3


def qr_image(text: str, scale: int, border: int = 4) -> np.ndarray:
    code = segno.make(text, error="m", micro=False)
    rows = np.array(list(code.matrix_iter(scale=scale, border=border)), np.uint8)
    return np.where(rows > 0, 0, 255).astype(np.uint8)


def symbol_image(fmt: str, scale: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    text = "".join(rng.choice(list(string.ascii_uppercase + string.digits), 60))
    bc = zxingcpp.create_barcode(text, getattr(zxingcpp.BarcodeFormat, fmt))
    img = np.asarray(zxingcpp.write_barcode_to_image(bc, scale=scale))
    return (img[..., 0] if img.ndim == 3 else img).astype(np.uint8)


def photographed(img: np.ndarray, angle: float, blur: float = 0.0, seed: int = 0) -> np.ndarray:
    """Rotated on a grey page, a little perspective, defocus, noise, JPEG."""
    rng = np.random.default_rng(seed)
    h, w = img.shape
    pad = max(h, w) // 3
    page = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=235)
    ph, pw = page.shape
    src = np.float32([[0, 0], [pw, 0], [pw, ph], [0, ph]])
    dst = src + rng.uniform(-0.04, 0.04, (4, 2)).astype(np.float32) * pw
    warped = cv2.warpPerspective(
        page, cv2.getPerspectiveTransform(src, dst), (pw, ph), borderValue=200
    )
    rot = cv2.getRotationMatrix2D((pw / 2, ph / 2), angle, 1.0)
    out = cv2.warpAffine(warped, rot, (pw, ph), borderValue=200).astype(np.float32)
    if blur:
        out = cv2.GaussianBlur(out, (0, 0), blur)
    out = np.clip(out + rng.normal(0, 4, out.shape), 0, 255).astype(np.uint8)
    ok, enc = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    return cv2.imdecode(enc, cv2.IMREAD_GRAYSCALE)


@pytest.mark.parametrize(("text", "scale"), [("A1", 6), (TEXT, 4), (TEXT * 6, 2)])
def test_clean_qr_codes_show_three_finders_and_timing(text: str, scale: int) -> None:
    assert structure_score(qr_image(text, scale)) == 4


@pytest.mark.parametrize("angle", [0, 17, 45, 120])
def test_photographed_qr_codes_keep_their_finders_at_any_angle(angle: float) -> None:
    img = photographed(qr_image(TEXT, 5), angle, blur=1.0, seed=int(angle))
    assert structure_score(img) >= 3


def test_a_light_on_dark_code_is_seen_too() -> None:
    assert structure_score(255 - qr_image(TEXT, 4)) == 4


@pytest.mark.parametrize("fmt", ["Aztec", "PDF417", "DataMatrix", "MaxiCode"])
@pytest.mark.parametrize("angle", [0, 30])
def test_other_symbologies_show_no_qr_layout(fmt: str, angle: float) -> None:
    clean = symbol_image(fmt, 4 if fmt != "MaxiCode" else 1)
    assert structure_score(clean) < 2
    assert structure_score(photographed(clean, angle, blur=0.8, seed=3)) < 2


def test_texture_and_flat_crops_score_zero() -> None:
    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.uniform(0, 255, (240, 240)).astype(np.float32), (0, 0), 2)
    assert structure_score(noise.astype(np.uint8)) < 2
    assert structure_score(np.full((100, 100), 128, np.uint8)) == 0


def test_box_structure_reads_the_box_of_a_larger_image() -> None:
    img = np.full((600, 800), 220, np.uint8)
    code = qr_image(TEXT, 4, border=0)
    img[100 : 100 + code.shape[0], 300 : 300 + code.shape[1]] = code
    box = np.array([300, 100, 300 + code.shape[1], 100 + code.shape[0]], np.float32)
    assert box_structure(img, box) == 4
    assert box_structure(img, np.array([20, 400, 200, 580], np.float32)) == 0


def test_only_unread_confident_boxes_without_structure_are_capped() -> None:
    img = np.full((400, 900), 220, np.uint8)
    code = qr_image(TEXT, 4, border=0)
    aztec = symbol_image("Aztec", 5)
    img[50 : 50 + code.shape[0], 50 : 50 + code.shape[1]] = code
    img[50 : 50 + aztec.shape[0], 500 : 500 + aztec.shape[1]] = aztec
    qr_box = [50, 50, 50 + code.shape[1], 50 + code.shape[0]]
    az_box = [500, 50, 500 + aztec.shape[1], 50 + aztec.shape[0]]
    dets = Detections(
        xyxy=np.array([qr_box, az_box, az_box, az_box], np.float32),
        confidence=np.full(4, 0.6, np.float32),
        class_id=np.array([0, 0, 0, 1]),
        text=[None, None, "read", None],
        corners=[None] * 4,
    )
    judged = np.array([0.95, 0.97, 1.0, np.nan], np.float32)
    out = cap_unstructured(img, dets, judged, 0, threshold=0.5, cap=0.3)
    assert out[0] == pytest.approx(0.95)  # a QR code nobody read keeps its confidence
    assert out[1] == pytest.approx(0.3)  # an Aztec symbol does not
    assert out[2] == 1.0  # a read box is never scanned
    assert np.isnan(out[3])  # another class is not judged
    low = cap_unstructured(img, dets, np.array([0.95, 0.2, 1.0, np.nan]), 0, threshold=0.5, cap=0.3)
    assert low[1] == pytest.approx(0.2)  # below the threshold already: left as it is


def test_a_code_without_quiet_zone_on_a_dark_ground_is_found_one_sided() -> None:
    """Photographed, its finders' outer rings merge with the ground: the strict search
    finds none, the one-sided one the whole layout, so the veto spares it."""
    dark = np.pad(qr_image(TEXT, 4, border=0), 40, constant_values=25)
    img = photographed(dark, 20, blur=0.8, seed=1)
    assert structure_score(img) == 0
    assert structure_score(img, one_sided=True) >= 3


def test_the_veto_drops_boxes_without_any_finder_and_spares_codes() -> None:
    img = np.full((400, 1300), 220, np.uint8)
    code = qr_image(TEXT, 4, border=0)
    noquiet = photographed(np.pad(code, 40, constant_values=25), 20, blur=0.8, seed=1)
    aztec = symbol_image("Aztec", 5)
    img[50 : 50 + code.shape[0], 50 : 50 + code.shape[1]] = code
    img[50 : 50 + aztec.shape[0], 450 : 450 + aztec.shape[1]] = aztec
    h, w = noquiet.shape
    img[0:h, 850 : 850 + w] = noquiet
    boxes = [
        [50, 50, 50 + code.shape[1], 50 + code.shape[0]],
        [450, 50, 450 + aztec.shape[1], 50 + aztec.shape[0]],
        [850 + w * 0.2, h * 0.2, 850 + w * 0.8, h * 0.8],
    ]
    dets = Detections(
        xyxy=np.array(boxes, np.float32),
        confidence=np.full(3, 0.6, np.float32),
        class_id=np.zeros(3, np.int64),
        text=[None] * 3,
        corners=[None] * 3,
    )
    judged = np.array([0.95, 0.97, 0.9], np.float32)
    capped = cap_unstructured(img, dets, judged, 0, threshold=0.5, cap=0.5)
    vetoed = cap_unstructured(img, dets, judged, 0, threshold=0.5, cap=0.5, veto=True)
    assert capped.tolist() == pytest.approx([0.95, 0.5, 0.5])
    assert vetoed.tolist() == pytest.approx([0.95, 0.0, 0.5])
    # a box the verifier is all but certain of is capped, not dropped
    sure = cap_unstructured(img, dets, np.array([0.95, 0.999, 0.9]), 0, threshold=0.5, veto=True)
    assert sure.tolist() == pytest.approx([0.95, 0.5, 0.5])
