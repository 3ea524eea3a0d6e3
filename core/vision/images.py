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
by this module from the orientation :func:`probe` parsed, so the probed size and the
decoded shape always agree. A JPEG without its end-of-image marker is refused as
truncated (libjpeg would silently fill the missing rows with gray).
"""

from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from core.runtime.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageTooLargeError,
    UnsupportedTypeError,
)
from core.runtime.settings import env_name

if TYPE_CHECKING:
    from core.runtime.settings import Settings

logger = logging.getLogger(__name__)

SUPPORTED_FORMATS = ("jpeg", "png", "webp", "bmp")
CONTENT_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "bmp": "image/bmp",
}

# (magic prefix, offset, kind): recognised only to name them in the refusal.
REFUSED_KINDS: tuple[tuple[bytes, int, str], ...] = (
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"II+\x00", 0, "BigTIFF"),
    (b"MM\x00+", 0, "BigTIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", 0, "JPEG 2000"),
    (b"\xff\x4f\xff\x51", 0, "JPEG 2000 codestream"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", 0, "JPEG XL"),
    (b"\xff\x0a", 0, "JPEG XL codestream"),
    (b"%PDF-", 0, "PDF"),
    (b"8BPS", 0, "Photoshop PSD"),
    (b"\x76\x2f\x31\x01", 0, "OpenEXR"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"\x00\x00\x02\x00", 0, "CUR"),
    (b"PK\x03\x04", 0, "ZIP"),
    (b"\x1f\x8b", 0, "gzip"),
    (b"qoif", 0, "QOI"),
)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# SOF0..SOF15 without DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}
_MAX_HEADER_ITEMS = 4096  # JPEG segments / PNG or RIFF chunks walked before giving up
_PNG_BIT_DEPTHS = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}
_BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}
_EXIF_ORIENTATION_TAG = 0x0112
# Each progressive scan is one more pass over every coefficient: a 160 KB JPEG repeating a
# 14-byte scan 10,000 times takes over a minute to decode. Encoders write about 10 scans.
MAX_JPEG_SCANS = 100
# Alpha compositing and 16-bit scaling run in row bands of at most this many pixels, so
# their temporaries stay small next to the decoded image itself.
_BAND_PIXELS = 1 << 20
# OpenCV's imread flags for decoding at 1/scale (libjpeg DCT scaling for JPEG)
_REDUCED_READ = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


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


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: format (``jpeg|png|webp|bmp``), displayed size, MIME type."""

    format: str
    width: int
    height: int
    content_type: str


@dataclass(frozen=True)
class _Header:
    """Header facts before orientation; ``width``/``height`` are the stored size."""

    format: str
    width: int
    height: int
    orientation: int = 1
    alpha: bool = False
    # offset where JPEG entropy-coded data starts (to look for the end-of-image marker)
    scan_offset: int = 0

    @property
    def swapped(self) -> bool:
        return self.orientation in (5, 6, 7, 8)

    def info(self) -> ImageInfo:
        w, h = (self.height, self.width) if self.swapped else (self.width, self.height)
        return ImageInfo(self.format, w, h, CONTENT_TYPES[self.format])


Header = _Header  # public name for the decoders outside this module


# --- public API ---------------------------------------------------------------------------


def probe(data: bytes, limits: ImageLimits) -> ImageInfo:
    """Type and displayed size from magic bytes and header only; no pixel is decoded.

    Raises EmptyImageError, UnsupportedTypeError, CorruptImageError, ImageTooLargeError.
    """
    return _probe(data, limits).info()


