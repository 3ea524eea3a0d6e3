"""Synthetic QR detection data, generated on the fly and reproducible from a seed.

``make_sample(seed, index, imgsz)`` always returns the same image for the same arguments:
an RGB ``uint8`` square (letterboxed like the detector's preprocessing, pad 114) and the
boxes ``(M, 4)`` float32 ``x1, y1, x2, y2`` of every QR code in it. A box is the
axis-aligned bounding box of the code's *symbol area* (the module grid, quiet zone
excluded) after every geometric distortion — the same thing as the bounding box of the
four corners zxing-cpp reports, which the evaluation compares against.

Ingredients: segno QR codes (URL/text/digits/binary/kanji payloads, versions 1-40, all
ECC levels, with or without quiet zone, inverted, coloured), perspective, rotation,
curvature, 1 px/module up to the whole frame (close-ups); backgrounds from procedural
textures, text, grids and the photos in ``skimage.data``; hard negatives (Data Matrix,
Aztec, PDF417, 1-D barcodes via zxing-cpp, checkerboards, tiled, dot/ring (halftone) and
random-module patterns);
blur, noise, JPEG, lighting gradients, glare and partial occlusion.
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
import segno
import zxingcpp

from core.vision.postprocess import box_iou

logger = logging.getLogger(__name__)

PAD_VALUE = 114
PHOTO_NAMES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "coins",
    "moon",
    "page",
    "text",
    "clock",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "brick",
    "grass",
    "gravel",
    "colorwheel",
    "stereo_motorcycle",
    "cell",
)
NEG_FORMATS = (
    "DataMatrix",
    "Aztec",
    "PDF417",
    "Code128",
    "EAN13",
    "Code39",
    "ITF",
)
KANJI = "漢字日本語東京大阪情報技術研究開発品質管理安全確認番号"
FONTS = (
    cv2.FONT_HERSHEY_SIMPLEX,
    cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_TRIPLEX,
    cv2.FONT_HERSHEY_PLAIN,
)


@dataclass(frozen=True)
class Mix:
    """The shares of the rarer situations in a stream (the rest of the recipe is fixed).

    ``closeup``: share of single-code images that are a close-up (the code fills the frame);
    ``dense``: share of codes forced to version 26-40 (``closeup_dense`` for close-ups);
    ``lattice_bg``: share of backgrounds that are a dot/ring lattice over the whole frame;
    ``lowres``: share of images rendered at a lower resolution and upscaled, as the
    detector's letterbox upscales a photo or screenshot smaller than its input size.
    """

    closeup: float = 0.15
    dense: float = 0.10
    closeup_dense: float = 0.10
    lattice_bg: float = 0.0
    lowres: float = 0.0


BASE = Mix()  # the main schedule (recipe v2)
FINETUNE = Mix(closeup=0.35, dense=0.15, closeup_dense=0.5, lattice_bg=0.25, lowres=0.15)


@dataclass(frozen=True)
class Sample:
    """One synthetic image (RGB, square ``imgsz``) and its QR boxes (x1, y1, x2, y2).

    ``hard`` are the regions that look most like a code and are not one: the boxes of the
    hard-negative symbols placed in the image, and the whole frame when the background is
    a dot/ring lattice (the training can weigh false positives there more).
    """

    image: np.ndarray
    boxes: np.ndarray
    hard: np.ndarray


# --------------------------------------------------------------------------- sources
@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """The RGB photos that ship inside scikit-image (no download)."""
    import skimage.data

    out = []
    for name in PHOTO_NAMES:
        try:
            img = getattr(skimage.data, name)()
        except Exception:  # a data file that needs pooch: skip it
            logger.debug("skimage photo unavailable name=%s", name)
            continue
        if isinstance(img, tuple):
            img = img[0]
        img = np.asarray(img)
        if img.dtype != np.uint8:
            img = (img.astype(np.float32) * (255.0 / max(float(img.max()), 1.0))).astype(np.uint8)
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        out.append(np.ascontiguousarray(img[..., :3]))
    return tuple(out)


def _payload(rng: np.random.Generator) -> str | bytes:
    kind = rng.choice(["url", "text", "digits", "binary", "kanji", "alnum"])
    n = int(rng.integers(1, 60)) if rng.random() < 0.7 else int(rng.integers(60, 300))
    if kind == "url":
        host = "".join(rng.choice(list(string.ascii_lowercase), int(rng.integers(3, 12))))
        path = "".join(rng.choice(list(string.ascii_letters + string.digits + "/-_"), n))
        return f"https://{host}.{rng.choice(['com', 'org', 'io', 'de'])}/{path}"
    if kind == "text":
        return "".join(rng.choice(list(string.ascii_letters + string.punctuation + " "), n))
    if kind == "digits":
        return "".join(rng.choice(list(string.digits), n * 2))
    if kind == "alnum":
        return "".join(rng.choice(list(string.ascii_uppercase + string.digits + " $%*+-./:"), n))
    if kind == "kanji":
        return "".join(rng.choice(list(KANJI), max(1, n // 3)))
    return bytes(rng.integers(0, 256, n, dtype=np.uint8).tolist())


def _qr_matrix(rng: np.random.Generator, dense: float = 0.10) -> np.ndarray:
    """A random QR module matrix (1 = dark), no quiet zone, version 1-40.

    The payload decides the smallest version (mostly 1-25); 25 % of the codes are forced to
    a larger version up to 25 and ``dense`` to one of 26-40 (dense codes, up to 177 modules).
    """
    error = str(rng.choice(["L", "M", "Q", "H"]))
    mask = int(rng.integers(0, 8))  # a fixed mask skips segno's slow mask search
    for _ in range(10):
        payload = _payload(rng)
        try:
            qr = segno.make_qr(payload, error=error, mask=mask, boost_error=False)
        except segno.DataOverflowError:
            continue
        version = int(qr.version)
        if version > 25:
            continue
        r = rng.random()
        if r < 0.25:
            want = int(rng.integers(version, 26))
        elif r < 0.25 + dense:
            want = int(rng.integers(26, 41))
        else:
            want = version
        if want != version:
            qr = segno.make_qr(payload, error=error, version=want, mask=mask, boost_error=False)
        return np.array([list(row) for row in qr.matrix], dtype=np.uint8)
    return np.array([list(r) for r in segno.make_qr("qrsight").matrix], dtype=np.uint8)


def _negative_matrix(rng: np.random.Generator) -> np.ndarray:
    """A hard negative as a 0/1 'dark' matrix (quiet zone already included where usual)."""
    kind = int(rng.integers(0, 10))
    if kind < 6:
        return _zxing_negative(rng, NEG_FORMATS[int(rng.integers(0, len(NEG_FORMATS)))])
    if kind == 7:  # dots or rings on a lattice (halftone print, perforations, tiles)
        return _dot_pattern(rng)
    if kind < 8:
        return _tiled(rng)
    return _random_modules(rng)


def _zxing_negative(rng: np.random.Generator, fmt: str) -> np.ndarray:
    """A Data Matrix, Aztec, PDF417 or 1-D barcode (``fmt`` of NEG_FORMATS) by zxing-cpp."""
    content = {
        "EAN13": "".join(rng.choice(list(string.digits), 12)),
        "ITF": "".join(rng.choice(list(string.digits), 2 * int(rng.integers(3, 10)))),
        "Code39": "".join(rng.choice(list(string.ascii_uppercase + string.digits), 8)),
    }.get(fmt, "".join(rng.choice(list(string.ascii_letters), int(rng.integers(3, 80)))))
    try:
        bc = zxingcpp.create_barcode(content, getattr(zxingcpp.BarcodeFormat, fmt))
        img = np.asarray(zxingcpp.write_barcode_to_image(bc, scale=1))
    except Exception:
        img = np.full((20, 20), 255, np.uint8)
    if img.ndim == 3:
        img = img[..., 0]
    dark = (img < 128).astype(np.uint8)
    if dark.shape[0] < 4:  # 1-D barcode: give it a height
        dark = np.repeat(dark, int(rng.integers(10, 40)), axis=0)
    return dark


def _tiled(rng: np.random.Generator) -> np.ndarray:
    """A checkerboard or a small random tile repeated."""
    n = int(rng.integers(4, 30))
    tile = rng.integers(0, 2, (int(rng.integers(1, 4)), int(rng.integers(1, 4))))
    if rng.random() < 0.5:
        tile = np.array([[1, 0], [0, 1]])
    reps = (n // tile.shape[0] + 1, n // tile.shape[1] + 1)
    return np.tile(tile, reps)[:n, :n].astype(np.uint8)


def _random_modules(rng: np.random.Generator) -> np.ndarray:
    """A grid of random modules without finder patterns."""
    n = int(rng.integers(15, 60))
    return (rng.random((n, n)) < 0.5).astype(np.uint8)


def _dot_pattern(rng: np.random.Generator) -> np.ndarray:
    """A lattice of filled dots or rings, drawn at ``k`` matrix cells per period."""
    k = int(rng.integers(4, 10))
    yy, xx = np.mgrid[0:k, 0:k].astype(np.float32) - (k - 1) / 2
    r = np.hypot(yy, xx)
    outer = rng.uniform(0.3, 0.5) * k
    tile = r <= outer
    if rng.random() < 0.5:  # ring
        tile &= r >= outer - max(1.0, rng.uniform(0.15, 0.3) * k)
    n = int(rng.integers(3, 14))
    pattern = np.tile(tile, (n, n))
    if rng.random() < 0.3:  # staggered rows
        for row in range(1, n, 2):
            pattern[row * k : (row + 1) * k] = np.roll(pattern[row * k : (row + 1) * k], k // 2, 1)
    return pattern.astype(np.uint8)


# --------------------------------------------------------------------------- backgrounds
def _noise_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    out = np.zeros((h, w, 3), np.float32)
    for octave in range(int(rng.integers(1, 5))):
        cells = int(rng.integers(2, 8)) * (2**octave)
        small = rng.random((cells, cells, 3)).astype(np.float32)
        out += cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) / (octave + 1)
    out -= out.min()
    out *= 255.0 / max(float(out.max()), 1e-3)
    tint = rng.uniform(0.4, 1.0, 3).astype(np.float32)
    return np.clip(out * tint + rng.uniform(0, 80), 0, 255).astype(np.uint8)


def _photo_bg(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    photos = _photos()
    img = photos[int(rng.integers(0, len(photos)))]
    ph, pw = img.shape[:2]
    scale = rng.uniform(0.3, 1.0)
    ch, cw = max(8, int(ph * scale)), max(8, int(pw * scale))
    y0, x0 = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    crop = img[y0 : y0 + ch, x0 : x0 + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return cv2.resize(np.ascontiguousarray(crop), (w, h), interpolation=cv2.INTER_LINEAR)


def _draw_text(rng: np.random.Generator, img: np.ndarray, lines: int) -> None:
    h, w = img.shape[:2]
    for _ in range(lines):
        txt = "".join(rng.choice(list(string.ascii_letters + string.digits + " .,:"), 20))
        org = (int(rng.integers(-w // 4, w)), int(rng.integers(0, h)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        scale = float(rng.uniform(0.3, 2.0)) * max(h, w) / 640
        font = FONTS[int(rng.integers(0, len(FONTS)))]
        cv2.putText(img, txt, org, font, scale, color, int(rng.integers(1, 3)), cv2.LINE_AA)


def _grid_bg(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = np.full((h, w, 3), rng.integers(120, 256, 3), np.uint8)
    step = int(rng.integers(6, 60))
    color = tuple(int(c) for c in rng.integers(0, 200, 3))
    for x in range(0, w, step):
        cv2.line(img, (x, 0), (x, h), color, 1)
    for y in range(0, h, step):
        cv2.line(img, (0, y), (w, y), color, 1)
    for _ in range(int(rng.integers(0, 12))):
        p1 = tuple(int(v) for v in rng.integers(0, max(h, w), 2))
        p2 = tuple(int(v) for v in rng.integers(0, max(h, w), 2))
        cv2.rectangle(img, p1, p2, tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
    return img


def _lattice_bg(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Dots or rings over the whole frame (printed fabric, wallpaper, perforated metal)."""
    pattern = _dot_pattern(rng).astype(np.float32)
    # a rough stand-in for the cells per period (6-10; the pattern is 3-13 periods of 4-9
    # cells); kept as is because the shipped model's fine-tune stream depends on it
    k = pattern.shape[0] / max(1, int(np.ceil(pattern.shape[0] / 10)))
    period = float(rng.uniform(8, 28))  # pixels per lattice period
    scale = period / max(k, 4.0)
    reps = (int(h / (pattern.shape[0] * scale)) + 1, int(w / (pattern.shape[1] * scale)) + 1)
    tiled = np.tile(pattern, reps)
    big = cv2.resize(
        tiled, (int(tiled.shape[1] * scale), int(tiled.shape[0] * scale)), cv2.INTER_AREA
    )[:h, :w]
    big = np.pad(big, ((0, max(0, h - big.shape[0])), (0, max(0, w - big.shape[1]))))
    ink = rng.integers(0, 140, 3).astype(np.float32)
    paper = rng.integers(150, 256, 3).astype(np.float32)
    img = paper * (1 - big[..., None]) + ink * big[..., None]
    for _ in range(int(rng.integers(0, 4))):  # large flat shapes printed over it
        centre = tuple(int(v) for v in rng.integers(0, max(h, w), 2))
        pts = cv2.ellipse2Poly(centre, (int(rng.integers(20, 120)),) * 2, 0, 0, 360, 30)
        pts = pts + rng.integers(-15, 16, pts.shape)
        cv2.fillPoly(img, [pts.astype(np.int32)], tuple(float(c) for c in rng.integers(60, 230, 3)))
    return np.clip(img, 0, 255).astype(np.uint8)


