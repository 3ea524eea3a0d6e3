"""QR test images generated with segno: known payloads, known corners, any scale or angle.

    image, codes = scene([CodeSpec("hello", center=(200, 150), module_px=4, angle=30)])
    codes[0].corners  # (4, 2) float32, the symbol's corners TL, TR, BR, BL (clockwise)
    codes[0].xyxy     # its axis-aligned bounding box

Codes are drawn 4x supersampled and area-downscaled, so fractional module sizes
(e.g. 1.8 px) and rotations get anti-aliased edges like a camera would give.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import segno

SUPERSAMPLE = 4


@dataclass(frozen=True)
class CodeSpec:
    """One code to draw: payload, centre in the output image, module size, angle (deg, CCW)."""

    data: str | bytes
    center: tuple[float, float]
    module_px: float = 4.0
    angle: float = 0.0
    micro: bool = False


@dataclass(frozen=True)
class PlacedCode:
    """A drawn code: its payload as text, its corners (TL, TR, BR, BL) in output pixels."""

    text: str
    corners: np.ndarray

    @property
    def xyxy(self) -> np.ndarray:
        lo, hi = self.corners.min(axis=0), self.corners.max(axis=0)
        return np.array([lo[0], lo[1], hi[0], hi[1]], np.float32)

    @property
    def center(self) -> np.ndarray:
        return np.asarray(self.corners.mean(axis=0), np.float32)


def modules(data: str | bytes, micro: bool = False) -> np.ndarray:
    """The symbol's modules (True = dark), without quiet zone."""
    code = segno.make(data, micro=micro)
    return np.array([list(row) for row in code.matrix], dtype=bool)


def qr_bgr(data: str | bytes, module_px: int = 4, border: int = 4) -> np.ndarray:
    """An upright code on white, ``border`` modules of quiet zone, as an H x W x 3 BGR image."""
    m = modules(data)
    gray = np.where(np.pad(m, border), 0, 255).astype(np.uint8)
    gray = np.kron(gray, np.ones((module_px, module_px), np.uint8))
    return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)


def scene(
    specs: Sequence[CodeSpec],
    size: tuple[int, int] = (480, 640),
    background: int = 255,
) -> tuple[np.ndarray, list[PlacedCode]]:
    """A ``size`` (H, W) BGR image with the codes drawn, and where each code landed."""
    h, w = size
    big = np.full((h * SUPERSAMPLE, w * SUPERSAMPLE), background, np.uint8)
    placed = []
    for spec in specs:
        placed.append(_draw(big, spec))
    gray = cv2.resize(big, (w, h), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), placed


def _draw(canvas: np.ndarray, spec: CodeSpec) -> PlacedCode:
    m = modules(spec.data, spec.micro)
    n = m.shape[0]
    source = np.where(m, 0, 255).astype(np.uint8)
    scale = spec.module_px * SUPERSAMPLE
    # pixel centres are integer coordinates (OpenCV's convention), so module i covers
    # [i - 0.5, i + 0.5] and a big pixel b lands at (b + 0.5) / SUPERSAMPLE - 0.5
    mid = (n - 1) / 2
    cx, cy = ((c + 0.5) * SUPERSAMPLE - 0.5 for c in spec.center)
    rot = cv2.getRotationMatrix2D((mid, mid), spec.angle, scale)
    rot[:, 2] += (cx - mid, cy - mid)
    cv2.warpAffine(
        source,
        rot,
        (canvas.shape[1], canvas.shape[0]),
        dst=canvas,
        flags=cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_TRANSPARENT,
    )
    lo, hi = -0.5, n - 0.5
    square = np.array([[lo, lo], [hi, lo], [hi, hi], [lo, hi]], np.float64)
    corners = (cv2.transform(square[None], rot)[0] + 0.5) / SUPERSAMPLE - 0.5
    text = spec.data if isinstance(spec.data, str) else spec.data.decode("latin-1")
    return PlacedCode(text, corners.astype(np.float32))