def jpeg_scale(info: ImageInfo, keep_side: int) -> int:
    """The largest factor (8, 4 or 2) a JPEG can be decoded down by while its longer side
    stays at least ``keep_side`` pixels; 1 for other formats or when none fits.

    libjpeg scales while decoding (DCT scaling): it runs smaller inverse transforms and
    converts fewer pixels, so a 12 MP photo decoded at 1/4 costs a fraction of a full
    decode followed by a resize."""
    if info.format != "jpeg" or keep_side <= 0:
        return 1
    longer = max(info.width, info.height)
    return next((f for f in (8, 4, 2) if longer // f >= keep_side), 1)


def decode(data: bytes, limits: ImageLimits, *, scale: int = 1) -> np.ndarray:
    """HxWx3 uint8 BGR pixels with EXIF orientation applied; probes (and refuses) first.

    ``scale`` (2, 4 or 8; JPEG only, see :func:`jpeg_scale`) decodes at that fraction of
    the size: ceil(width / scale) x ceil(height / scale)."""
    header = check_decodable(data, limits, scale=scale)
    buf = np.frombuffer(data, dtype=np.uint8)
    if header.alpha:
        raw = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        pixels = None if raw is None else _to_bgr8(raw)
    else:
        pixels = cv2.imdecode(buf, _REDUCED_READ[scale] | cv2.IMREAD_IGNORE_ORIENTATION)
    if pixels is None:
        kind = header.format.upper()
        raise CorruptImageError(f"corrupt or truncated {kind}: OpenCV cannot decode it")
    return finish_pixels(pixels, header, scale=scale)


def check_decodable(data: bytes, limits: ImageLimits, *, scale: int = 1) -> Header:
    """Every check :func:`decode` makes before decoding (type, size limits, JPEG scans and
    end-of-image marker); the header facts another decoder needs (``core.vision.gpu_decode``)."""
    header = _probe(data, limits)
    if scale not in _REDUCED_READ or (scale != 1 and header.format != "jpeg"):
        raise ValueError(
            f"scale must be 1, or 2, 4 or 8 for a JPEG; got {scale} for {header.format}"
        )
    if header.format == "jpeg" and data.find(b"\xff\xd9", header.scan_offset) < 0:
        raise CorruptImageError("truncated JPEG: no end-of-image marker after the scan data")
    return header


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
    return np.ascontiguousarray(_orient(pixels, header.orientation))


# --- probing ------------------------------------------------------------------------------


def _probe(data: bytes, limits: ImageLimits) -> _Header:
    if not data:
        raise EmptyImageError("the image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(
            f"image is {len(data)} bytes, over the limit of {limits.max_bytes} bytes "
            f"(set by {env_name('max_image_bytes')})"
        )
    kind = sniff(data)
    header = _HEADER_READERS[kind](memoryview(data))
    _check_size(header, limits)
    if kind == "jpeg":
        _check_scans(data, header)
    return header


def _check_scans(data: bytes, header: _Header) -> None:
    """Refuse a decoding-cost bomb: far more scans than any encoder writes. After the
    first scan, ``FF DA`` can only be a marker (entropy data stuffs every ``FF``)."""
    scans = 1 + data.count(b"\xff\xda", header.scan_offset)
    if scans > MAX_JPEG_SCANS:
        raise CorruptImageError(
            f"JPEG with {scans} scans, over the limit of {MAX_JPEG_SCANS} (encoders write "
            "about 10): refused, it would take minutes to decode"
        )


def sniff(data: bytes) -> str:
    """``jpeg|png|webp|bmp`` from the magic bytes; else UnsupportedTypeError naming the kind."""
    head = bytes(data[:64])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith(b"\x89PNG"):
        raise CorruptImageError("corrupt PNG: damaged signature")
    kind = _refused_kind(bytes(data[:1024]))
    supported = "JPEG, PNG, WebP or BMP"
    if kind:
        raise UnsupportedTypeError(f"{kind} images are not supported (send {supported})")
    raise UnsupportedTypeError(
        f"not a {supported} image (unknown type, first bytes {head[:8].hex(' ')})"
    )


def refused_kind(data: bytes) -> str | None:
    """The name of a known non-image (or unsupported image) type, from its magic bytes."""
    return _refused_kind(bytes(data[:1024]))


def _refused_kind(head: bytes) -> str | None:
    for magic, offset, kind in REFUSED_KINDS:
        if head[offset : offset + len(magic)] == magic:
            return kind
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _HEIF_BRANDS:
            return "HEIC/HEIF"
        if brand in _AVIF_BRANDS:
            return "AVIF"
        return f"ISO-BMFF ({brand.decode('latin-1').strip()!r})"
    if head.startswith(b"RIFF"):
        return f"RIFF ({head[8:12].decode('latin-1')!r})"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "SVG"
    if text.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    if text.startswith(b"<?xml"):
        return "XML"
    return None


def _check_size(header: _Header, limits: ImageLimits) -> None:
    w, h = header.width, header.height
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


def _need(data: memoryview, end: int, what: str) -> None:
    if len(data) < end:
        raise CorruptImageError(f"truncated {what} ({len(data)} bytes)")


def _jpeg_header(data: memoryview) -> _Header:
    """Walk the marker segments up to the first scan: size from SOFn, orientation from EXIF."""
    size: tuple[int, int] | None = None
    orientation = 1
    i = 2
    for _ in range(_MAX_HEADER_ITEMS):
        _need(data, i + 2, "JPEG header")
        if data[i] != 0xFF:
            raise CorruptImageError(f"corrupt JPEG header: no marker at offset {i}")
        while i < len(data) and data[i] == 0xFF:  # fill bytes
            i += 1
        _need(data, i + 1, "JPEG header")
        marker = data[i]
        i += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0x00, 0xD8, 0xD9):
            raise CorruptImageError(f"corrupt JPEG header: marker 0x{marker:02X} before a scan")
        _need(data, i + 2, "JPEG header")
        (length,) = struct.unpack_from(">H", data, i)
        if length < 2:
            raise CorruptImageError(f"corrupt JPEG header: segment length {length}")
        _need(data, i + length, "JPEG header")
        segment = data[i + 2 : i + length]
        if marker in _JPEG_SOF and size is None:
            size = _jpeg_frame_size(segment)
        elif marker == 0xE1 and orientation == 1 and bytes(segment[:6]) == b"Exif\x00\x00":
            orientation = _exif_orientation(bytes(segment[6:]))
        elif marker == 0xDA:
            if size is None:
                raise CorruptImageError("corrupt JPEG header: scan data before a frame header")
            return _Header("jpeg", size[0], size[1], orientation, scan_offset=i + length)
        i += length
    raise CorruptImageError(f"corrupt JPEG: no scan in the first {_MAX_HEADER_ITEMS} segments")


def _jpeg_frame_size(segment: memoryview) -> tuple[int, int]:
    if len(segment) < 6:
        raise CorruptImageError("corrupt JPEG header: short frame header")
    _precision, height, width, _components = struct.unpack_from(">BHHB", segment)
    if width == 0 or height == 0:
        raise CorruptImageError(f"corrupt JPEG header: frame size {width}x{height}")
    return width, height


def _png_header(data: memoryview) -> _Header:
    _need(data, 33, "PNG header")
    length, ctype = struct.unpack_from(">I4s", data, 8)
    if ctype != b"IHDR" or length != 13:
        raise CorruptImageError("corrupt PNG header: the first chunk is not a 13-byte IHDR")
    (crc,) = struct.unpack_from(">I", data, 29)
    if zlib.crc32(data[12:29]) != crc:
        raise CorruptImageError("corrupt PNG header: IHDR checksum mismatch")
    width, height, depth, color, compression, filt, interlace = struct.unpack_from(
        ">IIBBBBB", data, 16
    )
    if not (0 < width < 2**31 and 0 < height < 2**31):
        raise CorruptImageError(f"corrupt PNG header: size {width}x{height}")
    if depth not in _PNG_BIT_DEPTHS.get(color, ()) or compression or filt or interlace > 1:
        raise CorruptImageError(
            f"corrupt PNG header: bit depth {depth}, color type {color}, "
            f"methods {compression}/{filt}/{interlace}"
        )
    orientation, has_trns = _png_ancillary(data)
    alpha = color in (4, 6) or has_trns
    return _Header("png", width, height, orientation, alpha)


def _png_ancillary(data: memoryview) -> tuple[int, bool]:
    """EXIF orientation and whether a tRNS chunk exists, from the chunks before IDAT."""
    orientation, has_trns = 1, False
    i = 33
    for _ in range(_MAX_HEADER_ITEMS):
        if i + 8 > len(data):
            raise CorruptImageError("truncated PNG: no image data (IDAT)")
        length, ctype = struct.unpack_from(">I4s", data, i)
        if ctype == b"IDAT":
            break
        if ctype == b"tRNS":
            has_trns = True
        elif ctype == b"eXIf":
            orientation = _exif_orientation(bytes(data[i + 8 : i + 8 + length]))
        i += 12 + length
    return orientation, has_trns


def _webp_header(data: memoryview) -> _Header:
    _need(data, 30, "WebP header")
    chunk = bytes(data[12:16])
    if chunk == b"VP8 ":
        tag = bytes(data[20:23])
        if tag[0] & 1 or bytes(data[23:26]) != b"\x9d\x01\x2a":
            raise CorruptImageError("corrupt WebP header: not a VP8 key frame")
        w, h = struct.unpack_from("<HH", data, 26)
        return _Header("webp", w & 0x3FFF, h & 0x3FFF)
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            raise CorruptImageError("corrupt WebP header: bad VP8L signature")
        (bits,) = struct.unpack_from("<I", data, 21)
        if bits >> 29:
            raise CorruptImageError("corrupt WebP header: unknown VP8L version")
        alpha = bool(bits >> 28 & 1)
        return _Header("webp", (bits & 0x3FFF) + 1, (bits >> 14 & 0x3FFF) + 1, alpha=alpha)
    if chunk == b"VP8X":
        flags = data[20]
        if flags & 0x02:
            raise UnsupportedTypeError("animated WebP images are not supported")
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        orientation = _webp_orientation(data) if flags & 0x08 else 1
        return _Header("webp", w, h, orientation, alpha=bool(flags & 0x10))
    raise CorruptImageError(f"corrupt WebP header: unknown first chunk {chunk!r}")


def _webp_orientation(data: memoryview) -> int:
    i = 12
    for _ in range(_MAX_HEADER_ITEMS):
        if i + 8 > len(data):
            return 1
        ctype = bytes(data[i : i + 4])
        (length,) = struct.unpack_from("<I", data, i + 4)
        if ctype == b"EXIF":
            payload = bytes(data[i + 8 : i + 8 + length])
            return _exif_orientation(payload.removeprefix(b"Exif\x00\x00"))
        i += 8 + length + (length & 1)
    return 1


def _bmp_header(data: memoryview) -> _Header:
    _need(data, 26, "BMP header")
    (offset,) = struct.unpack_from("<I", data, 10)
    (dib,) = struct.unpack_from("<I", data, 14)
    if dib not in _BMP_HEADER_SIZES:
        raise CorruptImageError(f"corrupt BMP header: unknown info header size {dib}")
    if dib == 12:
        width, height, _planes, bpp = struct.unpack_from("<HHHH", data, 18)
        compression = 0
    else:
        _need(data, 34, "BMP header")
        width, height, _planes, bpp, compression = struct.unpack_from("<iiHHI", data, 18)
    height = abs(height)  # negative: rows stored top-down
    if width <= 0 or height == 0 or bpp not in (1, 4, 8, 16, 24, 32):
        raise CorruptImageError(f"corrupt BMP header: size {width}x{height}, {bpp} bits")
    if compression not in (0, 1, 2, 3, 6):
        raise UnsupportedTypeError(f"BMP with compression {compression} is not supported")
    if compression in (0, 3):
        stride = (width * bpp + 31) // 32 * 4
        if len(data) < offset + stride * height:
            raise CorruptImageError(
                f"truncated BMP: {len(data)} bytes, the header needs {offset + stride * height}"
            )
    return _Header("bmp", width, height)


_HEADER_READERS = {
    "jpeg": _jpeg_header,
    "png": _png_header,
    "webp": _webp_header,
    "bmp": _bmp_header,
}


def _exif_orientation(tiff: bytes) -> int:
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


# --- pixels -------------------------------------------------------------------------------


def _to_bgr8(raw: np.ndarray) -> np.ndarray:
    """Any OpenCV decode (gray/BGR/BGRA, 8/16-bit) as 8-bit BGR, alpha composited on white.

    Converted in row bands, so the peak stays near the decoded image plus the output
    (12 bytes per pixel for 16-bit RGBA), not several copies of the whole image.
    """
    if raw.dtype == np.uint8 and raw.ndim == 2:
        return cv2.cvtColor(raw, cv2.COLOR_GRAY2BGR)
    height, width = raw.shape[:2]
    out = np.empty((height, width, 3), np.uint8)
    rows = max(1, _BAND_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        out[top : top + rows] = _band_to_bgr8(raw[top : top + rows])
    return out


def _band_to_bgr8(raw: np.ndarray) -> np.ndarray:
    if raw.dtype == np.uint8 and raw.ndim == 3 and raw.shape[2] == 4:
        return _bgra8_on_white(raw)
    img = raw.astype(np.float32) / 257.0 if raw.dtype == np.uint16 else raw.astype(np.float32)
    if img.ndim == 2:
        img = img[:, :, None]
    channels = img.shape[2]
    if channels in (2, 4):
        color, alpha = img[:, :, :-1], img[:, :, -1:] / 255.0
        img = color * alpha + 255.0 * (1.0 - alpha)
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _bgra8_on_white(raw: np.ndarray) -> np.ndarray:
    """8-bit BGRA on white in integer arithmetic: the same pixels as the float path of
    :func:`_to_bgr8` (round(c·a/255 + 255 - a)) at a fraction of its cost; an opaque
    alpha channel is simply dropped."""
    alpha = raw[:, :, 3]
    if int(alpha.min()) == 255:
        return cv2.cvtColor(raw, cv2.COLOR_BGRA2BGR)
    a = alpha[:, :, None].astype(np.uint16)
    mixed = raw[:, :, :3].astype(np.uint16) * a + 255 * (255 - a) + 127
    return (mixed // 255).astype(np.uint8)


def _orient(img: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation the way OpenCV's imread does (1 = as stored)."""
    if orientation in (5, 6, 7, 8):
        img = cv2.transpose(img)
    flip = {2: 1, 3: -1, 4: 0, 6: 1, 7: -1, 8: 0}.get(orientation)
    return img if flip is None else cv2.flip(img, flip)
