"""Read QR payloads with zxing-cpp: per detection box first, then the whole image once.

For each box the crop (box plus a margin) is read, upscaled with cubic interpolation
when the code is small; corners come back in original-image pixels, the code's
top-left first, clockwise. Boxes that stay unread get the codes that one whole-image
read finds with their centre inside the box. A code that cannot be read keeps
``text=None`` and ``corners=None`` and is still a detection.

Payload text is zxing-cpp's ``TextMode.Plain``: the symbol's bytes transcoded by its
ECI (or the guessed character set, ISO-8859-1 for binary data), so control characters
and binary payloads come through as they are (``HRI`` would rewrite them as ``<NUL>``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import zxingcpp

from core.vision.detections import Detections

logger = logging.getLogger(__name__)

QR_FORMATS = zxingcpp.BarcodeFormats(
    [zxingcpp.BarcodeFormat.QRCode, zxingcpp.BarcodeFormat.MicroQRCode]
)
MARGIN_FRACTION = 0.15  # of the box's longer side, added around the crop
MIN_MARGIN_PX = 8
TARGET_SHORT_SIDE = 256  # small crops are upscaled to about this
MAX_UPSCALE = 8.0
MAX_CROP_SIDE = 2048  # an upscaled crop never exceeds this
RETRY_UPSCALE = 1.6  # second try, a little larger, when the first finds nothing


@dataclass(frozen=True)
class _Code:
    text: str
    corners: np.ndarray  # (4, 2) float32, TL TR BR BL

    @property
    def center(self) -> np.ndarray:
        return np.asarray(self.corners.mean(axis=0))


@dataclass(frozen=True)
class Attempt:
    """One more way to read a box whose crop the standard reads missed: the crop (box plus
    ``margin`` of its longer side) scaled so its short side is ``short`` px (0: as it is),
    passed through ``prepare`` and read with ``binarizer``."""

    name: str
    short: int
    prepare: Callable[[np.ndarray], np.ndarray] | None = None
    binarizer: zxingcpp.Binarizer = zxingcpp.Binarizer.LocalAverage
    margin: float = MARGIN_FRACTION


def _sharpen(gray: np.ndarray) -> np.ndarray:
    """Unsharp mask: restores module edges that defocus or motion softened."""
    return cv2.addWeighted(gray, 2.0, cv2.GaussianBlur(gray, (0, 0), 2.0), -1.0, 0)


def _flatten(gray: np.ndarray) -> np.ndarray:
    """Divide out the lighting (glare, shadow, vignetting) and stretch to 0..255."""
    sigma = max(gray.shape[:2]) / 10
    light = cv2.GaussianBlur(gray, (0, 0), sigma).astype(np.float32) + 1.0
    flat = gray.astype(np.float32) / light
    lo, hi = float(flat.min()), float(flat.max())
    return ((flat - lo) * (255.0 / max(hi - lo, 1e-6))).astype(np.uint8)


def _clahe(gray: np.ndarray) -> np.ndarray:
    return cv2.createCLAHE(clipLimit=3.0, tileGridSize=(4, 4)).apply(gray)


def _median(gray: np.ndarray) -> np.ndarray:
    return cv2.medianBlur(gray, 3)


def _smooth(gray: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(gray, (0, 0), 1.2)


def _stretch(gray: np.ndarray) -> np.ndarray:
    """Contrast stretch between the 2nd and 98th percentiles."""
    lo, hi = np.percentile(gray, (2, 98))
    scaled = (gray.astype(np.float32) - lo) * (255.0 / max(float(hi - lo), 1.0))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _pad(gray: np.ndarray) -> np.ndarray:
    """A light border around the crop: the quiet zone of a code cut by the frame, or
    printed without one (zxing-cpp needs light around the finder patterns)."""
    border = max(8, round(0.12 * min(gray.shape[:2])))
    light = int(np.percentile(gray, 95))
    return cv2.copyMakeBorder(
        gray, border, border, border, border, cv2.BORDER_CONSTANT, value=light
    )


def _adaptive(gray: np.ndarray) -> np.ndarray:
    """Local mean threshold over about a sixth of the crop (uneven light)."""
    block = max(3, (min(gray.shape[:2]) // 6) | 1)
    return cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, block, 4)


def _outline(values: np.ndarray, where: np.ndarray, upper: bool, degree: int = 3) -> np.ndarray:
    """A smooth curve through a code's outline (``values`` at positions ``where``): a
    polynomial fitted twice, the second time without the points that lie inside the code
    by more than a few pixels (a light module on the edge row, not the edge)."""
    fit = np.polyfit(where, values, degree)
    inside = values - np.polyval(fit, where)
    keep = (inside if upper else -inside) < max(2.0, 0.01 * float(np.ptp(where)))
    if keep.sum() > 4 * degree:
        fit = np.polyfit(where[keep], values[keep], degree)
    return np.asarray(fit)


def _straighten(gray: np.ndarray) -> np.ndarray:
    """Straighten a code whose top and bottom outlines bend (a label on a bottle, a bent or
    creased sheet): its dark modules, closed into one area, give per column the code's top
    and bottom; a smooth curve through each is mapped onto a straight row, every column
    stretched between them. The same image when no such area is found."""
    h, w = gray.shape[:2]
    _, dark = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    k = max(3, min(h, w) // 24)
    area = cv2.morphologyEx(
        dark, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (k, k))
    )
    n, labels, stats, _ = cv2.connectedComponentsWithStats(area)
    if n < 2:
        return gray
    mask = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(cols) < max(16, w // 3):
        return gray
    top = mask[:, cols].argmax(axis=0).astype(np.float64)
    bottom = (h - 1 - mask[::-1, cols].argmax(axis=0)).astype(np.float64)
    x = np.arange(w, dtype=np.float64)
    t = np.polyval(_outline(top, cols.astype(np.float64), True), x)
    b = np.polyval(_outline(bottom, cols.astype(np.float64), False), x)
    t0, b0 = float(t[cols].mean()), float(b[cols].mean())
    if b0 - t0 < 8:
        return gray
    rows = np.arange(h, dtype=np.float64)[:, None]
    map_y = t[None, :] + (rows - t0) * ((b - t) / (b0 - t0))[None, :]
    map_x = np.broadcast_to(x[None, :], (h, w))
    return cv2.remap(
        gray,
        map_x.astype(np.float32),
        map_y.astype(np.float32),
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )


def _straighten_columns(gray: np.ndarray) -> np.ndarray:
    """:func:`_straighten` across: a code whose left and right outlines bend."""
    return np.ascontiguousarray(_straighten(np.ascontiguousarray(gray.T)).T)


GLOBAL = zxingcpp.Binarizer.GlobalHistogram
FIXED = zxingcpp.Binarizer.FixedThreshold
# every extra way tried (``training.eval.payload_attempts`` measures each on synthetic hard codes)
CANDIDATE_ATTEMPTS: dict[str, Attempt] = {
    a.name: a
    for a in (
        Attempt("global-histogram", TARGET_SHORT_SIDE, binarizer=GLOBAL),
        Attempt("upscale-2x", 2 * TARGET_SHORT_SIDE),
        Attempt("upscale-3x", 3 * TARGET_SHORT_SIDE),
        Attempt("downscale", TARGET_SHORT_SIDE // 2),
        Attempt("sharpen", 2 * TARGET_SHORT_SIDE, _sharpen),
        Attempt("sharpen-global", 2 * TARGET_SHORT_SIDE, _sharpen, GLOBAL),
        Attempt("flatten", TARGET_SHORT_SIDE, _flatten),
        Attempt("flatten-fixed", TARGET_SHORT_SIDE, lambda g: _stretch(_flatten(g)), FIXED),
        Attempt("clahe", TARGET_SHORT_SIDE, _clahe),
        Attempt("stretch-fixed", TARGET_SHORT_SIDE, _stretch, FIXED),
        Attempt("median", TARGET_SHORT_SIDE, _median),
        Attempt("smooth", 2 * TARGET_SHORT_SIDE, _smooth),
        Attempt("smooth-global", 2 * TARGET_SHORT_SIDE, _smooth, GLOBAL),
        Attempt("wide-margin", TARGET_SHORT_SIDE, margin=0.35),
        Attempt("tight-margin", TARGET_SHORT_SIDE, margin=0.04),
        Attempt("pad", TARGET_SHORT_SIDE, _pad),
        Attempt("pad-upscale-2x", 2 * TARGET_SHORT_SIDE, _pad),
        Attempt("pad-sharpen", 2 * TARGET_SHORT_SIDE, lambda g: _pad(_sharpen(g))),
        Attempt("adaptive", TARGET_SHORT_SIDE, _adaptive, FIXED),
        Attempt("adaptive-2x", 2 * TARGET_SHORT_SIDE, _adaptive, FIXED),
        Attempt("straighten-rows", 2 * TARGET_SHORT_SIDE, _straighten),
        Attempt("straighten-columns", 2 * TARGET_SHORT_SIDE, _straighten_columns),
    )
}

# the attempts that paid for their time there (models/README.md, *Reading harder*), in the
# order they are tried: most new reads per millisecond first
HARD_ATTEMPTS: tuple[Attempt, ...] = (
    CANDIDATE_ATTEMPTS["upscale-3x"],
    CANDIDATE_ATTEMPTS["sharpen"],
)


def read_whole(image_bgr: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Texts and corners (4, 2) of every QR code zxing-cpp finds in the whole image."""
    return [(c.text, c.corners) for c in _read(_gray(image_bgr))]


