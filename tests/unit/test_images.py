"""Image intake: every refusal in one table, header sizes, EXIF orientation, pixel formats."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import pytest

from core.runtime.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageTooLargeError,
    QrsightError,
    UnsupportedTypeError,
)
from core.runtime.settings import load_settings
from core.vision import images
from core.vision.images import ImageInfo, ImageLimits, decode, probe
from core.vision.images.pixels import to_bgr8

LIMITS = ImageLimits(max_bytes=10 * 1024 * 1024, max_side=8192, max_pixels=40_000_000)


# --- image builders -----------------------------------------------------------------------


def pattern(h: int, w: int) -> np.ndarray:
    """Four flat quadrants (blue, green, red, white) that survive JPEG and show any flip."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (255, 0, 0)
    img[: h // 2, w // 2 :] = (0, 255, 0)
    img[h // 2 :, : w // 2] = (0, 0, 255)
    img[h // 2 :, w // 2 :] = (255, 255, 255)
    return img


def encode(ext: str, img: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


def png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + ctype
        + payload
        + struct.pack(">I", zlib.crc32(ctype + payload))
    )


def png_ihdr(w: int, h: int, depth: int = 8, color: int = 2) -> bytes:
    return png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))


def png_raw(w: int, h: int, color: int, rows: bytes, extra: bytes = b"") -> bytes:
    """A PNG written by hand: 8-bit, unfiltered rows (for types OpenCV cannot write)."""
    idat = png_chunk(b"IDAT", zlib.compress(rows))
    return b"\x89PNG\r\n\x1a\n" + png_ihdr(w, h, 8, color) + extra + idat + png_chunk(b"IEND", b"")


def bomb_png() -> bytes:
    """About 30 KB of valid PNG that claims 50,000 x 50,000 RGB pixels."""
    idat = png_chunk(b"IDAT", zlib.compress(bytes(30 * 1024 * 1024), 9))
    return b"\x89PNG\r\n\x1a\n" + png_ihdr(50_000, 50_000) + idat + png_chunk(b"IEND", b"")


def exif_tiff(orientation: int, order: str = ">") -> bytes:
    """A TIFF-structured EXIF block with one IFD0 entry: Orientation (SHORT)."""
    mark = b"MM\x00*" if order == ">" else b"II*\x00"
    value = struct.pack(order + "HH", orientation, 0)
    entry = struct.pack(order + "HHI", 0x0112, 3, 1) + value
    return mark + struct.pack(order + "I", 8) + struct.pack(order + "H", 1) + entry + bytes(4)


def jpeg_with_exif(img: np.ndarray, orientation: int, order: str = ">") -> bytes:
    jpeg = encode(".jpg", img, cv2.IMWRITE_JPEG_QUALITY, 95)
    app1 = b"Exif\x00\x00" + exif_tiff(orientation, order)
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def png_with_exif(img: np.ndarray, orientation: int) -> bytes:
    png = encode(".png", img)
    return png[:33] + png_chunk(b"eXIf", exif_tiff(orientation)) + png[33:]


def riff_chunk(ctype: bytes, payload: bytes) -> bytes:
    return ctype + struct.pack("<I", len(payload)) + payload + b"\x00" * (len(payload) & 1)


def webp_extended(img: np.ndarray, flags: int, tail: bytes = b"") -> bytes:
    """A VP8X WebP around cv2's lossy bitstream; ``tail`` chunks go after the image."""
    simple = encode(".webp", img, cv2.IMWRITE_WEBP_QUALITY, 90)
    h, w = img.shape[:2]
    vp8x = bytes([flags, 0, 0, 0]) + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    body = b"WEBP" + riff_chunk(b"VP8X", vp8x) + simple[12:] + tail
    return b"RIFF" + struct.pack("<I", len(body)) + body


def bmp_core_header(img: np.ndarray) -> bytes:
    """A BMP with the 12-byte OS/2 core header, 24-bit, bottom-up."""
    h, w = img.shape[:2]
    stride = (w * 3 + 3) // 4 * 4
    rows = b"".join(img[y].tobytes().ljust(stride, b"\x00") for y in range(h - 1, -1, -1))
    offset = 14 + 12
    header = b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset)
    return header + struct.pack("<IHHHH", 12, w, h, 1, 24) + rows


