"""Width, height, orientation and alpha read from each format's header, without decoding
a pixel: one reader per format in :data:`HEADER_READERS`, chosen by
:func:`core.vision.images.formats.sniff`."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from core.runtime.errors import CorruptImageError, UnsupportedTypeError
from core.vision.images.exif import exif_orientation
from core.vision.images.formats import CONTENT_TYPES

# SOF0..SOF15 without DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}
_MAX_HEADER_ITEMS = 4096  # JPEG segments / PNG or RIFF chunks walked before giving up
_PNG_BIT_DEPTHS = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}
_BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: format (``jpeg|png|webp|bmp``), displayed size, MIME type."""

    format: str
    width: int
    height: int
    content_type: str


@dataclass(frozen=True)
class Header:
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


def _need(data: memoryview, end: int, what: str) -> None:
    if len(data) < end:
        raise CorruptImageError(f"truncated {what} ({len(data)} bytes)")


def _jpeg_header(data: memoryview) -> Header:
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
            orientation = exif_orientation(bytes(segment[6:]))
        elif marker == 0xDA:
            if size is None:
                raise CorruptImageError("corrupt JPEG header: scan data before a frame header")
            return Header("jpeg", size[0], size[1], orientation, scan_offset=i + length)
        i += length
    raise CorruptImageError(f"corrupt JPEG: no scan in the first {_MAX_HEADER_ITEMS} segments")


def _jpeg_frame_size(segment: memoryview) -> tuple[int, int]:
    if len(segment) < 6:
        raise CorruptImageError("corrupt JPEG header: short frame header")
    _precision, height, width, _components = struct.unpack_from(">BHHB", segment)
    if width == 0 or height == 0:
        raise CorruptImageError(f"corrupt JPEG header: frame size {width}x{height}")
    return width, height


def _png_header(data: memoryview) -> Header:
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
    return Header("png", width, height, orientation, alpha)


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
            orientation = exif_orientation(bytes(data[i + 8 : i + 8 + length]))
        i += 12 + length
    return orientation, has_trns


def _webp_header(data: memoryview) -> Header:
    _need(data, 30, "WebP header")
    chunk = bytes(data[12:16])
    if chunk == b"VP8 ":
        tag = bytes(data[20:23])
        if tag[0] & 1 or bytes(data[23:26]) != b"\x9d\x01\x2a":
            raise CorruptImageError("corrupt WebP header: not a VP8 key frame")
        w, h = struct.unpack_from("<HH", data, 26)
        return Header("webp", w & 0x3FFF, h & 0x3FFF)
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            raise CorruptImageError("corrupt WebP header: bad VP8L signature")
        (bits,) = struct.unpack_from("<I", data, 21)
        if bits >> 29:
            raise CorruptImageError("corrupt WebP header: unknown VP8L version")
        alpha = bool(bits >> 28 & 1)
        return Header("webp", (bits & 0x3FFF) + 1, (bits >> 14 & 0x3FFF) + 1, alpha=alpha)
    if chunk == b"VP8X":
        flags = data[20]
        if flags & 0x02:
            raise UnsupportedTypeError("animated WebP images are not supported")
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        orientation = _webp_orientation(data) if flags & 0x08 else 1
        return Header("webp", w, h, orientation, alpha=bool(flags & 0x10))
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
            return exif_orientation(payload.removeprefix(b"Exif\x00\x00"))
        i += 8 + length + (length & 1)
    return 1


def _bmp_header(data: memoryview) -> Header:
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
    return Header("bmp", width, height)


HEADER_READERS = {
    "jpeg": _jpeg_header,
    "png": _png_header,
    "webp": _webp_header,
    "bmp": _bmp_header,
}