def read_payloads(
    image_bgr: np.ndarray, detections: Detections, *, add_missed_as: int | None = None
) -> Detections:
    """The same boxes with ``text``/``corners`` filled where a QR code could be read.

    With ``add_missed_as`` (a class id), the whole image is read once as well and every
    code found there that lies in no box is appended as a detection of that class, with
    confidence 1.0 (a decoded code is certain) and its corners' bounding box: the crops
    then add reads to a plain whole-image read and never lose one.
    """
    if len(detections) == 0 and add_missed_as is None:
        return detections
    gray = _gray(image_bgr)
    assert detections.text is not None and detections.corners is not None
    texts = list(detections.text)
    corners = list(detections.corners)
    for i, box in enumerate(detections.xyxy):
        if texts[i] is None:
            code = _read_box(gray, box)
            if code is not None:
                texts[i], corners[i] = code.text, code.corners
    unread = [i for i, t in enumerate(texts) if t is None]
    whole = _read(gray) if unread or add_missed_as is not None else []
    missed = _fill_from_whole(whole, detections.xyxy, unread, texts, corners)
    logger.debug("payloads boxes=%d read=%d", len(texts), sum(t is not None for t in texts))
    found = Detections(
        xyxy=detections.xyxy,
        confidence=detections.confidence,
        class_id=detections.class_id,
        text=texts,
        corners=corners,
    )
    if add_missed_as is None or not missed:
        return found
    return _append_codes(found, missed, add_missed_as)


