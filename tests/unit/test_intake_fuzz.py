"""Property-based fuzzing (hypothesis) of everything a hostile message reaches before Kafka
sees a result: image intake, message parsing and ``Pipeline.run``.

The promise under test: whatever the bytes, shapes and headers, only the documented
errors come out (``core.vision.images``: empty, unsupported, corrupt, too large; ``parse_message``:
nothing, the reason travels in ``Intake.error``; ``Pipeline.run``: nothing for bad input,
one record per job), decoded pixels always match the probed size, and decoding memory
stays proportional to the image limits.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import cv2
import numpy as np
import pytest
from confluent_kafka import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.intake import MAX_REQUEST_ID_BYTES, parse_message
from core.runtime.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageTooLargeError,
    QrsightError,
    UnsupportedTypeError,
    error_classes,
)
from core.runtime.settings import REPO_ROOT, load_settings
from core.runtime.telemetry import trace_headers
from core.vision.images import ImageLimits, decode, probe
from core.vision.pipeline import ImageJob, Pipeline
from schemas import names
from schemas.codec import Codec
from tests.poison_corpus import cases, odd_images

LIMITS = ImageLimits(max_bytes=2_000_000, max_side=8192, max_pixels=2_000_000)
DOCUMENTED = (EmptyImageError, UnsupportedTypeError, CorruptImageError, ImageTooLargeError)
SEEDS = [data for data, _size in odd_images().values()] + [
    c.value for c in cases("qr.replies", 4) if c.value
]
FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed image or message, damaged: bytes flipped, cut, spliced, chunks repeated."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "repeat", "zero"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "repeat":
            size = draw(st.integers(1, 256))
            data[at:at] = data[at : at + size] * draw(st.integers(1, 8))
        elif op == "zero":
            data[at : at + draw(st.integers(1, 64))] = b"\x00" * 8
    return bytes(data)


def check_decode(data: bytes) -> None:
    try:
        info = probe(data, LIMITS)
    except DOCUMENTED:
        return
    try:
        pixels = decode(data, LIMITS)
    except DOCUMENTED:
        return
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.shape[:2] == (info.height, info.width), "probe and decode agree"
    assert info.width * info.height <= LIMITS.max_pixels


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_raise_only_documented_errors(data: bytes) -> None:
    check_decode(data)


@FUZZ
@given(mutated())
def test_damaged_images_raise_only_documented_errors(data: bytes) -> None:
    check_decode(data)


# --- parsing Kafka messages -----------------------------------------------------------
HEADER_NAMES = [
    names.H_CORRELATION_ID,
    names.H_REPLY_TOPIC,
    names.H_REPLY_PARTITION,
    names.H_CONTENT_TYPE,
    names.H_DEADLINE_MS,
    names.H_TRACEPARENT,
    "x-other",
]
header_values = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"qr.replies", b"image/png", b"\x00\x00\x00\x02", b"\xff\xff\xff\xff"]),
    st.integers(-(2**31), 2**31 - 1).map(names.encode_partition),
    st.integers(0, 2**62).map(names.encode_deadline),
    st.just(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    st.integers(0, 300_000).map(lambda n: b"x" * n),
)
headers = st.lists(
    st.tuples(st.sampled_from(HEADER_NAMES), st.one_of(st.none(), header_values)), max_size=6
)


@st.composite
def avro_requests(draw: st.DrawFn) -> bytes:
    record = {
        "request_id": draw(st.text(min_size=1, max_size=400)),
        "source": draw(st.one_of(st.none(), st.text(max_size=20))),
        "image": draw(st.one_of(st.sampled_from(SEEDS), st.binary(max_size=64))),
        "content_type": draw(st.sampled_from(["", "image/jpeg", "text/plain"])),
        "submitted_at": draw(st.integers(0, 2**42)),
        "options": draw(
            st.one_of(
                st.none(),
                st.fixed_dictionaries(
                    {
                        "confidence": st.one_of(st.none(), st.floats(0, 1)),
                        "decode_payloads": st.one_of(st.none(), st.booleans()),
                    }
                ),
            )
        ),
    }
    data = Codec("ImageRequest").encode(record, "qr.images")
    if draw(st.booleans()):  # damage it
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + draw(st.binary(max_size=16))
    return data


@FUZZ
@given(
    value=st.one_of(st.none(), st.binary(max_size=256), mutated(), avro_requests()),
    hdrs=headers,
    partitions=st.integers(1, 64),
)
def test_parse_message_never_raises_and_every_error_has_a_known_code(
    value: bytes | None, hdrs: list[tuple[str, bytes | None]], partitions: int
) -> None:
    msg = Message(topic="qr.images", partition=3, offset=77, value=value, headers=hdrs or None)
    item = parse_message(
        msg,
        Codec("ImageRequest"),
        LIMITS,
        default_replies_topic="qr.replies",
        reply_partitions=lambda _p: partitions,
    )
    assert isinstance(item.request_id, str) and item.request_id
    assert len(item.result_key) <= 4 * MAX_REQUEST_ID_BYTES + 32
    assert [item.error is not None, item.expired, item.job is not None].count(True) == 1
    if item.error is not None:
        assert item.error.code in error_classes(), item.error.code
        assert item.error.message
    if item.reply_topic is not None:
        assert item.reply_topic == "qr.replies"
        assert item.reply_partition is None or 0 <= item.reply_partition < partitions
    carried = trace_headers(item.headers)
    assert all(len(v or b"") <= 512 for _k, v in carried), "no huge header copied to results"


# --- the pipeline -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline() -> Iterator[Pipeline]:
    with Pipeline(load_settings({}, max_image_pixels=LIMITS.max_pixels, decode_threads=1)) as p:
        yield p


@st.composite
def images(draw: st.DrawFn) -> bytes:
    """Pixels of random shape (1 px to the side limit), depth, channels and format."""
    width = draw(st.one_of(st.integers(1, 64), st.sampled_from([1, 2, 3, 640, 1300, 8192])))
    max_h = max(1, min(8192, LIMITS.max_pixels // width, 4096 if width < 8 else 512))
    height = draw(st.one_of(st.integers(1, min(64, max_h)), st.integers(1, max_h)))
    channels = draw(st.sampled_from([1, 3, 4]))
    depth = draw(st.sampled_from([np.uint8, np.uint16]))
    fmt = draw(st.sampled_from([".png", ".jpg", ".webp", ".bmp"]))
    if fmt != ".png":
        depth = np.uint8
    if fmt == ".jpg" and channels == 4:
        channels = 3
    top = 255 if depth == np.uint8 else 65535
    fill = draw(st.integers(0, top))
    pixels = np.full((height, width, channels), fill, depth)
    pixels[: height // 2, : width // 2] = top - fill
    ok, buf = cv2.imencode(fmt, pixels)
    assert ok
    return buf.tobytes()


@settings(max_examples=40, deadline=None, database=None)
@given(batch=st.lists(st.one_of(images(), mutated()), min_size=1, max_size=4))
def test_pipeline_run_gives_one_record_per_job_whatever_the_images(
    pipeline: Pipeline, batch: list[bytes]
) -> None:
    jobs = [ImageJob(f"r{i}", data) for i, data in enumerate(batch)]
    records = pipeline.run(jobs)
    assert [r["request_id"] for r in records] == [j.request_id for j in jobs]
    for record in records:
        assert record["status"] in ("OK", "ERROR")
        if record["status"] == "ERROR":
            assert record["error"]["code"] in error_classes()
        else:
            w, h = record["image"]["width"], record["image"]["height"]
            for d in record["detections"]:
                assert 0 <= d["x1"] <= d["x2"] <= w and 0 <= d["y1"] <= d["y2"] <= h


# --- memory -------------------------------------------------------------------------------
PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from core.vision.images import ImageLimits, decode
    data = open(sys.argv[1], "rb").read()
    limits = ImageLimits(len(data), 8192, int(sys.argv[2]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pixels = decode(data, limits)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"grew_kb": after - before, "shape": list(pixels.shape)}))
    """
)


