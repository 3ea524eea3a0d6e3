"""Is an unread QR box another symbol? Read it as one.

The detector and the crop verifier judge how a crop *looks*; a clean Aztec code, a
PDF417 symbol, a Data Matrix or a MaxiCode filling the frame looks like a dense
black-and-white code, and a box on it keeps a high confidence with no payload. zxing-cpp
reads those symbologies too, and a read is the strongest evidence there is: each of them
carries Reed-Solomon error correction, so a symbol decoded where a QR box lies means the
box is on that symbol, not on a QR code nobody could read. Unlike the finder-pattern check
(``core.vision.structure``), which caps what it cannot confirm, this is a veto: a QR code
never decodes as one of these symbologies, so it cannot cost a code.

:func:`drop_other_symbols` reads the other 2-D symbologies once on the whole image (brought
to at most :data:`MAX_SIDE` px) and, for each unread QR box the verifier would keep that no
symbol found there covers, once more on the box's crop with a wide margin (a small
symbol in a large photo); a box whose area lies at least :data:`MIN_COVER` inside a decoded
symbol's bounds is dropped (its judgement set to 0). Micro QR and rMQR are QR codes for
this purpose and are not read here; 1-D codes are not read either (a box does not fall on
bars, and their position is a scan line, not an area).

It runs only when an image has an unread QR box at the verifier's threshold: most images
pay nothing (``models/README.md`` *Other symbols* has the time it costs).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import zxingcpp

from core.vision.detections import Detections
from core.vision.payload import crop_window

OTHER_FORMATS = zxingcpp.BarcodeFormats(
    [
        zxingcpp.BarcodeFormat.Aztec,
        zxingcpp.BarcodeFormat.DataMatrix,
        zxingcpp.BarcodeFormat.MaxiCode,
        zxingcpp.BarcodeFormat.PDF417,
        zxingcpp.BarcodeFormat.MicroPDF417,
    ]
)
MAX_SIDE = 1600  # the whole image is read with its longer side at most this
CROP_MARGIN = 0.5  # of the box's longer side, around a box's own read
CROP_MIN_SIDE = 160  # a small crop is enlarged to this short side before reading
MIN_COVER = 0.5  # share of a box's area inside a symbol's bounds that makes it the symbol's


@dataclass(frozen=True)
class Symbol:
    """A decoded symbol of another symbology: its format name and bounds (x1, y1, x2, y2) in
    the image's pixels."""

    format: str
    xyxy: np.ndarray


def read_symbols(gray: np.ndarray) -> list[Symbol]:
    """The Aztec, Data Matrix, MaxiCode and PDF417 symbols zxing-cpp decodes in a grey
    image, with their bounds in its pixels."""
    results = zxingcpp.read_barcodes(
        np.ascontiguousarray(gray),
        formats=OTHER_FORMATS,
        text_mode=zxingcpp.TextMode.Plain,
    )
    found = []
    for r in results:
        p = r.position
        pts = np.array(
            [[q.x, q.y] for q in (p.top_left, p.top_right, p.bottom_right, p.bottom_left)],
            np.float32,
        )
        found.append(
            Symbol(str(r.format).rsplit(".", 1)[-1], np.concatenate([pts.min(0), pts.max(0)]))
        )
    return found


def _read_scaled(gray: np.ndarray, factor: float, left: int = 0, top: int = 0) -> list[Symbol]:
    """:func:`read_symbols` of ``gray`` resized by ``factor``, bounds mapped back to the
    coordinates ``gray`` had at (``left``, ``top``) of the image."""
    if factor != 1.0:
        interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
        gray = cv2.resize(gray, None, fx=factor, fy=factor, interpolation=interp)
    offset = np.array([left, top, left, top], np.float32)
    return [Symbol(s.format, s.xyxy / factor + offset) for s in read_symbols(gray)]


def cover(box: np.ndarray, bounds: np.ndarray) -> float:
    """The share of ``box``'s area (xyxy) inside ``bounds`` (xyxy)."""
    w = min(box[2], bounds[2]) - max(box[0], bounds[0])
    h = min(box[3], bounds[3]) - max(box[1], bounds[1])
    area = max(float(box[2] - box[0]) * float(box[3] - box[1]), 1e-6)
    return max(float(w), 0.0) * max(float(h), 0.0) / area


def _covered(box: np.ndarray, symbols: list[Symbol]) -> bool:
    return any(cover(box, s.xyxy) >= MIN_COVER for s in symbols)


def _around(gray: np.ndarray, box: np.ndarray) -> list[Symbol]:
    """Symbols read on ``box``'s crop with :data:`CROP_MARGIN` around it."""
    a, b, c, d = crop_window(box, gray.shape, CROP_MARGIN)
    if c - a < 8 or d - b < 8:
        return []
    crop = gray[b:d, a:c]
    short = min(crop.shape[:2])
    factor = (
        CROP_MIN_SIDE / short if short < CROP_MIN_SIDE else min(1.0, MAX_SIDE / max(crop.shape[:2]))
    )
    return _read_scaled(crop, factor, a, b)


def drop_other_symbols(
    gray: np.ndarray,
    dets: Detections,
    judged: np.ndarray,
    qr_id: int | None,
    *,
    threshold: float,
) -> np.ndarray:
    """``judged`` (the verifier's ``P(code)`` per detection, NaN for other classes) with
    each unread QR box at ``threshold`` or above that lies in a symbol of another
    symbology decoded in ``gray`` (the boxes' image) set to 0, so the keep rule drops it.
    Nothing is read unless there is such a box."""
    if qr_id is None or len(dets) == 0:
        return judged
    assert dets.text is not None
    which = [
        i
        for i, (c, t, p) in enumerate(zip(dets.class_id, dets.text, judged, strict=True))
        if c == qr_id and t is None and p >= threshold
    ]
    if not which:
        return judged
    out = judged.copy()
    longer = max(gray.shape[:2])
    symbols = _read_scaled(gray, min(1.0, MAX_SIDE / longer))
    for i in which:
        box = dets.xyxy[i]
        if not _covered(box, symbols):
            symbols += _around(gray, box)
        if _covered(box, symbols):
            out[i] = 0.0
    return out