def _append_codes(dets: Detections, codes: list[_Code], class_id: int) -> Detections:
    assert dets.text is not None and dets.corners is not None
    boxes = np.array([[*c.corners.min(axis=0), *c.corners.max(axis=0)] for c in codes])
    return Detections(
        xyxy=np.concatenate([dets.xyxy, boxes.astype(np.float32)]),
        confidence=np.concatenate([dets.confidence, np.ones(len(codes), np.float32)]),
        class_id=np.concatenate([dets.class_id, np.full(len(codes), class_id, np.int64)]),
        text=[*dets.text, *(c.text for c in codes)],
        corners=[*dets.corners, *(c.corners for c in codes)],
    )


def drop_duplicate_reads(detections: Detections) -> Detections:
    """One detection per physical code: of the boxes that read the same code (same text,
    corner centres closer than half the code's side), keep the most confident; and drop
    unread boxes that half-cover a read code (:func:`_straddles_a_read_code`).

    Two boxes that overlap a little less than the NMS threshold can both read one code;
    a decoded payload with its corners identifies the code, so the extra box is a duplicate.
    """
    assert detections.text is not None and detections.corners is not None
    kept: list[int] = []
    for i in np.argsort(-detections.confidence, kind="stable"):
        text, corners = detections.text[i], detections.corners[i]
        if (
            text is None
            or corners is None
            or not any(
                _same_code(text, corners, detections.text[k], detections.corners[k]) for k in kept
            )
        ):
            kept.append(int(i))
    kept = [i for i in kept if not _straddles_a_read_code(detections, i)]
    if len(kept) == len(detections):
        return detections
    return detections[np.sort(np.asarray(kept, np.int64))]


