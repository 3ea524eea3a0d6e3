"""Synthetic test families: one situation per family, photos at their native size.

Each family is a stream of images that shows one situation, so a detector's false
positives and misses can be counted per situation (``training/eval/synthetic.py``) and the
crop verifier can be trained on the hard ones (``training/verify.py``, other seeds):

- **positives** (:data:`POSITIVE`): one QR code with a known payload, in one hard
  condition — ``plain``, ``small`` (1.1-1.8 px per module), ``blur`` (defocus about half a
  module), ``motion``, ``glare`` (a highlight over the code), ``perspective`` (a strong
  one), ``curved`` (a bottle or a sleeve), ``closeup`` (the code fills the frame),
  ``dense`` (versions 25-40), ``inverted`` (light on dark), ``noisy`` (sensor noise and
  hard JPEG), ``low-contrast``, ``on-texture`` (on a texture close-up below);
- **texture close-ups** (:data:`TEXTURES`): a fine-grained natural texture filling the
  frame (``training.textures``: carpet, gravel, sand, foliage, fabric, asphalt, 1/f
  noise), tilted, in and out of focus — no code;
- **other symbologies** (:data:`SYMBOLS`): one PDF417, Aztec, Data Matrix, MaxiCode or
  1-D barcode (written by zxing-cpp) on a label, filling 25-90 % of the frame — no QR code;
- round two (issue 31): **filled** (:data:`FILLED`) — Aztec, PDF417, Data Matrix or
  MaxiCode filling 60-100 % of the frame, half computer-generated, half photographed;
  **dense** (:data:`DENSE`) — the same with long payloads (large Aztec, PDF417 and Data
  Matrix symbols, the kind the detector boxes; rendered at 1-4 px per module);
  **surfaces** (:data:`SURFACES`, ``training.surfaces``) — worn, scratched, printed-over
  and patterned surfaces filling the frame; **shipping labels** — a 4 x 6 in label with
  MaxiCode, Code 128, PDF417 and Data Matrix, photographed at an angle, with a QR code
  (``label-qr``: exactly that code must get a box) or without one (``label-no-qr``).

``scene(seed, index, family)`` is deterministic. Images are RGB ``uint8`` at a phone-photo
aspect (4:3, 3:4 or 1:1), 480-1600 px on the long side, so the detector shrinks most of
them as it shrinks photos. No real photo is used: backgrounds come from
``training.synth`` (procedural, text, the photos inside scikit-image).
"""

from __future__ import annotations

import string
import zlib
from dataclasses import dataclass

import cv2
import numpy as np
import segno
import zxingcpp

from training import synth
from training.surfaces import KINDS as SURFACE_KINDS
from training.surfaces import surface
from training.textures import KINDS, closeup, texture

POSITIVE = (
    "plain",
    "small",
    "blur",
    "motion",
    "glare",
    "perspective",
    "curved",
    "closeup",
    "dense",
    "inverted",
    "noisy",
    "low-contrast",
    "on-texture",
)
TEXTURES = tuple(f"texture-{k}" for k in KINDS)
SYMBOL_FORMATS = {
    "PDF417": ("PDF417", "CompactPDF417"),
    "Aztec": ("Aztec",),
    "DataMatrix": ("DataMatrix",),
    "MaxiCode": ("MaxiCode",),
    "1D": ("Code128", "EAN13", "Code39", "ITF", "UPCA", "Code93"),
}
SYMBOLS = tuple(f"symbol-{k}" for k in SYMBOL_FORMATS)
# round two (issue 31); kept apart from the tuples above, which make the verifier v2's
# training recipe (training/verify.py)
FILLED = tuple(f"fill-{k}" for k in ("Aztec", "PDF417", "DataMatrix", "MaxiCode"))
# the same with long payloads: the large symbols (Aztec's reference grid, a PDF417 of many
# rows, a Data Matrix of several regions) look most like a dense QR code to the detector
DENSE = tuple(f"dense-{k}" for k in ("Aztec", "PDF417", "DataMatrix"))
DENSE_LENGTH = {"Aztec": (300, 1500), "PDF417": (200, 900), "DataMatrix": (300, 1500)}
SURFACES = tuple(f"surface-{k}" for k in SURFACE_KINDS)
LABEL_WITH_QR = "label-qr"
LABEL_WITHOUT_QR = "label-no-qr"
NESTED = "nested"  # a small QR code printed inside a larger one (two codes)
ARTISTIC = "artistic"  # modules printed as dots over a picture
ALL_POSITIVE = (*POSITIVE, LABEL_WITH_QR, NESTED, ARTISTIC)
NEGATIVE = TEXTURES + SYMBOLS + FILLED + DENSE + SURFACES + (LABEL_WITHOUT_QR,)
FAMILIES = ALL_POSITIVE + NEGATIVE
SUPERSAMPLE = 2