def _background(
    rng: np.random.Generator, h: int, w: int, lattice: float = 0.0
) -> tuple[np.ndarray, bool]:
    """A background image and whether it is a full-frame lattice."""
    r = rng.random()
    is_lattice = r >= 1 - lattice
    if is_lattice:
        img = _lattice_bg(rng, h, w)
    elif r < 0.45:
        img = _photo_bg(rng, h, w)
    elif r < 0.7:
        img = _noise_texture(rng, h, w)
    elif r < 0.85:
        img = np.full((h, w, 3), rng.integers(150, 256, 3), np.uint8)
        _draw_text(rng, img, int(rng.integers(5, 30)))
    elif r < 0.95:
        img = _grid_bg(rng, h, w)
    else:
        img = np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8)
    if rng.random() < 0.3:
        _draw_text(rng, img, int(rng.integers(1, 6)))
    return np.ascontiguousarray(img), is_lattice


# --------------------------------------------------------------------------- placement
def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    dark = rng.integers(0, 70, 3).astype(np.float32)
    light = rng.integers(180, 256, 3).astype(np.float32)
    if rng.random() < 0.25:  # coloured code
        dark = rng.integers(0, 140, 3).astype(np.float32)
        light = rng.integers(150, 256, 3).astype(np.float32)
    if rng.random() < 0.12:  # inverted
        dark, light = light, dark
    return dark, light


