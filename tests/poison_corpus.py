"""The poison corpus: every kind of odd or hostile ``qr.images`` message qrsight must survive.

Each :class:`Case` is one Kafka message (value + headers) and what a worker must answer:
``OK`` for odd but valid images (extreme shapes, 16-bit, CMYK, palette, EXIF and ICC
oddities, ...), ``ERROR`` with a stable code (plus a DLQ copy) for input that is the
sender's fault (broken pixels, hostile headers, bad reply routing, decoding-cost bombs,
...). Images are generated here (OpenCV, Pillow), never downloaded. Used by the poison
integration test, the fuzz tests (as seeds) and the soak run (as the bad part of the mix).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from functools import cache

import cv2
import numpy as np
from PIL import Image

from core.runtime.results import image_request
from schemas import names
from schemas.codec import Codec

Headers = list[tuple[str, bytes]]
CID = names.H_CORRELATION_ID
# What the corpus assumes of the worker's settings (the integration test sets them).
PIXEL_LIMIT = 100_000
TOPIC = "qr.images"


@dataclass(frozen=True)
class Case:
    name: str
    value: bytes | None
    headers: Headers = field(default_factory=list)
    status: str = "OK"
    code: str | None = None
    # (width, height) an OK result must report
    size: tuple[int, int] | None = None
    # correlation id the results carry (None: derived from topic-partition-offset)
    request_id: str | None = None

    @property
    def bad(self) -> bool:
        return self.status == "ERROR"


# --- images -------------------------------------------------------------------------------
def _cv(ext: str, img: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok, ext
    return buf.tobytes()


def _pil(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kwargs)
    return out.getvalue()


def scene(width: int = 96, height: int = 72, seed: int = 0) -> np.ndarray:
    """White, with a dark square: something a detector can look at."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 255, np.uint8)
    side = max(1, min(width, height) // 2)
    x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    img[y : y + side, x : x + side] = 20
    return img


def _rgb() -> Image.Image:
    return Image.fromarray(scene()[:, :, ::-1].copy())


def _jpeg_with_segment(marker: int, payload: bytes) -> bytes:
    base = _cv(".jpg", scene())
    return (
        base[:2] + bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload + base[2:]
    )


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return _pil(_rgb(), "JPEG", exif=exif.tobytes())


def _png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge size, with a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + chunk(b"IEND", b"")
    )


def _many_scans(extra: int) -> bytes:
    """A progressive JPEG whose last scan repeats ``extra`` times: cheap to send, minutes to
    decode without a scan limit."""
    data = _pil(Image.fromarray(np.zeros((256, 256, 3), np.uint8)), "JPEG", progressive=True)
    last, eoi = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    return data[:eoi] + data[last:eoi] * extra + b"\xff\xd9"


def _corrupt_png() -> bytes:
    data = bytearray(_cv(".png", np.random.default_rng(3).integers(0, 255, (48, 64, 3), np.uint8)))
    data[60:90] = b"\x00" * 30  # damage the compressed pixels (IDAT)
    return bytes(data)