@pytest.mark.parametrize("channels", [4, 3])
def test_a_16_bit_image_at_the_pixel_limit_decodes_in_bounded_memory(
    tmp_path: pytest.TempPathFactory, channels: int
) -> None:
    """A 16-bit RGBA PNG of 8 Mpx decodes to 24 MB of BGR; the decode (the 64 MB 16-bit
    buffer libpng fills, plus the output) must stay under 16 bytes per pixel, not the
    ~56 of float copies of the whole image."""
    width, height = 4000, 2000
    pixels = np.zeros((height, width, channels), np.uint16)
    pixels[: height // 2] = 50_000
    path = tmp_path / "big16.png"  # type: ignore[operator]
    path.write_bytes(cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes())
    del pixels
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(path), str(width * height)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=True,
        timeout=120,
    )
    report = json.loads(out.stdout)
    assert report["shape"] == [height, width, 3]
    per_pixel = report["grew_kb"] * 1024 / (width * height)
    assert per_pixel < 16, f"{per_pixel:.1f} bytes per pixel"


def test_every_error_code_the_corpus_expects_is_a_known_one() -> None:
    codes = {c.code for c in cases("qr.replies", 4) if c.code}
    assert codes <= set(error_classes())
    assert issubclass(error_classes()["bad_reply_route"], QrsightError)