STRADDLE_IOU = 0.2  # an unread box overlapping a read code this much...
CONTAINED = 0.9  # ...without one holding the other (this share of the smaller one inside)


def _straddles_a_read_code(detections: Detections, i: int) -> bool:
    """Whether unread box ``i`` half-covers a code read through another box: it overlaps
    the read code's corners (IoU >= :data:`STRADDLE_IOU`) while neither holds the other.
    Such a box is a second, misplaced detection of that code (on a shipping label, a box
    over the QR code and the symbol beside it), not a code of its own: another code
    beside a read one does not overlap it, and a code nested in a read one (or holding
    it) lies inside."""
    assert detections.text is not None and detections.corners is not None
    if detections.text[i] is not None:
        return False
    x1, y1, x2, y2 = (float(v) for v in detections.xyxy[i])
    own = max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
    for text, corners in zip(detections.text, detections.corners, strict=True):
        if text is None or corners is None:
            continue
        (a1, b1), (a2, b2) = corners.min(axis=0), corners.max(axis=0)
        code = max(float(a2 - a1), 0.0) * max(float(b2 - b1), 0.0)
        w, h = min(x2, float(a2)) - max(x1, float(a1)), min(y2, float(b2)) - max(y1, float(b1))
        inter = max(w, 0.0) * max(h, 0.0)
        if inter <= 0 or min(own, code) <= 0:
            continue
        iou = inter / (own + code - inter)
        if iou >= STRADDLE_IOU and inter < CONTAINED * min(own, code):
            return True
    return False


def _same_code(
    text: str, corners: np.ndarray, other_text: str | None, other: np.ndarray | None
) -> bool:
    if other_text != text or other is None:
        return False
    side = float(np.linalg.norm(corners[1] - corners[0]))
    return float(np.linalg.norm(corners.mean(axis=0) - other.mean(axis=0))) < side / 2


def _gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def _read(
    gray: np.ndarray, binarizer: zxingcpp.Binarizer = zxingcpp.Binarizer.LocalAverage
) -> list[_Code]:
    results = zxingcpp.read_barcodes(
        np.ascontiguousarray(gray),
        formats=QR_FORMATS,
        text_mode=zxingcpp.TextMode.Plain,
        binarizer=binarizer,
    )
    codes = []
    for r in results:
        p = r.position
        pts = [p.top_left, p.top_right, p.bottom_right, p.bottom_left]
        codes.append(_Code(r.text, np.array([[q.x, q.y] for q in pts], np.float32)))
    return codes


def crop_window(
    box: np.ndarray, shape: tuple[int, ...], fraction: float = MARGIN_FRACTION
) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (float(v) for v in box)
    margin = max(fraction * max(x2 - x1, y2 - y1), MIN_MARGIN_PX)
    h, w = shape[:2]
    left, top = max(int(x1 - margin), 0), max(int(y1 - margin), 0)
    right, bottom = min(int(np.ceil(x2 + margin)), w), min(int(np.ceil(y2 + margin)), h)
    return left, top, right, bottom