def _target_quad(
    rng: np.random.Generator, size: float, cx: float, cy: float, *, persp: float, upright: bool
) -> np.ndarray:
    if upright:  # close-up: the code was framed by hand, nearly square to the camera
        theta = rng.normal(0, 0.04)
    else:
        theta = rng.uniform(0, 2 * np.pi) if rng.random() < 0.6 else rng.normal(0, 0.15)
    half = size / 2
    sq = np.array([[-half, -half], [half, -half], [half, half], [-half, half]], np.float32)
    if rng.random() < 0.3:  # aspect squash (oblique view)
        sq[:, int(rng.integers(0, 2))] *= rng.uniform(0.55, 1.0)
    sq += rng.uniform(-persp, persp, (4, 2)).astype(np.float32) * size
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]], np.float32)
    return (sq @ rot.T + np.array([cx, cy], np.float32)).astype(np.float32)


def _curve(rng: np.random.Generator, tex: np.ndarray, masks: list[np.ndarray]) -> None:
    """Mild cylinder/fabric bend applied in texture space (in place)."""
    h, w = tex.shape[:2]
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    amp = rng.uniform(0.02, 0.08) * h
    freq = rng.uniform(0.5, 1.5) * np.pi / w
    phase = rng.uniform(0, np.pi)
    if rng.random() < 0.5:
        mapy = ys + amp * np.sin(xs * freq + phase)
        mapx = xs
    else:
        mapx = xs + amp * np.sin(ys * freq + phase)
        mapy = ys
    tex[:] = cv2.remap(tex, mapx, mapy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    for m in masks:
        m[:] = cv2.remap(m, mapx, mapy, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)


def _paste(
    rng: np.random.Generator,
    canvas: np.ndarray,
    dark: np.ndarray,
    *,
    quiet: int,
    size: float,
    center: tuple[float, float],
    closeup: bool = False,
) -> np.ndarray | None:
    """Warp a module matrix onto the canvas; return the symbol area's bbox or None."""
    n_r, n_c = dark.shape
    ppm = int(np.clip(np.ceil(2 * size / max(n_r, n_c)), 2, 8))
    grid = np.pad(dark, quiet, constant_values=0)
    tex_gray = cv2.resize(
        (1 - grid).astype(np.uint8) * 255,
        (grid.shape[1] * ppm, grid.shape[0] * ppm),
        interpolation=cv2.INTER_NEAREST,
    )
    d_col, l_col = _colours(rng)
    t = tex_gray.astype(np.float32)[..., None] / 255.0
    tex = (d_col * (1 - t) + l_col * t).astype(np.float32)
    th, tw = tex.shape[:2]
    alpha = np.ones((th, tw), np.float32)
    sym = np.zeros((th, tw), np.uint8)
    q = quiet * ppm
    sym[q : th - q, q : tw - q] = 255
    if not closeup and rng.random() < 0.15:
        _curve(rng, tex, [alpha, sym])
    # map the symbol area (not the quiet zone) to the target quad
    persp = float(rng.uniform(0, 0.03 if closeup else 0.12))
    quad = _target_quad(rng, size, center[0], center[1], persp=persp, upright=closeup)
    src = np.array([[q, q], [tw - q, q], [tw - q, th - q], [q, th - q]], np.float32)
    mat = cv2.getPerspectiveTransform(src, quad)
    h, w = canvas.shape[:2]
    warped = cv2.warpPerspective(tex, mat, (w, h), flags=cv2.INTER_AREA)
    a = cv2.warpPerspective(alpha, mat, (w, h), flags=cv2.INTER_LINEAR)[..., None]
    s = cv2.warpPerspective(sym, mat, (w, h), flags=cv2.INTER_NEAREST)
    canvas[:] = (canvas.astype(np.float32) * (1 - a) + warped * a).astype(np.uint8)
    ys, xs = np.nonzero(s)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def _place(
    rng: np.random.Generator,
    canvas: np.ndarray,
    dark: np.ndarray,
    quiet: int,
    taken: list,
    *,
    closeup: bool = False,
) -> np.ndarray | None:
    h, w = canvas.shape[:2]
    side = min(h, w)
    n = max(dark.shape)
    if closeup:  # the symbol fills (almost) the whole frame, as in a screenshot or scan
        size = float(rng.uniform(0.9, 1.0)) * side
        if size < n:
            return None
        center = (
            w / 2 + float(rng.uniform(-0.02, 0.02)) * w,
            h / 2 + float(rng.uniform(-0.02, 0.02)) * h,
        )
        box = _paste(rng, canvas, dark, quiet=quiet, size=size, center=center, closeup=True)
        if box is not None:
            taken.append(box)
        return box
    lo = max((1.0 if rng.random() < 0.2 else 1.5) * n, 14.0)
    hi = 0.92 * side
    if lo >= hi:
        return None
    for _ in range(6):
        if rng.random() < 0.45:
            size = float(rng.uniform(max(lo, 0.3 * side), hi)) if 0.3 * side < hi else hi
        else:
            size = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        margin = size * 0.45
        cx = float(rng.uniform(margin, max(margin + 1, w - margin)))
        cy = float(rng.uniform(margin, max(margin + 1, h - margin)))
        approx = np.array([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2])
        if not taken or box_iou(approx[None], np.array(taken)).max() < 0.05:
            box = _paste(rng, canvas, dark, quiet=quiet, size=size, center=(cx, cy))
            if box is not None:
                taken.append(box)
            return box
    return None


# --------------------------------------------------------------------------- degradations
def _occlude(rng: np.random.Generator, img: np.ndarray, box: np.ndarray) -> None:
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    ow, oh = bw * rng.uniform(0.1, 0.35), bh * rng.uniform(0.1, 0.35)
    ox = x1 + rng.uniform(-0.1, 1.0) * bw - ow / 2
    oy = y1 + rng.uniform(-0.1, 1.0) * bh - oh / 2
    color = tuple(int(c) for c in rng.integers(0, 256, 3))
    if rng.random() < 0.5:
        cv2.rectangle(img, (int(ox), int(oy)), (int(ox + ow), int(oy + oh)), color, -1)
    else:
        cv2.ellipse(
            img,
            (int(ox + ow / 2), int(oy + oh / 2)),
            (max(1, int(ow / 2)), max(1, int(oh / 2))),
            float(rng.uniform(0, 180)),
            0,
            360,
            color,
            -1,
        )


def _degrade(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    f = img.astype(np.float32)
    if rng.random() < 0.5:  # lighting gradient
        gx, gy = rng.uniform(-1, 1, 2)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        g = 1 + rng.uniform(0.2, 0.7) * ((xs / w - 0.5) * gx + (ys / h - 0.5) * gy)
        f *= g[..., None]
    if rng.random() < 0.2:  # glare
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.05, 0.3) * max(h, w)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        blob = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * r * r))
        f += rng.uniform(80, 250) * blob[..., None]
    f = f * rng.uniform(0.6, 1.3) + rng.uniform(-40, 40)  # contrast / brightness
    img = np.clip(f, 0, 255).astype(np.uint8)
    r = rng.random()
    if r < 0.2:  # motion blur
        k = int(rng.integers(3, 10))
        kern = np.zeros((k, k), np.float32)
        kern[k // 2, :] = 1.0 / k
        rot = cv2.getRotationMatrix2D((k / 2 - 0.5, k / 2 - 0.5), float(rng.uniform(0, 180)), 1)
        kern = cv2.warpAffine(kern, rot, (k, k))
        img = cv2.filter2D(img, -1, kern / max(float(kern.sum()), 1e-6))
    elif r < 0.45:  # defocus
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.5, 2.0)))
    if rng.random() < 0.4:
        noise = rng.normal(0, rng.uniform(2, 15), img.shape).astype(np.float32)
        img = np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    if rng.random() < 0.15:
        img = np.repeat(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    if rng.random() < 0.5:
        q = int(rng.integers(20, 95))
        ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])
        if ok:
            img = cv2.imdecode(enc, cv2.IMREAD_UNCHANGED)
    return np.ascontiguousarray(img)