@dataclass(frozen=True)
class Scene:
    """An RGB image, the boxes (x1, y1, x2, y2) of its QR codes and their payloads, and
    ``hard``: the regions that look like a code and are not one (the symbol's label; the
    whole frame of a texture)."""

    image: np.ndarray
    boxes: np.ndarray
    texts: list[str]
    family: str
    hard: np.ndarray


def scene(seed: int, index: int, family: str, long_side: tuple[int, int] | None = None) -> Scene:
    """Image ``index`` of ``family`` in the stream ``seed`` (``long_side``: the range of the
    image's longer side instead of the family's own)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    rng = np.random.default_rng([seed, zlib.crc32(family.encode()), index])
    if family in TEXTURES:
        return _texture_scene(rng, family, long_side or (640, 1600))
    if family in SYMBOLS:
        return _symbol_scene(rng, family, long_side or (480, 1600))
    if family in FILLED or family in DENSE:
        return _filled_scene(rng, family, long_side or (320, 1200))
    if family in SURFACES:
        return _surface_scene(rng, family, long_side or (640, 1600))
    if family == NESTED:
        return _nested_scene(rng, long_side or (480, 1280))
    if family == ARTISTIC:
        return _artistic_scene(rng, long_side or (480, 1280))
    if family in (LABEL_WITH_QR, LABEL_WITHOUT_QR):
        return _label_scene(rng, family == LABEL_WITH_QR, long_side or (640, 1600))
    return _code_scene(rng, family, long_side or (480, 1280))


def _photo_size(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int]:
    long = int(rng.integers(lo // 16, hi // 16 + 1)) * 16
    aspect = float(rng.choice([0.75, 1.0, 0.75]))
    short = int(long * aspect) // 16 * 16
    return (long, short) if rng.random() < 0.5 else (short, long)


def _camera(rng: np.random.Generator, img: np.ndarray, noise: float, quality: int) -> np.ndarray:
    """Sensor noise and JPEG compression."""
    if noise > 0:
        f = img.astype(np.float32) + rng.normal(0, noise, img.shape).astype(np.float32)
        img = np.clip(f, 0, 255).astype(np.uint8)
    ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    return cv2.imdecode(enc, cv2.IMREAD_UNCHANGED) if ok else img


# --------------------------------------------------------------------------- negatives
def _texture_scene(rng: np.random.Generator, family: str, size: tuple[int, int]) -> Scene:
    h, w = _photo_size(rng, *size)
    img = closeup(rng, texture(rng, family.removeprefix("texture-"), h, w))
    img = _camera(rng, img, rng.uniform(0, 6), int(rng.integers(60, 96)))
    frame = np.array([[0, 0, w, h]], np.float32)
    return Scene(img, np.zeros((0, 4), np.float32), [], family, frame)


def _symbol_image(
    rng: np.random.Generator, fmt: str, length: tuple[int, int] | None = None
) -> np.ndarray:
    """The symbol on white at one pixel per module (1-D: bars 1 px, drawn tall), uint8;
    ``length``: the range of a 2-D symbol's payload length instead of the usual one."""
    letters = string.ascii_uppercase + string.digits
    digits = {"EAN13": 12, "UPCA": 11, "ITF": 2 * int(rng.integers(3, 8))}
    if length is not None:
        content = "".join(
            rng.choice(list(letters + string.ascii_lowercase + " ./-"), int(rng.integers(*length)))
        )
    elif fmt in digits:
        content = "".join(rng.choice(list(string.digits), digits[fmt]))
    elif fmt in ("Code39", "Code93", "Code128"):
        content = "".join(rng.choice(list(letters), int(rng.integers(6, 16))))
    else:
        content = "".join(
            rng.choice(
                list(letters + string.ascii_lowercase + " "),
                int(rng.integers(8, 50 if fmt == "MaxiCode" else 120)),
            )
        )
    bc = zxingcpp.create_barcode(content, getattr(zxingcpp.BarcodeFormat, fmt))
    img = np.asarray(zxingcpp.write_barcode_to_image(bc, scale=1))
    return img[..., 0] if img.ndim == 3 else img


