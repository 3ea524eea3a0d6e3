"""Fine-grained natural textures that fill the frame, as a phone sees them from close by.

``texture(rng, kind, h, w)`` returns an RGB ``uint8`` image of one of :data:`KINDS`:
carpet (cut pile and loop pile), gravel, sand, foliage, fabric (woven and knitted),
asphalt and noise with the power spectrum of photographs (amplitude ~ 1/f). The
grain (fibre, stone, leaf, thread size) is drawn in pixels of the *native* image, from
about 1 px to a few percent of the frame, so that once the detector shrinks a photo to
its input size the detail is anywhere from sub-pixel (aliased to pixel noise) to a few
pixels — the range of module sizes of close-up QR codes.

:func:`closeup` adds what a close-up photograph does to it: a tilted surface (the grain
shrinks across the frame), defocus (all over, or a depth-of-field band), lighting.

These are negatives only: nothing here is a code. They are procedural (numpy and
OpenCV), seeded, and no photograph is used.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

KINDS = ("carpet", "gravel", "sand", "foliage", "fabric", "asphalt", "pink-noise")


def _grain(rng: np.random.Generator, h: int, w: int, lo: float = 1.0, hi: float = 0.03) -> float:
    """A grain size in pixels, log-uniform from ``lo`` px to ``hi`` of the short side."""
    top = max(hi * min(h, w), lo * 1.5)
    return float(np.exp(rng.uniform(np.log(lo), np.log(top))))


def _upsample(small: np.ndarray, h: int, w: int, interp: int = cv2.INTER_CUBIC) -> np.ndarray:
    return cv2.resize(small.astype(np.float32), (w, h), interpolation=interp)


def _noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth value noise in 0..1 with features of about ``cell`` pixels."""
    gh, gw = max(2, int(h / max(cell, 1.0)) + 2), max(2, int(w / max(cell, 1.0)) + 2)
    return np.clip(_upsample(rng.random((gh, gw), np.float32), h, w), 0, 1)


def _palette(
    rng: np.random.Generator, base: tuple[float, float, float], spread: float
) -> np.ndarray:
    """A colour near ``base`` (RGB 0..255)."""
    return np.clip(np.array(base) + rng.normal(0, spread, 3), 0, 255).astype(np.float32)


def _colourise(gray: np.ndarray, dark: np.ndarray, light: np.ndarray) -> np.ndarray:
    g = np.clip(gray, 0, 1)[..., None]
    return dark * (1 - g) + light * g


