"""Pixels: OpenCV decodes after the probe's checks, then the shape is checked against the
header and the EXIF orientation applied (:func:`finish_pixels`, shared with the GPU path)."""

from __future__ import annotations

import cv2
import numpy as np

from core.runtime.errors import CorruptImageError
from core.vision.images.exif import orient
from core.vision.images.headers import Header
from core.vision.images.limits import ImageLimits
from core.vision.images.pixels import to_bgr8
from core.vision.images.probing import probe_header

# OpenCV's imread flags for decoding at 1/scale (libjpeg DCT scaling for JPEG)
REDUCED_READ = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


def decode(data: bytes, limits: ImageLimits, *, scale: int = 1) -> np.ndarray:
    """HxWx3 uint8 BGR pixels with EXIF orientation applied; probes (and refuses) first.

    ``scale`` (2, 4 or 8; JPEG only, see :func:`jpeg_scale`) decodes at that fraction of
    the size: ceil(width / scale) x ceil(height / scale)."""
    header = check_decodable(data, limits, scale=scale)
    buf = np.frombuffer(data, dtype=np.uint8)
    if header.alpha:
        raw = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        pixels = None if raw is None else to_bgr8(raw)
    else:
        pixels = cv2.imdecode(buf, REDUCED_READ[scale] | cv2.IMREAD_IGNORE_ORIENTATION)
    if pixels is None:
        kind = header.format.upper()
        raise CorruptImageError(f"corrupt or truncated {kind}: OpenCV cannot decode it")
    return finish_pixels(pixels, header, scale=scale)


def check_decodable(data: bytes, limits: ImageLimits, *, scale: int = 1) -> Header:
    """Every check :func:`decode` makes before decoding (type, size limits, JPEG scans and
    end-of-image marker); the header facts another decoder needs (``core.vision.gpu_decode``)."""
    header = probe_header(data, limits)
    if scale not in REDUCED_READ or (scale != 1 and header.format != "jpeg"):
        raise ValueError(
            f"scale must be 1, or 2, 4 or 8 for a JPEG; got {scale} for {header.format}"
        )
    if header.format == "jpeg" and not has_eoi(data, header.scan_offset):
        raise CorruptImageError("truncated JPEG: no end-of-image marker after the scan data")
    return header


def has_eoi(data: bytes, scan_offset: int) -> bool:
    """Whether ``FF D9`` (end of image) occurs after ``scan_offset``. Where it ends the
    file, as encoders write it, the answer needs no search: ``bytes.find`` through a large
    JPEG's entropy-coded data takes about 2 ms at 4032x3024."""
    if data.endswith(b"\xff\xd9") and len(data) - 2 >= scan_offset:
        return True
    return data.find(b"\xff\xd9", scan_offset) >= 0


def finish_pixels(pixels: np.ndarray, header: Header, *, scale: int = 1) -> np.ndarray:
    """Decoded (stored-orientation) BGR pixels checked against the header's size, with the
    EXIF orientation applied: the last step of :func:`decode`, for any decoder."""
    expected = (-(-header.height // scale), -(-header.width // scale))
    if pixels.shape[:2] != expected:
        raise CorruptImageError(
            f"corrupt {header.format.upper()}: header says {header.width}x{header.height}"
            f"{f' (1/{scale}: {expected[1]}x{expected[0]})' if scale > 1 else ''}, "
            f"pixels are {pixels.shape[1]}x{pixels.shape[0]}"
        )
    return np.ascontiguousarray(orient(pixels, header.orientation))