def _label(rng: np.random.Generator, symbol: np.ndarray, side: float) -> np.ndarray:
    """A paper label: the symbol scaled to ``side`` px (longer side), a margin, text."""
    sh, sw = symbol.shape
    scale = side / max(sh, sw)
    sym = cv2.resize(symbol, (max(1, round(sw * scale)), max(1, round(sh * scale))), cv2.INTER_AREA)
    if sh < sw / 4:  # a 1-D barcode: give the bars a height
        sym = cv2.resize(sym, (sym.shape[1], int(sym.shape[1] * rng.uniform(0.3, 0.6))))
    pad = int(side * rng.uniform(0.08, 0.35))
    paper = int(rng.integers(200, 256))
    label = np.full((sym.shape[0] + 2 * pad, sym.shape[1] + 2 * pad), paper, np.uint8)
    ink = int(rng.integers(0, 60))
    label[pad : pad + sym.shape[0], pad : pad + sym.shape[1]] = np.where(sym < 128, ink, paper)
    for _ in range(int(rng.integers(0, 6))):  # printed text around it
        y = int(
            rng.choice(
                [rng.integers(0, max(1, pad)), rng.integers(pad + sym.shape[0], label.shape[0])]
            )
        )
        txt = "".join(rng.choice(list(string.ascii_uppercase + string.digits + " -"), 18))
        cv2.putText(
            label,
            txt,
            (int(rng.integers(0, pad + 1)), y),
            cv2.FONT_HERSHEY_SIMPLEX,
            max(0.3, side / 500),
            ink,
            max(1, int(side / 300)),
            cv2.LINE_AA,
        )
    return label


def _symbol_scene(rng: np.random.Generator, family: str, size: tuple[int, int]) -> Scene:
    h, w = _photo_size(rng, *size)
    canvas, _ = synth._background(rng, h, w)
    formats = SYMBOL_FORMATS[family.removeprefix("symbol-")]
    fmt = formats[int(rng.integers(0, len(formats)))]
    side = rng.uniform(0.25, 0.9) * min(h, w)
    label = _label(rng, _symbol_image(rng, fmt), side * 0.8)
    lh, lw = label.shape
    fit = min(1.0, 0.98 * min(h, w) / max(lh, lw))  # the label may fill the frame
    quad = _quad(rng, (w / 2, h / 2), lw * fit, lh * fit, rotate=0.4, persp=0.12)
    rgb = np.repeat(label[..., None], 3, axis=2).astype(np.float32)
    rgb *= synth._colours(rng)[1] / 255 if rng.random() < 0.3 else 1.0
    _composite(canvas, rgb, quad)
    img = _degrade(rng, canvas, "symbol", module=side / 40)
    lo = np.clip(quad.min(0), 0, [w, h])
    hi = np.clip(quad.max(0), 0, [w, h])
    label_box = np.array([[*lo, *hi]], np.float32)
    return Scene(img, np.zeros((0, 4), np.float32), [], family, label_box)


def _surface_scene(rng: np.random.Generator, family: str, size: tuple[int, int]) -> Scene:
    h, w = _photo_size(rng, *size)
    img = closeup(rng, surface(rng, family.removeprefix("surface-"), h, w))
    img = _camera(rng, img, rng.uniform(0, 6), int(rng.integers(60, 96)))
    frame = np.array([[0, 0, w, h]], np.float32)
    return Scene(img, np.zeros((0, 4), np.float32), [], family, frame)


