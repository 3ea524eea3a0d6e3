"""Man-made surfaces that fill the frame: worn, scratched, printed over, patterned.

``surface(rng, kind, h, w)`` returns an RGB ``uint8`` image of one of :data:`KINDS`:

- ``worn``: painted metal or plastic, paint chipped in blotches, rust and dirt specks;
- ``scratched``: brushed metal or a plastic case, bundles of fine scratches in a few
  directions, a few deep ones;
- ``printed``: a surface printed over with halftone dots, text lines and rules (packaging,
  newsprint, a magazine page photographed from close by);
- ``patterned``: a repeated motif (checks, houndstooth-like steps, tiles, dot grids,
  stripes, small squares) as on gift wrap, tiles, fabric prints and floor mats.

Negatives only, procedural (numpy and OpenCV), seeded; ``training.textures.closeup``
photographs them. None of them holds a QR code's finder patterns by construction.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from training.textures import _noise

KINDS = ("worn", "scratched", "printed", "patterned")


def _base(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A flat colour with low-frequency shading, float RGB."""
    colour = rng.uniform(40, 230, 3).astype(np.float32)
    shade = 0.85 + 0.3 * _noise(rng, h, w, max(h, w) / 3)
    return colour[None, None, :] * shade[..., None]


def _worn(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = _base(rng, h, w)
    under = rng.uniform(60, 200, 3).astype(np.float32)
    cell = rng.uniform(0.01, 0.06) * min(h, w)
    chips = _noise(rng, h, w, cell) * 0.6 + _noise(rng, h, w, cell / 4) * 0.4
    mask = (chips > rng.uniform(0.55, 0.75)).astype(np.float32)
    mask = cv2.GaussianBlur(mask, (0, 0), 0.8)[..., None]
    img = img * (1 - mask) + under[None, None, :] * mask
    specks = rng.random((h, w)) < rng.uniform(0.002, 0.02)
    size = int(rng.integers(1, 4))
    specks = cv2.dilate(specks.astype(np.uint8), np.ones((size, size), np.uint8)) > 0
    img[specks] *= rng.uniform(0.2, 0.6)
    return img


def _scratched(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = _base(rng, h, w)
    angle = rng.uniform(0, np.pi)
    brushed = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 0.7)
    k = max(3, int(0.05 * max(h, w)) | 1)
    kern = np.zeros((k, k), np.float32)
    kern[k // 2, :] = 1.0 / k
    rot = cv2.getRotationMatrix2D((k / 2 - 0.5, k / 2 - 0.5), float(np.degrees(angle)), 1)
    brushed = cv2.filter2D(brushed, -1, cv2.warpAffine(kern, rot, (k, k)))
    img += 40 * brushed[..., None]
    lines = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(2, 5))):  # bundles of scratches
        a = angle + rng.normal(0, 0.4)
        for _ in range(int(rng.integers(20, 120))):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            length = rng.uniform(0.05, 0.6) * max(h, w)
            t = a + rng.normal(0, 0.05)
            dx, dy = np.cos(t) * length / 2, np.sin(t) * length / 2
            p, q = (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy))
            cv2.line(lines, p, q, float(rng.uniform(0.3, 1.0)), int(rng.integers(1, 3)))
    sign = 1.0 if rng.random() < 0.6 else -1.0  # bright (metal) or dark (dirt) scratches
    return img + sign * 70 * lines[..., None]


def _printed(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = _base(rng, h, w) * 0 + rng.uniform(190, 250)
    ink = rng.uniform(0, 120, 3).astype(np.float32)
    period = rng.uniform(3, 14)
    tone = _noise(rng, h, w, max(h, w) / rng.uniform(2, 8))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = rng.uniform(0, np.pi / 2)
    u = (xx * np.cos(t) + yy * np.sin(t)) / period
    v = (-xx * np.sin(t) + yy * np.cos(t)) / period
    dist = np.hypot(u - np.round(u), v - np.round(v))
    dots = (dist < 0.55 * np.sqrt(tone)).astype(np.float32)
    img = img * (1 - dots[..., None]) + ink[None, None, :] * dots[..., None]
    layer = np.zeros((h, w), np.uint8)
    scale = rng.uniform(0.4, 1.6)
    for _ in range(int(rng.integers(5, 40))):
        text = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,-"), 30))
        org = (int(rng.integers(-w // 4, w)), int(rng.integers(0, h)))
        cv2.putText(layer, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, 1, cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 6))):  # rules and boxes
        y = int(rng.integers(0, h))
        cv2.line(layer, (0, y), (w, y), 255, int(rng.integers(1, 4)))
    a = (layer.astype(np.float32) / 255)[..., None]
    dark = rng.uniform(0, 60, 3).astype(np.float32)
    return img * (1 - a) + dark[None, None, :] * a


def _patterned(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    tile = int(rng.integers(8, 48))
    motif = np.zeros((tile, tile), np.float32)
    kind = int(rng.integers(0, 6))
    half = tile // 2
    if kind == 0:  # checks
        motif[:half, :half] = motif[half:, half:] = 1
    elif kind == 1:  # steps (houndstooth-like)
        for i in range(tile):
            motif[i, : max(1, (i * 3) // 4)] = 1
    elif kind == 2:  # tiles with grout
        motif[:] = 1
        g = max(1, tile // 8)
        motif[:g, :] = motif[:, :g] = 0
    elif kind == 3:  # dot grid
        cv2.circle(motif, (half, half), max(1, int(tile * rng.uniform(0.15, 0.4))), 1.0, -1)
    elif kind == 4:  # stripes
        motif[:, : max(1, int(tile * rng.uniform(0.2, 0.6)))] = 1
    else:  # small squares in a square
        q = max(1, tile // 6)
        motif[q : tile - q, q : tile - q] = 1
        motif[2 * q : tile - 2 * q, 2 * q : tile - 2 * q] = 0
    reps = (h // tile + 3, w // tile + 3)
    big = np.tile(motif, reps)
    t = rng.uniform(-30, 30)
    rot = cv2.getRotationMatrix2D((big.shape[1] / 2, big.shape[0] / 2), t, 1.0)
    big = cv2.warpAffine(big, rot, (big.shape[1], big.shape[0]), borderMode=cv2.BORDER_WRAP)
    big = big[:h, :w]
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    return (a[None, None, :] * big[..., None] + b[None, None, :] * (1 - big[..., None])).astype(
        np.float32
    )


GENERATORS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "worn": _worn,
    "scratched": _scratched,
    "printed": _printed,
    "patterned": _patterned,
}


def surface(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """An RGB ``uint8`` ``h x w`` image of the surface ``kind`` (one of :data:`KINDS`)."""
    img = GENERATORS[kind](rng, h, w)
    return np.clip(img, 0, 255).astype(np.uint8)