def _carpet(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    g = _grain(rng, h, w, 1.0, 0.015)
    if rng.random() < 0.4:  # loop pile (berber): rows of loops, jittered, a near-lattice
        period = max(2.0, g * rng.uniform(2, 4))
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        jx = (_noise(rng, h, w, period * 3) - 0.5) * period * 0.8
        jy = (_noise(rng, h, w, period * 3) - 0.5) * period * 0.8
        phase = (np.floor((ys + jy) / period) % 2) * period * 0.5 * (rng.random() < 0.5)
        u = ((xs + jx + phase) / period) % 1.0 - 0.5
        v = ((ys + jy) / period) % 1.0 - 0.5
        r = np.hypot(u * rng.uniform(0.8, 1.4), v)
        loops = np.clip(1 - r / 0.45, 0, 1) ** rng.uniform(0.5, 1.5)
        cells = _upsample(rng.random((int(h / period) + 2, int(w / period) + 2)), h, w, 0)
        gray = loops * (0.55 + 0.45 * cells) + 0.3 * _noise(rng, h, w, g)
    else:  # cut pile: fibre tips, short strokes in a wandering direction
        white = rng.random((h, w), np.float32)
        k = max(3, int(g * rng.uniform(2, 5)) | 1)
        gray = np.zeros((h, w), np.float32)
        total = np.zeros((h, w), np.float32)
        flow = _noise(rng, h, w, max(h, w) / rng.uniform(2, 6))
        angles = rng.uniform(0, 180, 3)
        for i, a in enumerate(angles):  # the pile leans one way here, another there
            kern = np.zeros((k, k), np.float32)
            kern[k // 2, :] = 1.0 / k
            rot = cv2.getRotationMatrix2D((k / 2 - 0.5, k / 2 - 0.5), float(a), 1.0)
            streak = cv2.filter2D(white, -1, cv2.warpAffine(kern, rot, (k, k)))
            weight = np.exp(-4 * (flow * 2 - i) ** 2)
            gray += streak * weight
            total += weight
        gray /= total + 1e-6
        gray = (gray - gray.mean()) / (gray.std() + 1e-6)
        gray = 1 / (1 + np.exp(-gray * rng.uniform(1.5, 4)))  # fibre tips catch the light
    tone = (float(rng.uniform(20, 200)), float(rng.uniform(20, 180)), float(rng.uniform(20, 160)))
    dark = _palette(rng, tone, 20) * rng.uniform(0.2, 0.6)
    light = np.clip(_palette(rng, tone, 20) * rng.uniform(1.0, 1.6), 0, 255)
    return _colourise(gray, dark, light)


def _gravel(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    stone = max(3.0, _grain(rng, h, w, 2.5, 0.05))
    n = int(np.clip(h * w / stone**2, 4, 60_000))
    seeds = np.full((h, w), 255, np.uint8)
    ys = rng.integers(0, h, n)
    xs = rng.integers(0, w, n)
    seeds[ys, xs] = 0
    dist, labels = cv2.distanceTransformWithLabels(
        seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL
    )
    shade = rng.uniform(0.3, 1.0, n + 1).astype(np.float32)
    tint = rng.normal(0, 0.03, (n + 1, 3)).astype(np.float32)
    lum = shade[labels]
    edge = cv2.morphologyEx(labels.astype(np.float32), cv2.MORPH_GRADIENT, np.ones((3, 3))) > 0
    gap = cv2.GaussianBlur(edge.astype(np.float32), (0, 0), max(0.6, stone / 8))
    light_dir = rng.normal(0, 1, 2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rel = (xx - xs[np.maximum(labels - 1, 0)]) * light_dir[0]
    rel += (yy - ys[np.maximum(labels - 1, 0)]) * light_dir[1]
    lum = lum * (1 + 0.5 * np.tanh(rel / stone)) * (1 - 0.8 * np.clip(gap * 2, 0, 1))
    lum += 0.1 * (dist / stone)
    base = _palette(rng, (150, 140, 125), 25) / 255
    rgb = lum[..., None] * (base + tint[labels]) * 255
    return rgb


def _sand(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    g = _grain(rng, h, w, 0.7, 0.006)
    grains = _noise(rng, h, w, g) if g > 1.2 else rng.random((h, w), np.float32)
    sparse = (rng.random((h, w)) < rng.uniform(0.002, 0.03)).astype(np.float32)
    size = max(1, int(g * rng.uniform(1, 3)))
    sparse = cv2.dilate(sparse, np.ones((size, size), np.uint8))
    ripple = np.sin(
        np.mgrid[0:h, 0:w][int(rng.integers(0, 2))] * 2 * np.pi / rng.uniform(20, 200)
        + _noise(rng, h, w, 80) * 6
    )
    gray = 0.55 + 0.3 * (grains - 0.5) + 0.1 * ripple * rng.uniform(0, 1)
    gray -= sparse * rng.uniform(-0.4, 0.5)
    tone = _palette(rng, (205, 180, 140), 25)
    return _colourise(gray, tone * 0.35, tone)


def _foliage(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    leaf = max(3.0, _grain(rng, h, w, 3.0, 0.06))
    scale = min(1.0, 900 / max(h, w))  # draw big frames smaller, then resize
    sh, sw = max(8, int(h * scale)), max(8, int(w * scale))
    lf = max(1.5, leaf * scale)
    img = np.zeros((sh, sw, 3), np.float32)
    img[:] = _palette(rng, (30, 50, 25), 10)
    n = int(np.clip(3 * sh * sw / lf**2, 10, 40_000))
    greens = np.stack(
        [rng.uniform(20, 140, n), rng.uniform(60, 200, n), rng.uniform(10, 110, n)], 1
    )
    for k in range(n):
        c = (int(rng.integers(0, sw)), int(rng.integers(0, sh)))
        a = max(1, int(lf * rng.uniform(0.6, 1.4)))
        b = max(1, int(a * rng.uniform(0.3, 0.7)))
        col = tuple(float(v) for v in greens[k] * (0.5 + 0.5 * k / n))  # upper leaves lit
        cv2.ellipse(img, c, (a, b), float(rng.uniform(0, 180)), 0, 360, col, -1, cv2.LINE_AA)
        if rng.random() < 0.5:  # the midrib
            cv2.ellipse(img, c, (a, 0), 0, 0, 360, tuple(v * 0.7 for v in col), 1)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)


def _fabric(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    period = max(2.0, _grain(rng, h, w, 2.0, 0.02))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    warp = _noise(rng, h, w, max(h, w) / 3) - 0.5
    xs = xs + warp * period * rng.uniform(0, 6)
    ys = ys + warp * period * rng.uniform(0, 6)
    u, v = xs / period, ys / period
    weave = rng.random()
    if weave < 0.4:  # plain weave: over-under alternates per thread
        over = (np.floor(u) + np.floor(v)) % 2
    elif weave < 0.75:  # twill: the diagonal rib
        over = ((np.floor(u) + np.floor(v)) % 4 < 2).astype(np.float32)
    else:  # knit: rows of V-shaped stitches
        over = ((np.abs((u % 1) - 0.5) * 2 + (v % 1)) % 1 > 0.5).astype(np.float32)
    across_warp = np.sin(np.pi * (u % 1)) ** 0.5
    across_weft = np.sin(np.pi * (v % 1)) ** 0.5
    gray = over * across_warp + (1 - over) * across_weft
    gray *= 0.75 + 0.25 * _noise(rng, h, w, period * 4)
    warp_col = _palette(rng, tuple(rng.uniform(30, 230, 3)), 15)
    weft_col = warp_col if rng.random() < 0.5 else _palette(rng, tuple(rng.uniform(30, 230, 3)), 15)
    col = over[..., None] * warp_col + (1 - over[..., None]) * weft_col
    return col * (0.35 + 0.65 * gray[..., None])


def _asphalt(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    g = _grain(rng, h, w, 1.0, 0.012)
    base = 0.35 + 0.1 * (_noise(rng, h, w, g * 8) - 0.5)
    stones = _noise(rng, h, w, g)
    bright = np.clip((stones - rng.uniform(0.6, 0.75)) * 4, 0, 1)
    pores = np.clip((rng.uniform(0.2, 0.3) - _noise(rng, h, w, g * 0.7)) * 5, 0, 1)
    speck = (rng.random((h, w)) < 0.01).astype(np.float32)
    gray = base + 0.45 * bright - 0.25 * pores + 0.3 * speck
    tone = _palette(rng, (110, 110, 105), 15)
    return _colourise(gray, tone * 0.2, np.clip(tone * 2.2, 0, 255))


def _pink_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Noise whose amplitude spectrum falls as 1/f^alpha, like photographs (alpha ~ 1)."""
    alpha = rng.uniform(0.6, 1.4)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.hypot(fy, fx)
    f[0, 0] = 1.0
    amp = 1.0 / f**alpha
    amp[0, 0] = 0.0
    out = []
    mix = rng.uniform(0.0, 0.25)  # colour channels mostly move together
    common = rng.normal(size=(h, w // 2 + 1)) + 1j * rng.normal(size=(h, w // 2 + 1))
    for _ in range(3):
        own = rng.normal(size=common.shape) + 1j * rng.normal(size=common.shape)
        spec = (common * (1 - mix) + own * mix) * amp
        ch = np.fft.irfft2(spec, s=(h, w)).astype(np.float32)
        out.append((ch - ch.mean()) / (ch.std() + 1e-9))
    img = np.stack(out, -1) * rng.uniform(25, 60) * _palette(rng, (1, 1, 1), 0.15)
    img += _palette(rng, (125, 120, 110), 30)
    if rng.random() < 0.3:  # clipped highlights and shadows, as a contrasty photo
        img = (img - 128) * 1.8 + 128
    return img


GENERATORS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "carpet": _carpet,
    "gravel": _gravel,
    "sand": _sand,
    "foliage": _foliage,
    "fabric": _fabric,
    "asphalt": _asphalt,
    "pink-noise": _pink_noise,
}


def texture(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """An RGB ``uint8`` ``h x w`` image of the texture ``kind`` (one of :data:`KINDS`)."""
    img = GENERATORS[kind](rng, h, w)
    return np.clip(img, 0, 255).astype(np.uint8)


def _tilt(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """A surface seen at an angle: one side of the frame nearer than the other."""
    h, w = img.shape[:2]
    k = rng.uniform(0.0, 0.35)
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    dst = src.copy()
    if rng.random() < 0.5:
        dst[0, 0] += k * w
        dst[1, 0] -= k * w
    else:
        dst[0, 1] += k * h
        dst[3, 1] -= k * h
    m = cv2.getPerspectiveTransform(dst, src)  # the far side is squeezed: finer grain
    return cv2.warpPerspective(img, m, (w, h), borderMode=cv2.BORDER_REFLECT)


def _defocus(img: np.ndarray, radius: float) -> np.ndarray:
    r = max(1, round(radius))
    kern = np.zeros((2 * r + 1, 2 * r + 1), np.float32)
    cv2.circle(kern, (r, r), r, 1.0, -1)
    return cv2.filter2D(img, -1, kern / kern.sum())


def closeup(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """``img`` (a texture filling the frame) as a close-up photo: tilt, focus, lighting."""
    h, w = img.shape[:2]
    if rng.random() < 0.4:
        img = _tilt(rng, img)
    r = rng.random()
    if r < 0.35:  # out of focus all over
        img = _defocus(img, rng.uniform(1, 0.006 * max(h, w) + 1.5))
    elif r < 0.6:  # shallow depth of field: a sharp band, blur away from it
        blurred = _defocus(img, rng.uniform(2, 0.01 * max(h, w) + 2))
        axis = np.linspace(-1, 1, h if rng.random() < 0.5 else w, dtype=np.float32)
        band = np.clip(np.abs(axis - rng.uniform(-0.5, 0.5)) * rng.uniform(1, 3), 0, 1)
        a = band[:, None] if len(axis) == h else band[None, :]
        img = img * (1 - a[..., None]) + blurred * a[..., None]
    f = img.astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if rng.random() < 0.6:  # vignetting / a lamp off to one side
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        d = np.hypot((xx - cx) / w, (yy - cy) / h)
        f *= (1 - rng.uniform(0.1, 0.5) * np.clip(d, 0, 1.5))[..., None]
    if rng.random() < 0.3:  # the phone's shadow
        edge = rng.uniform(0.2, 0.8) * w
        f[:, : int(edge)] *= rng.uniform(0.5, 0.85)
    return np.clip(f, 0, 255).astype(np.uint8)
