"""The other-symbol veto: an unread QR box that zxing-cpp reads as an Aztec, Data Matrix,
MaxiCode or PDF417 symbol is dropped; a QR code is never read as one of them."""

from __future__ import annotations

import numpy as np
import pytest

from core.vision.detections import Detections
from core.vision.symbols import drop_other_symbols, read_symbols
from tests.unit.test_structure import TEXT, photographed, qr_image, symbol_image

FORMATS = ["Aztec", "PDF417", "DataMatrix", "MaxiCode"]


def boxes(*xyxy: list[float], text: list[str | None] | None = None) -> Detections:
    n = len(xyxy)
    return Detections(
        xyxy=np.array(xyxy, np.float32),
        confidence=np.full(n, 0.6, np.float32),
        class_id=np.zeros(n, np.int64),
        text=[None] * n if text is None else text,
        corners=[None] * n,
    )


def framed(img: np.ndarray, border: int = 0) -> np.ndarray:
    return np.pad(img, border, constant_values=255)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("scale", [1, 3, 8])
def test_a_box_on_a_symbol_filling_the_frame_is_dropped(fmt: str, scale: int) -> None:
    """Computer-generated, the image is the symbol: a box over all of it, and one over a
    corner of it (the detector's second box on a large symbol), both go."""
    img = framed(symbol_image(fmt, scale), border=2 * scale)
    h, w = img.shape
    dets = boxes([0, 0, w, h], [w * 0.5, h * 0.5, w * 0.95, h * 0.95])
    out = drop_other_symbols(img, dets, np.array([0.98, 0.8], np.float32), 0, threshold=0.5)
    assert out.tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    ("fmt", "angle"),
    # zxing-cpp reads PDF417 only near its axes (and at 90 degree turns)
    [
        ("Aztec", 0),
        ("Aztec", 25),
        ("DataMatrix", 0),
        ("DataMatrix", 25),
        ("PDF417", 0),
        ("PDF417", 6),
    ],
)
def test_a_photographed_symbol_is_recognised(fmt: str, angle: float) -> None:
    """A box centred on the symbol, 80 % of its size (rotated, its bounds are larger)."""
    symbol = symbol_image(fmt, 5)
    img = photographed(symbol, angle, blur=0.8)
    (h, w), (sh, sw) = img.shape, symbol.shape
    dets = boxes([(w - 0.8 * sw) / 2, (h - 0.8 * sh) / 2, (w + 0.8 * sw) / 2, (h + 0.8 * sh) / 2])
    out = drop_other_symbols(img, dets, np.array([0.9], np.float32), 0, threshold=0.5)
    assert out.tolist() == [0.0]


def test_a_small_symbol_in_a_large_photo_is_read_on_the_box_crop() -> None:
    """At 1,600 px the whole-image read cannot resolve 1-px modules of a 4,000 px photo;
    the box's own crop can."""
    img = np.full((3000, 4000), 225, np.uint8)
    dm = symbol_image("DataMatrix", 2)
    img[2000 : 2000 + dm.shape[0], 3000 : 3000 + dm.shape[1]] = dm
    assert read_symbols(img[::3, ::3]) == []  # not resolved at a third of its size
    dets = boxes([3000, 2000, 3000 + dm.shape[1], 2000 + dm.shape[0]])
    out = drop_other_symbols(img, dets, np.array([0.9], np.float32), 0, threshold=0.5)
    assert out.tolist() == [0.0]


def test_qr_codes_and_the_codes_beside_a_symbol_keep_their_judgement() -> None:
    """A shipping label: a QR code nobody read beside a PDF417 and a Data Matrix. The QR
    box stays; a box over the PDF417 goes; read boxes, boxes below the threshold and other
    classes are left as they are."""
    img = np.full((500, 1200), 235, np.uint8)
    code = qr_image(TEXT, 4, border=0)
    pdf = symbol_image("PDF417", 2)
    dm = symbol_image("DataMatrix", 4)
    img[40 : 40 + code.shape[0], 40 : 40 + code.shape[1]] = code
    img[60 : 60 + pdf.shape[0], 360 : 360 + pdf.shape[1]] = pdf
    img[300 : 300 + dm.shape[0], 420 : 420 + dm.shape[1]] = dm
    qr_box = [40, 40, 40 + code.shape[1], 40 + code.shape[0]]
    pdf_box = [360, 60, 360 + pdf.shape[1], 60 + pdf.shape[0]]
    # a box straddling the QR code and the PDF417, mostly on the QR code
    straddle = [100, 40, 100 + code.shape[1], 40 + code.shape[0]]
    dets = boxes(qr_box, pdf_box, straddle, pdf_box, pdf_box, text=[None, None, None, "x", None])
    dets.class_id[4] = 1
    judged = np.array([0.95, 0.97, 0.9, 1.0, np.nan], np.float32)
    out = drop_other_symbols(img, dets, judged, 0, threshold=0.5)
    assert out[0] == pytest.approx(0.95)
    assert out[1] == 0.0
    assert out[2] == pytest.approx(0.9)
    assert out[3] == 1.0
    assert np.isnan(out[4])
    low = drop_other_symbols(img, dets, np.array([0.95, 0.3, 0.9, 1.0, np.nan]), 0, threshold=0.5)
    assert low[1] == pytest.approx(0.3)


@pytest.mark.parametrize("scale", [1, 2, 6])
def test_no_qr_code_is_ever_read_as_another_symbol(scale: int) -> None:
    for text in ("A1", TEXT, TEXT * 6):
        assert read_symbols(framed(qr_image(text, scale))) == []
        assert read_symbols(photographed(qr_image(text, scale), 30, blur=0.7)) == []


def test_nothing_is_read_without_a_box_to_judge(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.vision import symbols

    def refuse(*_: object) -> list[object]:
        raise AssertionError("read without an unread confident box")

    monkeypatch.setattr(symbols, "read_symbols", refuse)
    img = framed(symbol_image("Aztec", 4))
    dets = boxes([0, 0, 50, 50], [0, 0, 50, 50], text=["read", None])
    judged = np.array([1.0, 0.2], np.float32)
    assert drop_other_symbols(img, dets, judged, 0, threshold=0.5).tolist() == pytest.approx(
        [1.0, 0.2]
    )