def _animated(fmt: str) -> bytes:
    frames = [_rgb(), _rgb().rotate(90)]
    return _pil(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


@cache
def odd_images() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """Odd but valid images: name → (bytes, (width, height) after EXIF orientation)."""
    rng = np.random.default_rng(7)
    rgb16 = scene().astype(np.uint16) * 257
    rgba16 = np.dstack([rgb16, np.full(rgb16.shape[:2], 40_000, np.uint16)])
    bad_exif_offset = b"Exif\x00\x00II*\x00" + struct.pack("<I", 0xFFFFFF00)
    huge_ifd = (
        b"Exif\x00\x00II*\x00"
        + struct.pack("<IH", 8, 0xFFFF)
        + b"\x12\x01\x04\x00\x01\x00\x00\x00\x09\x00\x00\x00"
    )
    return {
        "1x1-png": (_cv(".png", np.zeros((1, 1, 3), np.uint8)), (1, 1)),
        "1x1-jpeg": (_cv(".jpg", np.zeros((1, 1, 3), np.uint8)), (1, 1)),
        "1x1300-png": (_cv(".png", np.full((1300, 1, 3), 90, np.uint8)), (1, 1300)),
        "8192x4-png": (_cv(".png", np.full((4, 8192, 3), 90, np.uint8)), (8192, 4)),
        "4x8192-jpeg": (_cv(".jpg", np.full((8192, 4, 3), 90, np.uint8)), (4, 8192)),
        "16bit-rgb-png": (_cv(".png", rgb16), (96, 72)),
        "16bit-rgba-png": (_cv(".png", rgba16), (96, 72)),
        "16bit-gray-png": (_cv(".png", rgb16[:, :, 0]), (96, 72)),
        "cmyk-jpeg": (_pil(_rgb().convert("CMYK"), "JPEG"), (96, 72)),
        "palette-png-transparent": (_pil(_rgb().convert("P"), "PNG", transparency=0), (96, 72)),
        "gray-alpha-png": (_pil(_rgb().convert("LA"), "PNG"), (96, 72)),
        "animated-png": (_animated("PNG"), (96, 72)),
        "webp-lossless-alpha": (_pil(_rgb().convert("RGBA"), "WEBP", lossless=True), (96, 72)),
        "webp-lossy-alpha": (_pil(_rgb().convert("RGBA"), "WEBP", quality=80), (96, 72)),
        "progressive-jpeg": (_pil(_rgb(), "JPEG", progressive=True), (96, 72)),
        "exif-orientation-6": (_exif_orientation(6), (72, 96)),
        "exif-orientation-out-of-range": (_exif_orientation(77), (96, 72)),
        "exif-offset-past-the-end": (_jpeg_with_segment(0xE1, bad_exif_offset), (96, 72)),
        "exif-65535-entries": (_jpeg_with_segment(0xE1, huge_ifd), (96, 72)),
        "icc-garbage": (_pil(_rgb(), "JPEG", icc_profile=rng.bytes(150_000)), (96, 72)),
        "bmp-32bit": (_cv(".bmp", np.dstack([scene(), np.zeros((72, 96), np.uint8)])), (96, 72)),
    }


# --- messages -----------------------------------------------------------------------------
def _request(request_id: str, image: bytes, **extra: object) -> bytes:
    record = image_request(request_id, image) | extra
    return Codec("ImageRequest").encode(record, TOPIC)


def _framed(request_id: str, image: bytes, schema_id: int) -> bytes:
    """A Confluent-framed ImageRequest naming ``schema_id``."""
    return b"\x00" + struct.pack(">I", schema_id) + _request(request_id, image)


def _error(name: str, value: bytes | None, code: str, *headers: tuple[str, bytes]) -> Case:
    return Case(name, value, [(CID, name.encode()), *headers], "ERROR", code, request_id=name)


def cases(replies_topic: str, reply_partitions: int) -> list[Case]:
    """Every kind, for a worker whose replies topic has ``reply_partitions`` partitions
    and whose pixel limit is :data:`PIXEL_LIMIT` (the ``too-many-pixels`` case)."""
    good = _cv(".jpg", scene(seed=1))
    rt, rp = names.H_REPLY_TOPIC, names.H_REPLY_PARTITION
    out = [
        Case(name, data, [(CID, name.encode())], size=size, request_id=name)
        for name, (data, size) in odd_images().items()
    ]
    trace = names.H_TRACEPARENT
    out += [
        Case(
            "framed-request-unknown-schema-id",
            _framed("framed", good, 987_654),
            size=(96, 72),
            request_id="framed",
        ),
        Case(
            "traceparent-100kb",
            good,
            [(CID, b"tp"), (trace, b"0" * 100_000)],
            size=(96, 72),
            request_id="tp",
        ),
        Case(
            "reply-to-an-existing-partition",
            good,
            [
                (CID, b"reply-ok"),
                (rt, replies_topic.encode()),
                (rp, names.encode_partition(reply_partitions - 1)),
            ],
            size=(96, 72),
            request_id="reply-ok",
        ),
    ]
    cut_request = _request("cut", good)
    out += [
        _error("empty-value", b"", "empty_image"),
        _error("null-value", None, "empty_image"),
        _error("text", b"hello, this is not an image", "bad_message"),
        _error(
            "confluent-frame-garbage", b"\x00\x00\x00\x00\x07\xff\xff\xff garbage", "bad_message"
        ),
        _error("truncated-avro", cut_request[: len(cut_request) // 2], "bad_message"),
        _error("truncated-jpeg", good[: len(good) // 2], "corrupt_image"),
        _error("jpeg-header-cut", good[:20], "corrupt_image"),
        _error("corrupt-png-pixels", _corrupt_png(), "corrupt_image"),
        _error("png-claims-50000x50000", _png_bomb(50_000, 50_000), "image_too_large"),
        _error(
            "too-many-pixels", _cv(".png", np.zeros((400, 300, 3), np.uint8)), "image_too_large"
        ),
        _error("gif", b"GIF89a\x10\x00\x10\x00\x00\x00\x00;", "unsupported_type"),
        _error("animated-gif", _animated("GIF"), "unsupported_type"),
        _error("animated-webp", _animated("WEBP"), "unsupported_type"),
        _error("tiff", b"II*\x00\x08\x00\x00\x00" + b"\x00" * 64, "unsupported_type"),
        _error("pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "unsupported_type"),
        _error(
            "text-claiming-jpeg",
            b"plain text",
            "unsupported_type",
            (names.H_CONTENT_TYPE, b"image/jpeg"),
        ),
        _error("empty-claiming-png", b"", "empty_image", (names.H_CONTENT_TYPE, b"image/png")),
        _error("jpeg-10000-scans", _many_scans(10_000), "corrupt_image"),
        _error("deadline-not-a-number", good, "bad_message", (names.H_DEADLINE_MS, b"soon")),
        _error("reply-partition-1-byte", good, "bad_reply_route", (rp, b"\x01")),
        _error(
            "reply-partition-out-of-range",
            good,
            "bad_reply_route",
            (rp, names.encode_partition(reply_partitions + 5)),
        ),
        _error(
            "reply-partition-negative", good, "bad_reply_route", (rp, names.encode_partition(-2))
        ),
        _error(
            "reply-topic-foreign",
            good,
            "bad_reply_route",
            (rt, b"qr.detections"),
            (rp, names.encode_partition(0)),
        ),
        Case(
            "request-empty-image",
            _request("request-empty-image", b""),
            [],
            "ERROR",
            "empty_image",
            request_id="request-empty-image",
        ),
        Case(
            "request-not-an-image",
            _request("request-not-an-image", b"just text"),
            [],
            "ERROR",
            "unsupported_type",
            request_id="request-not-an-image",
        ),
        Case("request-id-300-bytes", _request("r" * 300, good), [], "ERROR", "bad_message"),
        Case(
            "correlation-id-not-utf8",
            good,
            [(CID, b"id-\xff\xfe")],
            "ERROR",
            "bad_message",
            request_id="id-\\xff\\xfe",
        ),
        Case("correlation-id-100kb", good, [(CID, b"i" * 100_000)], "ERROR", "bad_message"),
    ]
    return out


def dlq_filler(name: str, max_message_bytes: int) -> Case:
    """Garbage as large as the topic takes, with 12 KB of headers: its DLQ copy (original
    plus error headers) cannot fit and must arrive truncated, saying so."""
    headers = [(CID, name.encode()), ("x-padding", b"p" * 12_000)]
    value = b"x" * (max_message_bytes - 12_600)
    return Case(name, value, headers, "ERROR", "bad_message", request_id=name)