# --------------------------------------------------------------------------- sample
def _letterbox(img: np.ndarray, imgsz: int) -> tuple[np.ndarray, np.ndarray]:
    """``img`` centred on a square ``imgsz`` canvas of PAD_VALUE, and the xyxy offset."""
    h, w = img.shape[:2]
    out = np.full((imgsz, imgsz, 3), PAD_VALUE, np.uint8)
    top, left = (imgsz - h) // 2, (imgsz - w) // 2
    out[top : top + h, left : left + w] = img
    return out, np.array([left, top, left, top], np.float32)


def _lowres(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Render at a lower resolution and upscale back (a small photo or screenshot)."""
    h, w = img.shape[:2]
    f = float(rng.uniform(0.4, 0.8))
    small = cv2.resize(img, (max(8, int(w * f)), max(8, int(h * f))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def make_sample(seed: int, index: int, imgsz: int = 320, mix: Mix = BASE) -> Sample:
    """The ``index``-th sample of the stream ``seed`` (deterministic for a given ``mix``)."""
    rng = np.random.default_rng([seed, index])
    if rng.random() < 0.3:
        other = int(rng.uniform(0.6, 1.0) * imgsz)
        h, w = (imgsz, other) if rng.random() < 0.5 else (other, imgsz)
    else:
        h, w = imgsz, imgsz
    canvas, lattice = _background(rng, h, w, mix.lattice_bg)
    taken: list[np.ndarray] = []
    for _ in range(int(rng.choice([0, 1, 2, 3], p=[0.45, 0.35, 0.12, 0.08]))):
        _place(rng, canvas, _negative_matrix(rng), int(rng.integers(0, 4)), taken)
    negatives = len(taken)
    n_qr = int(rng.choice([0, 1, 2, 3, 4], p=[0.28, 0.5, 0.12, 0.06, 0.04]))
    if n_qr == 1 and negatives == 0 and rng.random() < mix.closeup:  # close-up of one code
        quiet = 0 if rng.random() < 0.6 else int(rng.integers(1, 3))
        _place(rng, canvas, _qr_matrix(rng, mix.closeup_dense), quiet, taken, closeup=True)
        n_qr = 0
    for _ in range(n_qr):
        quiet = 0 if rng.random() < 0.25 else int(rng.integers(1, 5))
        _place(rng, canvas, _qr_matrix(rng, mix.dense), quiet, taken)
    boxes = np.array(taken[negatives:], np.float32).reshape(-1, 4)
    hard = np.array(taken[:negatives] + ([[0, 0, w, h]] if lattice else []), np.float32)
    hard = hard.reshape(-1, 4)
    for box in boxes:
        if rng.random() < 0.2:
            _occlude(rng, canvas, box)
    if mix.lowres and rng.random() < mix.lowres:
        canvas = _lowres(rng, canvas)
    canvas = _degrade(rng, canvas)
    image, offset = _letterbox(canvas, imgsz)
    return Sample(image=image, boxes=boxes + offset, hard=hard + offset)


NEG_FAMILIES = (*NEG_FORMATS, "dots", "tiled", "random-modules", "background", "lattice")


def family_sample(seed: int, index: int, imgsz: int, family: str) -> np.ndarray:
    """An image without any QR code showing one hard-negative ``family`` (NEG_FAMILIES).

    Two symbols of that family on an ordinary background, or ("background") no symbol,
    or ("lattice") a full-frame dot/ring lattice; degraded like the training images. For
    measuring which families the detector confuses with QR codes.
    """
    rng = np.random.default_rng([seed, NEG_FAMILIES.index(family), index])
    if family == "lattice":
        canvas = _lattice_bg(rng, imgsz, imgsz)
    else:
        canvas, _ = _background(rng, imgsz, imgsz)
    make = {
        "dots": _dot_pattern,
        "tiled": _tiled,
        "random-modules": _random_modules,
        **{fmt: (lambda r, f=fmt: _zxing_negative(r, f)) for fmt in NEG_FORMATS},
    }.get(family)
    taken: list[np.ndarray] = []
    for _ in range(2 if make else 0):
        _place(rng, canvas, make(rng), int(rng.integers(0, 4)), taken)
    return _degrade(rng, canvas)