def bmp_top_down(img: np.ndarray) -> bytes:
    """cv2's BMP rewritten top-down: negative height, rows in reading order."""
    bmp = bytearray(encode(".bmp", img))
    h, w = img.shape[:2]
    (offset,) = struct.unpack_from("<I", bmp, 10)
    stride = (w * 3 + 3) // 4 * 4
    rows = [bytes(bmp[offset + y * stride : offset + (y + 1) * stride]) for y in range(h)]
    bmp[offset:] = b"".join(reversed(rows))
    struct.pack_into("<i", bmp, 22, -h)
    return bytes(bmp)


GIF_1X1 = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
SMALL = pattern(48, 64)


def jpeg_cut_in_scan() -> bytes:
    data = encode(".jpg", pattern(480, 640))
    return data[: len(data) * 2 // 3]


def png_cut_in_idat() -> bytes:
    rng = np.random.default_rng(0)
    data = encode(".png", rng.integers(0, 255, (120, 160, 3), np.uint8))
    return data[: len(data) // 2]


def png_bad_crc() -> bytes:
    data = bytearray(encode(".png", SMALL))
    data[29] ^= 0xFF
    return bytes(data)


def animated_webp() -> bytes:
    return webp_extended(SMALL, flags=0x02)


def jpeg_header_cut() -> bytes:
    return encode(".jpg", SMALL)[:100]


def png_header_cut() -> bytes:
    return encode(".png", SMALL)[:20]


def webp_cut() -> bytes:
    return encode(".webp", pattern(120, 160))[:60]


def png_bad_signature() -> bytes:
    return b"\x89PNG\r\n\x00\n" + encode(".png", SMALL)[8:]


# --- every refusal ------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """One bad input: what decode raises, and which stage refuses it.

    stage: "probe" (magic bytes or header), "decode" (a check decode makes before
    OpenCV), "opencv" (cv2.imdecode itself fails).
    """

    name: str
    make: Callable[[], bytes]
    error: type[QrsightError]
    code: str
    fragment: str  # the message contains it
    stage: str = "probe"
    limits: ImageLimits = LIMITS


UNSUPPORTED, CORRUPT, TOO_LARGE = "unsupported_type", "corrupt_image", "image_too_large"
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
AVIF = b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(64)
SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>'
PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj"
R = Refusal
REFUSALS = [
    R("empty", lambda: b"", EmptyImageError, "empty_image", "empty"),
    R("gif", lambda: GIF_1X1, UnsupportedTypeError, UNSUPPORTED, "GIF"),
    R("tiff", lambda: encode(".tiff", SMALL), UnsupportedTypeError, UNSUPPORTED, "TIFF"),
    R("pdf", lambda: PDF, UnsupportedTypeError, UNSUPPORTED, "PDF"),
    R("svg", lambda: SVG, UnsupportedTypeError, UNSUPPORTED, "SVG"),
    R("heic", lambda: HEIC, UnsupportedTypeError, UNSUPPORTED, "HEIC"),
    R("avif", lambda: AVIF, UnsupportedTypeError, UNSUPPORTED, "AVIF"),
    R("plain text", lambda: b"hello, world", UnsupportedTypeError, UNSUPPORTED, "unknown"),
    R(
        "animated webp",
        lambda: webp_extended(SMALL, 0x02),
        UnsupportedTypeError,
        UNSUPPORTED,
        "animated",
    ),
    R(
        "jpeg header cut",
        lambda: encode(".jpg", SMALL)[:100],
        CorruptImageError,
        CORRUPT,
        "truncated",
    ),
    R("jpeg cut in scan", jpeg_cut_in_scan, CorruptImageError, CORRUPT, "end-of-image", "decode"),
    R(
        "png header cut",
        lambda: encode(".png", SMALL)[:20],
        CorruptImageError,
        CORRUPT,
        "truncated",
    ),
    R("png cut in IDAT", png_cut_in_idat, CorruptImageError, CORRUPT, "PNG", "opencv"),
    R("png bad IHDR crc", png_bad_crc, CorruptImageError, CORRUPT, "checksum"),
    R("png bad signature", png_bad_signature, CorruptImageError, CORRUPT, "signature"),
    R(
        "webp cut",
        lambda: encode(".webp", pattern(120, 160))[:60],
        CorruptImageError,
        CORRUPT,
        "WEBP",
        "opencv",
    ),
    R("bmp cut", lambda: encode(".bmp", SMALL)[:500], CorruptImageError, CORRUPT, "truncated BMP"),
    R("bomb png 50k x 50k", bomb_png, ImageTooLargeError, TOO_LARGE, "QRSIGHT_MAX_IMAGE_SIDE"),
    R(
        "side over limit",
        lambda: encode(".png", SMALL),  # 64 x 48
        ImageTooLargeError,
        TOO_LARGE,
        "QRSIGHT_MAX_IMAGE_SIDE",
        limits=ImageLimits(max_bytes=10**6, max_side=63, max_pixels=10**6),
    ),
    R(
        "pixels over limit",
        lambda: encode(".jpg", SMALL),
        ImageTooLargeError,
        TOO_LARGE,
        "QRSIGHT_MAX_IMAGE_PIXELS",
        limits=ImageLimits(max_bytes=10**6, max_side=8192, max_pixels=48 * 64 - 1),
    ),
    R(
        "bytes over limit",
        lambda: encode(".bmp", SMALL),  # about 9 KB
        ImageTooLargeError,
        TOO_LARGE,
        "QRSIGHT_MAX_IMAGE_BYTES",
        limits=ImageLimits(max_bytes=1024, max_side=8192, max_pixels=10**6),
    ),
]


@pytest.fixture
def imdecode_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls to cv2.imdecode made by core.vision.images (it still decodes)."""
    calls: list[int] = []
    real = cv2.imdecode

    def counting(buf: np.ndarray, flags: int) -> np.ndarray | None:
        calls.append(flags)
        return real(buf, flags)

    monkeypatch.setattr(cv2, "imdecode", counting)
    return calls


@pytest.mark.parametrize("case", REFUSALS, ids=lambda c: c.name)
def test_refusals(case: Refusal, imdecode_calls: list[int]) -> None:
    data = case.make()
    with pytest.raises(case.error) as caught:
        decode(data, case.limits)
    assert caught.value.code == case.code
    assert case.fragment in caught.value.message
    assert bool(imdecode_calls) is (case.stage == "opencv")  # nothing decoded before a refusal
    if case.stage == "probe":
        with pytest.raises(case.error):
            probe(data, case.limits)
    else:  # the header is fine: probe accepts it, only the data is bad
        assert probe(data, case.limits).format in images.SUPPORTED_FORMATS


def test_bomb_is_small_and_refused_from_its_header() -> None:
    data = bomb_png()
    assert len(data) < 40 * 1024
    with pytest.raises(ImageTooLargeError, match="50000x50000"):
        probe(data, LIMITS)


# --- header sizes -------------------------------------------------------------------------

FF_DQT, FILL = b"\xff\xdb", b"\xff\xff"  # a marker may be preceded by 0xFF fill bytes
ENCODINGS: list[tuple[str, str, Callable[[np.ndarray], bytes]]] = [
    ("jpeg baseline", "jpeg", lambda im: encode(".jpg", im)),
    ("jpeg progressive", "jpeg", lambda im: encode(".jpg", im, cv2.IMWRITE_JPEG_PROGRESSIVE, 1)),
    ("jpeg gray", "jpeg", lambda im: encode(".jpg", cv2.cvtColor(im, cv2.COLOR_BGR2GRAY))),
    (
        "jpeg fill bytes",
        "jpeg",
        lambda im: encode(".jpg", im).replace(b"\xff\xdb", b"\xff\xff\xff\xdb", 1),
    ),
    ("png", "png", lambda im: encode(".png", im)),
    ("webp lossy (VP8)", "webp", lambda im: encode(".webp", im, cv2.IMWRITE_WEBP_QUALITY, 80)),
    ("webp lossless (VP8L)", "webp", lambda im: encode(".webp", im, cv2.IMWRITE_WEBP_QUALITY, 101)),
    ("webp extended (VP8X)", "webp", lambda im: webp_extended(im, flags=0)),
    ("bmp", "bmp", lambda im: encode(".bmp", im)),
    ("bmp top-down", "bmp", bmp_top_down),
    ("bmp core header", "bmp", bmp_core_header),
]
SIZES = [(1, 1), (23, 37), (480, 640), (17, 1000)]


@pytest.mark.parametrize(("fmt", "write"), [pytest.param(f, w, id=n) for n, f, w in ENCODINGS])
@pytest.mark.parametrize(("h", "w"), SIZES, ids=[f"{w}x{h}" for h, w in SIZES])
def test_probe_reads_size_and_decode_agrees(
    fmt: str, write: Callable[[np.ndarray], bytes], h: int, w: int
) -> None:
    img = pattern(h, w)
    data = write(img)
    assert probe(data, LIMITS) == ImageInfo(fmt, w, h, f"image/{fmt}")
    pixels = decode(data, LIMITS)
    assert pixels.shape == (h, w, 3)
    assert pixels.dtype == np.uint8
    if fmt in ("png", "bmp"):  # lossless: the very same pixels
        assert np.array_equal(pixels, img)
    else:  # what OpenCV decodes on its own
        assert np.array_equal(pixels, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))


# --- EXIF orientation ---------------------------------------------------------------------

ORIENTED = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # stored rotated: turn 90 degrees clockwise to view
    7: lambda a: np.rot90(a.transpose(1, 0, 2), 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("order", [">", "<"], ids=["big-endian", "little-endian"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_exif_orientation(orientation: int, order: str) -> None:
    img = pattern(40, 64)
    data = jpeg_with_exif(img, orientation, order)
    want = ORIENTED[orientation](img)
    info = probe(data, LIMITS)
    assert (info.height, info.width) == want.shape[:2]
    pixels = decode(data, LIMITS)
    assert pixels.shape == want.shape
    assert np.abs(pixels.astype(int) - want).mean() < 4  # JPEG noise only
    # OpenCV's own EXIF handling (imdecode without IGNORE_ORIENTATION) agrees
    assert np.array_equal(pixels, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("png eXIf", lambda img: png_with_exif(img, 6)),
        ("webp EXIF", lambda img: webp_extended(img, 0x08, riff_chunk(b"EXIF", exif_tiff(6)))),
    ],
)
def test_exif_orientation_in_png_and_webp(name: str, make: Callable[[np.ndarray], bytes]) -> None:
    img = pattern(40, 64)
    data = make(img)
    assert probe(data, LIMITS).width == 40
    pixels = decode(data, LIMITS)
    assert pixels.shape == (64, 40, 3)
    assert np.abs(pixels.astype(int) - ORIENTED[6](img)).mean() < 6


# --- pixel formats ------------------------------------------------------------------------


def _gray_alpha_png() -> bytes:
    # 2x1: opaque black, fully transparent black
    return png_raw(2, 1, 4, b"\x00" + bytes([0, 255, 0, 0]))


def _palette_trns_png() -> bytes:
    plte = png_chunk(b"PLTE", bytes([0, 0, 0, 0, 0, 0]))
    trns = png_chunk(b"tRNS", bytes([255, 0]))
    return png_raw(2, 1, 3, b"\x00\x00\x01", plte + trns)


def _rgba_png() -> bytes:
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (0, 0, 0, 255)  # opaque black
    rgba[0, 1] = (0, 0, 0, 0)  # transparent black
    return encode(".png", rgba)


def _rgba16_png() -> bytes:
    rgba = np.zeros((1, 2, 4), np.uint16)
    rgba[0, 0] = (0, 0, 0, 65535)
    return encode(".png", rgba)


def _rgba_webp() -> bytes:
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0, 3] = 255
    return encode(".webp", rgba, cv2.IMWRITE_WEBP_QUALITY, 101)


def _bgr16_png() -> bytes:
    img = np.zeros((1, 2, 3), np.uint16)
    img[0, 0] = (0, 32896, 65535)
    img[0, 1] = (65535, 0, 257)
    return encode(".png", img)


WHITE, BLACK = [255, 255, 255], [0, 0, 0]
PIXEL_FORMATS = [
    ("gray 8-bit", lambda: encode(".png", np.array([[0, 128]], np.uint8)), [BLACK, [128] * 3]),
    ("gray 16-bit", lambda: encode(".png", np.array([[0, 32896]], np.uint16)), [BLACK, [128] * 3]),
    ("bgr 16-bit", _bgr16_png, [[0, 128, 255], [255, 0, 1]]),
    ("rgba: transparent on white", _rgba_png, [BLACK, WHITE]),
    ("rgba 16-bit", _rgba16_png, [BLACK, WHITE]),
    ("gray+alpha", _gray_alpha_png, [BLACK, WHITE]),
    ("palette+tRNS", _palette_trns_png, [BLACK, WHITE]),
    ("webp with alpha", _rgba_webp, [BLACK, WHITE]),
]


@pytest.mark.parametrize(("make", "want"), [pytest.param(m, w, id=n) for n, m, w in PIXEL_FORMATS])
def test_pixel_formats_become_8bit_bgr(make: Callable[[], bytes], want: list[list[int]]) -> None:
    pixels = decode(make(), LIMITS)
    assert pixels.dtype == np.uint8
    assert pixels.shape == (1, 2, 3)
    assert pixels[0].tolist() == want


def test_limits_from_settings() -> None:
    settings = load_settings(
        {
            "QRSIGHT_MAX_IMAGE_SIDE": "100",
            "QRSIGHT_MAX_IMAGE_PIXELS": "5000",
            "QRSIGHT_MAX_IMAGE_BYTES": "2048",
        }
    )
    assert ImageLimits.from_settings(settings) == ImageLimits(
        max_bytes=2048, max_side=100, max_pixels=5000
    )


# --- reduced-scale JPEG decoding and alpha compositing ---------------------------------------


@pytest.mark.parametrize(
    ("fmt", "w", "h", "keep", "expected"),
    [
        ("jpeg", 4032, 3024, 832, 4),  # 1008 >= 832, 504 is not
        ("jpeg", 3024, 4032, 832, 4),  # portrait: the longer side counts
        ("jpeg", 8000, 6000, 832, 8),
        ("jpeg", 1600, 1200, 832, 1),  # 800 < 832: full size
        ("jpeg", 640, 480, 832, 1),
        ("jpeg", 4032, 3024, 0, 1),  # off
        ("png", 4032, 3024, 832, 1),  # only libjpeg scales while decoding
    ],
)
def test_jpeg_scale(fmt: str, w: int, h: int, keep: int, expected: int) -> None:
    info = ImageInfo(fmt, w, h, images.CONTENT_TYPES[fmt])
    assert images.jpeg_scale(info, keep) == expected


@pytest.mark.parametrize(("w", "h", "scale"), [(1001, 750, 2), (1001, 750, 4), (640, 480, 8)])
def test_decode_at_reduced_scale(w: int, h: int, scale: int) -> None:
    data = encode(".jpg", pattern(h, w), cv2.IMWRITE_JPEG_QUALITY, 95)
    pixels = decode(data, LIMITS, scale=scale)
    assert pixels.shape == (-(-h // scale), -(-w // scale), 3)  # ceil, as libjpeg
    full = cv2.resize(decode(data, LIMITS), pixels.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(pixels.astype(int) - full.astype(int)).mean() < 4


def test_decode_reduced_keeps_the_exif_orientation() -> None:
    data = jpeg_with_exif(pattern(400, 600), 6)
    pixels = decode(data, LIMITS, scale=2)
    assert pixels.shape == (300, 200, 3)  # 600x400 stored, rotated 90°: 400x600 shown


@pytest.mark.parametrize("scale", [3, 16])
def test_decode_refuses_other_scales(scale: int) -> None:
    with pytest.raises(ValueError, match="scale"):
        decode(encode(".jpg", pattern(64, 64)), LIMITS, scale=scale)


def test_decode_png_at_reduced_scale_is_refused() -> None:
    with pytest.raises(ValueError, match="png"):
        decode(encode(".png", pattern(64, 64)), LIMITS, scale=2)


def test_bgra_on_white_equals_the_float_formula() -> None:
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    color, alpha = raw[:, :, :3].astype(np.float64), raw[:, :, 3:].astype(np.float64) / 255
    expected = np.clip(color * alpha + 255 * (1 - alpha) + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(to_bgr8(raw), expected)
    raw[:, :, 3] = 255
    assert np.array_equal(to_bgr8(raw), raw[:, :, :3])