def _scales(crop_shape: tuple[int, ...]) -> list[float]:
    """Upscale factors to try: short side near the target, 1.6x that, then as it is."""
    short, long = min(crop_shape[:2]), max(crop_shape[:2])
    cap = max(min(MAX_UPSCALE, MAX_CROP_SIDE / long), 1.0)
    first = min(max(TARGET_SHORT_SIDE / short, 1.0), cap)
    return list(dict.fromkeys([first, min(first * RETRY_UPSCALE, cap), 1.0]))


def _read_box(gray: np.ndarray, box: np.ndarray) -> _Code | None:
    left, top, right, bottom = crop_window(box, gray.shape)
    if right - left < 8 or bottom - top < 8:
        return None
    crop = gray[top:bottom, left:right]
    for scale in _scales(crop.shape):
        scaled = crop
        if scale != 1.0:
            size = (round(crop.shape[1] * scale), round(crop.shape[0] * scale))
            scaled = cv2.resize(crop, size, interpolation=cv2.INTER_CUBIC)
        found = _read(scaled)
        if found:
            sx = scaled.shape[1] / crop.shape[1]
            sy = scaled.shape[0] / crop.shape[0]
            codes = [_Code(c.text, _unscale(c.corners, sx, sy, left, top)) for c in found]
            best = _nearest_inside(codes, box)
            if best is not None and _box_iou(best.corners, box) < NESTED_IOU:
                outer = _read_around(scaled, found)
                if outer is not None:
                    code = _Code(outer.text, _unscale(outer.corners, sx, sy, left, top))
                    if _box_iou(code.corners, box) > _box_iou(best.corners, box):
                        return code
            return best
    return None


NESTED_IOU = 0.25  # a code read in a box it fills less than this may be nested in another


def _read_around(gray: np.ndarray, found: list[_Code]) -> _Code | None:
    """The crop read again with the codes already found painted over in its light grey: a
    small code printed inside a larger one hides the larger one from zxing-cpp, which
    reads it once the small one is blanked (its error correction restores the modules
    under it)."""
    blank = gray.copy()
    light = int(np.percentile(gray, 95))
    for c in found:
        cv2.fillConvexPoly(blank, np.round(c.corners).astype(np.int32), light)
    texts = {c.text for c in found}
    others = [c for c in _read(blank) if c.text not in texts]
    return max(others, key=lambda c: float(np.ptp(c.corners[:, 0])), default=None)


def read_box_with(gray: np.ndarray, box: np.ndarray, attempt: Attempt) -> _Code | None:
    """The code in ``box`` read the ``attempt``'s way, or None."""
    left, top, right, bottom = crop_window(box, gray.shape, attempt.margin)
    if right - left < 8 or bottom - top < 8:
        return None
    crop = gray[top:bottom, left:right]
    scaled = crop
    if attempt.short:
        short, long = min(crop.shape[:2]), max(crop.shape[:2])
        scale = min(attempt.short / short, MAX_CROP_SIDE / long)
        size = (max(8, round(crop.shape[1] * scale)), max(8, round(crop.shape[0] * scale)))
        interp = cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA
        scaled = cv2.resize(crop, size, interpolation=interp)
    ready = attempt.prepare(scaled) if attempt.prepare is not None else scaled
    found = _read(ready, attempt.binarizer)
    if not found:
        return None
    sx, sy = scaled.shape[1] / crop.shape[1], scaled.shape[0] / crop.shape[0]
    return _nearest_inside(
        [_Code(c.text, _unscale(c.corners, sx, sy, left, top)) for c in found], box
    )


