"""What intake accepts: bytes, longest side and pixels, each refused with the setting that
raises it, before a pixel is decoded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.runtime.errors import EmptyImageError, ImageTooLargeError
from core.runtime.settings import env_name

if TYPE_CHECKING:
    from core.runtime.settings import Settings


@dataclass(frozen=True)
class ImageLimits:
    """What intake accepts; build it from settings with :meth:`from_settings`."""

    max_bytes: int
    max_side: int
    max_pixels: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(
            max_bytes=settings.max_image_bytes,
            max_side=settings.max_image_side,
            max_pixels=settings.max_image_pixels,
        )


def check_bytes(data: bytes, limits: ImageLimits) -> None:
    """Refuse an empty image and one over the byte limit (before its header is read)."""
    if not data:
        raise EmptyImageError("the image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(
            f"image is {len(data)} bytes, over the limit of {limits.max_bytes} bytes "
            f"(set by {env_name('max_image_bytes')})"
        )


def check_size(width: int, height: int, limits: ImageLimits) -> None:
    """Refuse a stored size with a side or a pixel count over the limits."""
    w, h = width, height
    if max(w, h) > limits.max_side:
        raise ImageTooLargeError(
            f"image is {w}x{h} pixels, a side over the limit of {limits.max_side} "
            f"(set by {env_name('max_image_side')})"
        )
    if w * h > limits.max_pixels:
        raise ImageTooLargeError(
            f"image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels} "
            f"(set by {env_name('max_image_pixels')})"
        )
