"""8-bit BGRA composited on white: every (colour, alpha) pair gives the float formula's pixel."""

from __future__ import annotations

import numpy as np

from core.vision.images.pixels import to_bgr8


def test_every_colour_and_alpha_pair_equals_the_float_formula() -> None:
    c, a = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    raw = np.stack([c, 255 - c, c // 2, a], axis=2)  # 256 x 256 BGRA: all pairs, per channel
    color, alpha = raw[:, :, :3].astype(np.float64), raw[:, :, 3:].astype(np.float64) / 255
    expected = np.clip(color * alpha + 255 * (1 - alpha) + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(to_bgr8(raw), expected)


def test_a_large_image_composites_band_by_band_to_the_same_pixels() -> None:
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (1500, 1000, 4), dtype=np.uint8)  # more than one band
    color, alpha = raw[:, :, :3].astype(np.float64), raw[:, :, 3:].astype(np.float64) / 255
    expected = np.clip(color * alpha + 255 * (1 - alpha) + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(to_bgr8(raw), expected)
