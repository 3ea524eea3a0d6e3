"""Safe image intake: recognise the type by magic bytes, check the size from the header, decode.

Accepted: JPEG, PNG, WebP (still images) and BMP, recognised by their magic bytes,
never by a file name or a declared content type. Everything else is refused with
``unsupported_type``; the message names the detected kind when it is one of
:data:`REFUSED_KINDS` (GIF, TIFF, HEIC/HEIF, AVIF, other ISO-BMFF files, JPEG 2000,
JPEG XL, PDF, SVG/XML, HTML, PSD, OpenEXR, ICO, ZIP, gzip, animated WebP, …).

:func:`probe` reads width and height from the header alone (no pixel is decoded) and
refuses, in this order, too many bytes, a side over the limit and too many pixels, so a
small file that claims 50,000 x 50,000 is refused in microseconds. The reported size is
the *displayed* one: an EXIF orientation of 5-8 swaps width and height.

:func:`decode` probes first, then decodes with OpenCV into 8-bit 3-channel BGR:
grayscale becomes BGR, 16-bit is scaled to 8-bit, an alpha channel (PNG, WebP) is
composited on white (a dark code on a transparent background stays readable; BMP alpha
is ignored), and the EXIF orientation (JPEG APP1, PNG ``eXIf``, WebP ``EXIF``) is applied
by this package from the orientation :func:`probe` parsed, so the probed size and the
decoded shape always agree. A JPEG without its end-of-image marker is refused as
truncated (libjpeg would silently fill the missing rows with gray).

One module per step, as a dispatch table reads: :mod:`~core.vision.images.formats` (sniff
the magic bytes), :mod:`~core.vision.images.headers` (one header reader per format),
:mod:`~core.vision.images.limits` (bytes, side, pixels), :mod:`~core.vision.images.probing`
(the checks in order), :mod:`~core.vision.images.decoding` (OpenCV, then shape and
orientation), :mod:`~core.vision.images.exif` and :mod:`~core.vision.images.pixels`
(orientation; 8-bit BGR on white). Callers import from here.
"""

from __future__ import annotations

from core.vision.images.decoding import check_decodable, decode, finish_pixels
from core.vision.images.formats import (
    CONTENT_TYPES,
    REFUSED_KINDS,
    SUPPORTED_FORMATS,
    refused_kind,
    sniff,
)
from core.vision.images.headers import Header, ImageInfo
from core.vision.images.limits import ImageLimits
from core.vision.images.probing import MAX_JPEG_SCANS, jpeg_scale, probe

__all__ = [
    "CONTENT_TYPES",
    "MAX_JPEG_SCANS",
    "REFUSED_KINDS",
    "SUPPORTED_FORMATS",
    "Header",
    "ImageInfo",
    "ImageLimits",
    "check_decodable",
    "decode",
    "finish_pixels",
    "jpeg_scale",
    "probe",
    "refused_kind",
    "sniff",
]