def read_harder(
    image_bgr: np.ndarray,
    detections: Detections,
    which: Sequence[int],
    attempts: Sequence[Attempt] = (),
) -> Detections:
    """``detections`` with the boxes ``which`` (unread ones) read by ``attempts`` in
    turn, each box until one of them reads it."""
    if not which or not attempts:
        return detections
    assert detections.text is not None and detections.corners is not None
    gray = _gray(image_bgr)
    texts, corners = list(detections.text), list(detections.corners)
    for i in which:
        for attempt in attempts:
            code = read_box_with(gray, detections.xyxy[i], attempt)
            if code is not None:
                texts[i], corners[i] = code.text, code.corners
                logger.debug("payload read harder box=%d attempt=%s", i, attempt.name)
                break
    return Detections(
        xyxy=detections.xyxy,
        confidence=detections.confidence,
        class_id=detections.class_id,
        text=texts,
        corners=corners,
    )


def _unscale(pts: np.ndarray, sx: float, sy: float, left: int, top: int) -> np.ndarray:
    # zxing's corners are pixel positions; map pixel centres through the resize
    out = np.empty_like(pts)
    out[:, 0] = (pts[:, 0] + 0.5) / sx - 0.5 + left
    out[:, 1] = (pts[:, 1] + 0.5) / sy - 0.5 + top
    return out


def _inside(point: np.ndarray, box: np.ndarray) -> bool:
    return bool(box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3])


def _nearest_inside(codes: list[_Code], box: np.ndarray) -> _Code | None:
    """The code whose centre lies in the box and whose extent matches it best (IoU of its
    corners' bounding box with the box; the nearest centre breaks ties): a box over a
    code with a smaller code printed in its middle is the larger code's."""
    centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    inside = [c for c in codes if _inside(c.center, box)]
    if not inside:
        return None
    return max(
        inside,
        key=lambda c: (
            round(_box_iou(c.corners, box), 1),
            -float(np.linalg.norm(c.center - centre)),
        ),
    )


def _box_iou(corners: np.ndarray, box: np.ndarray) -> float:
    (a1, b1), (a2, b2) = corners.min(axis=0), corners.max(axis=0)
    x1, y1, x2, y2 = (float(v) for v in box)
    w = min(x2, float(a2)) - max(x1, float(a1))
    h = min(y2, float(b2)) - max(y1, float(b1))
    inter = max(w, 0.0) * max(h, 0.0)
    union = (x2 - x1) * (y2 - y1) + float((a2 - a1) * (b2 - b1)) - inter
    return inter / union if union > 0 else 0.0


def _same_place(code: _Code, corners: np.ndarray) -> bool:
    """Whether ``corners`` are those of ``code``: centres within a quarter of its diagonal
    and sizes within 1.5 x (a code nested in another shares its centre, not its size)."""
    size = float(np.linalg.norm(code.corners[0] - code.corners[2]))
    other = float(np.linalg.norm(corners[0] - corners[2]))
    near = float(np.linalg.norm(code.center - corners.mean(axis=0))) < 0.25 * size
    return near and max(size, other) < 1.5 * max(min(size, other), 1e-6)


def _fill_from_whole(
    whole: list[_Code],
    boxes: np.ndarray,
    unread: list[int],
    texts: list[str | None],
    corners: list[np.ndarray | None],
) -> list[_Code]:
    """Give each unread box the whole-image code centred in it (each code to one box);
    return the codes that no box holds: those in no box, and those inside boxes that all
    read another code (a small code printed inside a larger one)."""
    known = [c for c in corners if c is not None]
    missed = []
    for code in whole:
        if any(_same_place(code, k) for k in known):
            continue  # already read through its own box
        if not any(_inside(code.center, box) for box in boxes):
            missed.append(code)
            continue
        owners = [i for i in unread if texts[i] is None and _inside(code.center, boxes[i])]
        if not owners:
            missed.append(code)
            known.append(code.corners)
            continue
        box_centres = {i: (boxes[i, :2] + boxes[i, 2:]) / 2 for i in owners}
        best = min(owners, key=lambda i: float(np.linalg.norm(box_centres[i] - code.center)))
        texts[best], corners[best] = code.text, code.corners
        known.append(code.corners)
    return missed
