"""Which format an image is, from its magic bytes alone (never a file name or a declared
content type): the four accepted ones, and a list of known others, recognised only to
name them in the refusal."""

from __future__ import annotations

from core.runtime.errors import CorruptImageError, UnsupportedTypeError

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