def _filled_scene(rng: np.random.Generator, family: str, size: tuple[int, int]) -> Scene:
    """Another 2-D symbol filling the frame: half of them computer-generated (the image is
    the symbol, 100-500 px on its longer side, resampled, a quiet zone of 0-4 modules, as a label
    file or a screenshot is sent), half photographed filling 60-100 % of the frame (a
    slight angle, focus, light, noise, JPEG)."""
    if family in DENSE:
        fmt = family.removeprefix("dense-")
        sym = _symbol_image(rng, fmt, DENSE_LENGTH[fmt])
    else:
        sym = _symbol_image(rng, family.removeprefix("fill-"))
    h, w = _photo_size(rng, *size)
    sh, sw = sym.shape
    fill = rng.uniform(0.6, 1.0)
    scale = fill * min(h / sh, w / sw)
    if rng.random() < 0.5:  # the image is the symbol: a render of 100-500 px
        k = rng.uniform(100, 500) / max(sh, sw)
        if family in DENSE:  # a large symbol rendered as files are: 1-4 px per module
            k = rng.uniform(1.0, 4.0)
        interp = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_AREA)[int(rng.integers(0, 3))]
        big = cv2.resize(sym, (round(sw * k), round(sh * k)), interpolation=interp)
        quiet = round(int(rng.integers(0, 5)) * k)
        img = cv2.copyMakeBorder(big, quiet, quiet, quiet, quiet, cv2.BORDER_CONSTANT, value=255)
        box = np.array([[quiet, quiet, quiet + big.shape[1], quiet + big.shape[0]]], np.float32)
        rgb = np.repeat(img[..., None], 3, axis=2)
        return Scene(rgb, np.zeros((0, 4), np.float32), [], family, box)
    canvas = np.full((h, w, 3), rng.uniform(200, 255), np.uint8)
    rgb = np.repeat(sym[..., None], 3, axis=2).astype(np.float32)
    quad = _quad(rng, (w / 2, h / 2), sw * scale, sh * scale, rotate=0.1, persp=0.05)
    _composite(canvas, rgb, quad)
    img = _degrade(rng, canvas, "symbol", module=scale)
    lo, hi = np.clip(quad.min(0), 0, [w, h]), np.clip(quad.max(0), 0, [w, h])
    return Scene(img, np.zeros((0, 4), np.float32), [], family, np.array([[*lo, *hi]], np.float32))


