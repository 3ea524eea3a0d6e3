"""The EXIF orientation: read from a TIFF-structured EXIF block (JPEG APP1, PNG ``eXIf``,
WebP ``EXIF``) and applied to decoded pixels, by this package rather than by OpenCV, so the
probed size and the decoded shape always agree."""

from __future__ import annotations

import logging
import struct

import cv2
import numpy as np

logger = logging.getLogger(__name__)

_EXIF_ORIENTATION_TAG = 0x0112


def exif_orientation(tiff: bytes) -> int:
    """Orientation (1-8) from a TIFF-structured EXIF block; 1 when absent or unreadable."""
    if tiff[:4] == b"II*\x00":
        order = "<"
    elif tiff[:4] == b"MM\x00*":
        order = ">"
    else:
        return 1
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for k in range(min(count, 512)):
            tag, typ, _n = struct.unpack_from(order + "HHI", tiff, ifd + 2 + 12 * k)
            if tag == _EXIF_ORIENTATION_TAG and typ == 3:
                (value,) = struct.unpack_from(order + "H", tiff, ifd + 2 + 12 * k + 8)
                return value if 1 <= value <= 8 else 1
    except struct.error:
        logger.debug("unreadable EXIF block bytes=%d", len(tiff))
    return 1


def orient(img: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation the way OpenCV's imread does (1 = as stored)."""
    if orientation in (5, 6, 7, 8):
        img = cv2.transpose(img)
    flip = {2: 1, 3: -1, 4: 0, 6: 1, 7: -1, 8: 0}.get(orientation)
    return img if flip is None else cv2.flip(img, flip)