def _shipping_label(
    rng: np.random.Generator, with_qr: bool
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A 4 x 6 in shipping label at about 200 dpi (grey ``uint8``) and the mask of its QR
    code's symbol area (empty without one): MaxiCode, a QR code or a Data Matrix in the top
    squares, Code 128 and PDF417 across, a Data Matrix low on the left, text lines."""
    lh, lw = 1200, 800
    label = np.full((lh, lw), 250, np.uint8)
    mask = np.zeros((lh, lw), np.uint8)

    def put(sym: np.ndarray, x: int, y: int, bw: int, bh: int, *, is_qr: bool = False) -> None:
        sh, sw = sym.shape
        k = max(1, min(bw // sw, bh // sh))
        big = cv2.resize(sym, (sw * k, sh * k), interpolation=cv2.INTER_NEAREST)
        if sh < sw / 4:  # 1-D: tall bars
            big = cv2.resize(big, (big.shape[1], bh), interpolation=cv2.INTER_NEAREST)
        big = big[: lh - y, : lw - x]
        label[y : y + big.shape[0], x : x + big.shape[1]] = big
        if is_qr:
            mask[y : y + big.shape[0], x : x + big.shape[1]] = 255

    slots = [(40, 40, 330, 330), (430, 40, 330, 330)]
    order = rng.permutation(2)
    put(_symbol_image(rng, "MaxiCode"), *slots[order[0]])
    x, y, bw, bh = slots[order[1]]
    texts = [_payload(rng)] if with_qr else []
    if with_qr:
        code = _qr(rng, texts[0], dense=False)
        put(np.where(code > 0, 0, 255).astype(np.uint8), x, y, bw, bh, is_qr=True)
    else:
        put(_symbol_image(rng, "DataMatrix"), x, y, bw, bh)
    put(_symbol_image(rng, "Code128"), 60, 420, 680, 150)
    put(_symbol_image(rng, "PDF417"), 40, 640, 720, 220)
    put(_symbol_image(rng, "DataMatrix"), 40, 920, 220, 220)
    for k in range(int(rng.integers(4, 10))):
        text = "".join(rng.choice(list(string.ascii_uppercase + string.digits + " -"), 20))
        cv2.putText(
            label, text, (300, 950 + 35 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.9, 0, 2, cv2.LINE_AA
        )
    cv2.rectangle(label, (10, 10), (lw - 10, lh - 10), 0, 3)
    return label, mask, texts


def _label_scene(rng: np.random.Generator, with_qr: bool, size: tuple[int, int]) -> Scene:
    """A shipping label photographed at an angle on a parcel, filling 50-95 % of the
    frame: with a QR code (its box the one expected) or without one (no box expected)."""
    h, w = _photo_size(rng, *size)
    canvas, _ = synth._background(rng, h, w)
    label, mask, texts = _shipping_label(rng, with_qr)
    lh, lw = label.shape
    scale = rng.uniform(0.5, 0.95) * min(h / lh, w / lw)
    quad = _quad(rng, (w / 2, h / 2), lw * scale, lh * scale, rotate=0.3, persp=0.12)
    rgb = np.repeat(label[..., None], 3, axis=2).astype(np.float32)
    box = _composite(canvas, rgb, quad, mask if with_qr else None)
    img = _degrade(rng, canvas, "label", module=scale * 4)
    family = LABEL_WITH_QR if with_qr else LABEL_WITHOUT_QR
    if not with_qr or box is None:
        lo, hi = np.clip(quad.min(0), 0, [w, h]), np.clip(quad.max(0), 0, [w, h])
        hard = np.array([[*lo, *hi]], np.float32)
        return Scene(img, np.zeros((0, 4), np.float32), [], family, hard)
    return Scene(img, box[None], texts, family, np.zeros((0, 4), np.float32))


def _nested_scene(rng: np.random.Generator, size: tuple[int, int]) -> Scene:
    """A small QR code printed inside a larger one, at half its module size, over its
    centre (the outer code at error correction H, so it still reads): two codes, two
    boxes, two payloads; photographed at a mild angle."""
    h, w = _photo_size(rng, *size)
    canvas, _ = synth._background(rng, h, w)
    texts = [_payload(rng)[:60], _payload(rng)[:20]]
    outer = segno.make_qr(texts[0], error="H", boost_error=False)
    version = max(int(outer.version), int(rng.integers(6, 11)))
    outer = segno.make_qr(texts[0], error="H", version=version, boost_error=False)
    inner = segno.make_qr(texts[1], error="M", boost_error=False)
    big = np.kron(np.array([list(r) for r in outer.matrix], np.uint8), np.ones((2, 2), np.uint8))
    small = np.pad(np.array([list(r) for r in inner.matrix], np.uint8), 1)  # 1 light module
    n, m = big.shape[0], small.shape[0]
    at = (n - m) // 2
    big[at : at + m, at : at + m] = small
    quiet = 4 * 2
    grid = np.pad(big, quiet)
    ppm = 3
    cells = cv2.resize(grid, (grid.shape[1] * ppm,) * 2, interpolation=cv2.INTER_NEAREST)
    tex = np.where(cells[..., None] > 0, 20.0, 235.0).astype(np.float32) * np.ones(3, np.float32)
    th = tex.shape[0]
    side = rng.uniform(0.35, 0.8) * min(h, w)
    quad = _quad(rng, (w / 2, h / 2), side, side, rotate=0.3, persp=0.05)
    outer_px = np.float32([[quiet, quiet], [quiet + n, quiet], [quiet + n, quiet + n]]) * ppm
    inner_lo, inner_hi = (quiet + at + 1) * ppm, (quiet + at + m - 1) * ppm
    mat = cv2.getPerspectiveTransform(np.float32([[0, 0], [th, 0], [th, th], [0, th]]), quad)
    boxes = []
    for lo, hi in ((outer_px[0, 0], outer_px[1, 0]), (inner_lo, inner_hi)):
        pts = np.float32([[lo, lo], [hi, lo], [hi, hi], [lo, hi]])[None]
        warped = cv2.perspectiveTransform(pts, mat)[0]
        boxes.append([*warped.min(0), *warped.max(0)])
    _composite(canvas, tex, quad)
    img = _degrade(rng, canvas, NESTED, module=side / grid.shape[0])
    return Scene(img, np.array(boxes, np.float32), texts, NESTED, np.zeros((0, 4), np.float32))


def _artistic_scene(rng: np.random.Generator, size: tuple[int, int]) -> Scene:
    """An artistic QR code (error correction H): a picture fills the code, each module is
    only a dot or a small square of 25-45 % of its width at its centre (where a reader
    samples it), the finder patterns stay solid; photographed at a mild angle."""
    h, w = _photo_size(rng, *size)
    canvas, _ = synth._background(rng, h, w)
    text = _payload(rng)[:60]
    code = segno.make_qr(text, error="H", boost_error=False)
    dark = np.array([list(r) for r in code.matrix], np.uint8)
    n, ppm, quiet = dark.shape[0], 12, 4
    side_px = (n + 2 * quiet) * ppm
    picture, _ = synth._background(rng, side_px, side_px)
    tex = picture.astype(np.float32)
    frac = rng.uniform(0.25, 0.45)
    round_dots = rng.random() < 0.5
    dot = np.zeros((ppm, ppm), np.float32)
    r = frac * ppm / 2
    if round_dots:
        cv2.circle(dot, (ppm // 2, ppm // 2), max(1, round(r)), 1.0, -1, cv2.LINE_AA)
    else:
        a, b = round(ppm / 2 - r), round(ppm / 2 + r)
        dot[a:b, a:b] = 1.0
    finder = np.zeros((n, n), bool)
    for y, x in ((0, 0), (0, n - 8), (n - 8, 0)):
        finder[y : y + 8, x : x + 8] = True
    mask = np.kron(np.ones((n, n), np.float32), dot)
    mask = np.where(np.kron(finder, np.ones((ppm, ppm), bool)), 1.0, mask)
    value = np.kron(np.where(dark > 0, 20.0, 240.0), np.ones((ppm, ppm), np.float32))
    q = quiet * ppm
    inner = tex[q : q + n * ppm, q : q + n * ppm]
    tex[q : q + n * ppm, q : q + n * ppm] = inner * (1 - mask[..., None]) + (
        value[..., None] * mask[..., None]
    )
    tex[:q] = tex[-q:] = 240.0
    tex[:, :q] = tex[:, -q:] = 240.0
    side = rng.uniform(0.35, 0.85) * min(h, w)
    quad = _quad(rng, (w / 2, h / 2), side, side, rotate=0.3, persp=0.05)
    sym = np.zeros((side_px, side_px), np.uint8)
    sym[q : q + n * ppm, q : q + n * ppm] = 255
    box = _composite(canvas, np.clip(tex, 0, 255), quad, sym)
    img = _degrade(rng, canvas, ARTISTIC, module=side / (n + 2 * quiet))
    if box is None:
        return Scene(img, np.zeros((0, 4), np.float32), [], ARTISTIC, np.zeros((0, 4)))
    return Scene(img, box[None], [text], ARTISTIC, np.zeros((0, 4), np.float32))


# --------------------------------------------------------------------------- positives
def _payload(rng: np.random.Generator) -> str:
    kind = int(rng.integers(0, 4))
    n = int(rng.integers(4, 60)) if rng.random() < 0.8 else int(rng.integers(60, 250))
    if kind == 0:
        host = "".join(rng.choice(list(string.ascii_lowercase), int(rng.integers(3, 12))))
        path = "".join(rng.choice(list(string.ascii_letters + string.digits + "/-_"), n))
        return f"https://{host}.com/{path}"
    if kind == 1:
        return "".join(rng.choice(list(string.digits), n))
    if kind == 2:
        return "".join(rng.choice(list(string.ascii_uppercase + string.digits + " $%*+-./:"), n))
    return "".join(rng.choice(list(string.ascii_letters + string.digits + " .,;:!?()"), n))


def _qr(rng: np.random.Generator, text: str, dense: bool) -> np.ndarray:
    error = str(rng.choice(["L", "M", "Q", "H"]))
    qr = segno.make_qr(text, error=error, boost_error=False)
    version = int(qr.version)
    want = int(rng.integers(max(version, 25), 41)) if dense else version + int(rng.integers(0, 3))
    if want != version:
        qr = segno.make_qr(text, error=error, version=min(want, 40), boost_error=False)
    return np.array([list(row) for row in qr.matrix], dtype=np.uint8)


def _quad(
    rng: np.random.Generator,
    centre: tuple[float, float],
    w: float,
    h: float,
    *,
    rotate: float,
    persp: float,
) -> np.ndarray:
    theta = rng.uniform(0, 2 * np.pi) if rng.random() < rotate else rng.normal(0, 0.12)
    sq = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]], np.float32)
    sq += rng.uniform(-persp, persp, (4, 2)).astype(np.float32) * max(w, h)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]], np.float32)
    return (sq @ rot.T + np.array(centre, np.float32)).astype(np.float32)


def _composite(
    canvas: np.ndarray, tex: np.ndarray, quad: np.ndarray, sym: np.ndarray | None = None
) -> np.ndarray | None:
    """Warp the texture ``tex`` (RGB float) onto ``quad`` of the canvas (anti-aliased, in
    place); return the bounding box of where the mask ``sym`` (tex-sized, 0/255) lands."""
    th, tw = tex.shape[:2]
    h, w = canvas.shape[:2]
    x0, y0 = np.floor(quad.min(0)).astype(int) - 2
    x1, y1 = np.ceil(quad.max(0)).astype(int) + 2
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        return None
    s = SUPERSAMPLE
    src = np.array([[0, 0], [tw, 0], [tw, th], [0, th]], np.float32)
    dst = ((quad - np.array([x0, y0], np.float32)) * s).astype(np.float32)
    mat = cv2.getPerspectiveTransform(src, dst)
    size = ((x1 - x0) * s, (y1 - y0) * s)
    big = cv2.warpPerspective(tex, mat, size, flags=cv2.INTER_LINEAR)
    alpha = cv2.warpPerspective(np.ones((th, tw), np.float32), mat, size, flags=cv2.INTER_LINEAR)
    small = cv2.resize(big, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    a = cv2.resize(alpha, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)[..., None]
    region = canvas[y0:y1, x0:x1].astype(np.float32)
    canvas[y0:y1, x0:x1] = np.clip(region * (1 - a) + small * a, 0, 255).astype(np.uint8)
    if sym is None:
        return None
    m = cv2.warpPerspective(sym, mat, size, flags=cv2.INTER_NEAREST)
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
        return None
    return np.array(
        [x0 + xs.min() / s, y0 + ys.min() / s, x0 + (xs.max() + 1) / s, y0 + (ys.max() + 1) / s],
        np.float32,
    )


def _code_scene(rng: np.random.Generator, family: str, size: tuple[int, int]) -> Scene:
    h, w = _photo_size(rng, *size)
    if family == "on-texture":  # a sticker on carpet, a tag on fabric...
        kind = KINDS[int(rng.integers(0, len(KINDS)))]
        canvas = closeup(rng, texture(rng, kind, h, w))
    else:
        canvas, _ = synth._background(rng, h, w)
    text = _payload(rng)
    dark = _qr(rng, text, dense=family == "dense")
    n = dark.shape[0]
    quiet = int(rng.integers(0, 3)) if family == "closeup" else int(rng.integers(2, 5))
    short = min(h, w)
    if family == "closeup":
        module = rng.uniform(0.85, 0.98) * short / n
    elif family == "small":
        module = rng.uniform(1.1, 1.8)
    else:
        module = rng.uniform(1.8 if family == "dense" else 2.2, 7.0)
    module = min(module, 0.9 * short / (n + 2 * quiet))
    ppm = int(np.clip(np.ceil(3 * module), 2, 12))  # texture pixels per module
    grid = np.pad(dark, quiet)
    d_col = rng.uniform(0, 60, 3).astype(np.float32)
    l_col = rng.uniform(190, 255, 3).astype(np.float32)
    if family == "low-contrast":
        d_col, l_col = (
            rng.uniform(70, 120, 3).astype(np.float32),
            rng.uniform(140, 185, 3).astype(np.float32),
        )
    if family == "inverted":
        d_col, l_col = l_col, d_col
    cells = cv2.resize(
        grid, (grid.shape[1] * ppm, grid.shape[0] * ppm), interpolation=cv2.INTER_NEAREST
    )
    tex = np.where(cells[..., None] > 0, d_col, l_col).astype(np.float32)
    th, tw = tex.shape[:2]
    sym = np.zeros((th, tw), np.uint8)
    q = quiet * ppm
    sym[q : th - q, q : tw - q] = 255
    if family == "curved":
        alpha = np.ones((th, tw), np.float32)
        synth._curve(rng, tex, [alpha, sym])
    side = module * grid.shape[0]
    persp = rng.uniform(0.12, 0.25) if family == "perspective" else rng.uniform(0, 0.03)
    rotate = 0.0 if family in ("closeup", "plain") else 0.4
    # the whole code in the frame (a close-up may lose its quiet zone, not its modules):
    # a code cut by the frame cannot be read, and each family is about one condition
    inner = np.array([[q, q], [tw - q, q], [tw - q, th - q], [q, th - q]], np.float32)
    outer = np.array([[0, 0], [tw, 0], [tw, th], [0, th]], np.float32)
    for attempt in range(40):
        if attempt >= 10:
            side *= 0.97
        margin = side * 0.5
        centre = (
            float(rng.uniform(margin, max(margin + 1, w - margin))),
            float(rng.uniform(margin, max(margin + 1, h - margin))),
        )
        if family == "closeup":
            centre = (w / 2 + rng.uniform(-0.02, 0.02) * w, h / 2 + rng.uniform(-0.02, 0.02) * h)
        quad = _quad(rng, centre, side, side, rotate=rotate, persp=persp)
        mat = cv2.getPerspectiveTransform(outer, quad)
        must = inner if family == "closeup" else outer
        corners = cv2.perspectiveTransform(must[None], mat)[0]
        if corners.min() >= 0 and (corners[:, 0] <= w).all() and (corners[:, 1] <= h).all():
            break
    module = side / grid.shape[0]
    box = _composite(canvas, tex, quad, sym)
    img = _degrade(rng, canvas, family, module)
    none = np.zeros((0, 4), np.float32)
    if box is None:
        return Scene(img, none, [], family, none)
    return Scene(img, box[None], [text], family, none)


def _degrade(rng: np.random.Generator, img: np.ndarray, family: str, module: float) -> np.ndarray:
    """The family's own degradation, and mild lighting, noise and JPEG for all."""
    h, w = img.shape[:2]
    f = img.astype(np.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    gx, gy = rng.uniform(-1, 1, 2)
    f *= (1 + rng.uniform(0, 0.4) * ((xs / w - 0.5) * gx + (ys / h - 0.5) * gy))[..., None]
    if family == "glare":
        cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
        r = rng.uniform(0.05, 0.2) * max(h, w)
        blob = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * r * r))
        f += rng.uniform(120, 260) * blob[..., None]
    img = np.clip(f, 0, 255).astype(np.uint8)
    if family == "blur":
        img = cv2.GaussianBlur(img, (0, 0), max(0.6, module * rng.uniform(0.3, 0.6)))
    elif family == "motion":
        k = max(3, int(module * rng.uniform(0.8, 1.8)) | 1)
        kern = np.zeros((k, k), np.float32)
        kern[k // 2, :] = 1.0 / k
        rot = cv2.getRotationMatrix2D((k / 2 - 0.5, k / 2 - 0.5), float(rng.uniform(0, 180)), 1)
        kern = cv2.warpAffine(kern, rot, (k, k))
        img = cv2.filter2D(img, -1, kern / max(float(kern.sum()), 1e-6))
    elif rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 0.8))
    if family == "noisy":
        return _camera(rng, img, rng.uniform(10, 25), int(rng.integers(12, 35)))
    return _camera(rng, img, rng.uniform(0, 5), int(rng.integers(60, 96)))
