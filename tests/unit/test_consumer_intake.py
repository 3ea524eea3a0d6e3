"""How the worker reads one ``qr.images`` message: request id, image, routing, deadline, errors."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, Message

from consumer.commits import next_offsets
from consumer.intake import Intake, looks_like_image, parse_message, read_options
from core.runtime.errors import BadRequestError
from core.runtime.telemetry import trace_headers
from core.vision.images import ImageLimits
from schemas import names
from schemas.codec import Codec

TOPIC = "qr.images"
NOW_MS = 1_800_000_000_000
LIMITS = ImageLimits(max_bytes=1_000_000, max_side=4096, max_pixels=1_000_000)
CODEC = Codec("ImageRequest")


def jpeg(w: int = 64, h: int = 48) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.full((h, w, 3), 128, np.uint8))
    assert ok
    return buf.tobytes()


def png(w: int = 64, h: int = 48) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((h, w, 3), 128, np.uint8))
    assert ok
    return buf.tobytes()


def request(image: bytes, request_id: str = "req-1", **fields: Any) -> bytes:
    record = {
        "request_id": request_id,
        "source": fields.get("source"),
        "image": image,
        "content_type": fields.get("content_type", ""),
        "submitted_at": fields.get("submitted_at", NOW_MS - 250),
        "options": fields.get("options"),
    }
    return CODEC.encode(record, TOPIC)


def message(value: bytes | None, *headers: tuple[str, bytes], offset: int = 42) -> Message:
    return Message(
        topic=TOPIC,
        partition=2,
        offset=offset,
        key=b"k",
        value=value,
        headers=list(headers) or None,
        timestamp=(TIMESTAMP_CREATE_TIME, NOW_MS - 1000),
    )


REPLY_PARTITIONS = 16


def parse(msg: Message) -> Intake:
    return parse_message(
        msg,
        CODEC,
        LIMITS,
        default_replies_topic="qr.replies",
        reply_partitions=lambda _asked: REPLY_PARTITIONS,
        now_ms=NOW_MS,
    )


CID = names.H_CORRELATION_ID


@pytest.mark.parametrize(
    ("msg", "request_id"),
    [
        (message(jpeg(), (CID, b"abc")), "abc"),
        (message(jpeg()), f"{TOPIC}-2-42"),
        (message(request(jpeg(), "from-record")), "from-record"),
        (message(request(jpeg(), "from-record"), (CID, b"from-header")), "from-header"),
        (message(b""), f"{TOPIC}-2-42"),
    ],
    ids=["header", "topic-partition-offset", "record", "header-wins", "bad-input-too"],
)
def test_request_id_is_header_then_record_then_position(msg: Message, request_id: str) -> None:
    item = parse(msg)
    assert item.request_id == request_id
    if item.job is not None:
        assert item.job.request_id == request_id


@pytest.mark.parametrize(
    ("value", "headers", "code"),
    [
        (None, (), "empty_image"),
        (b"", (), "empty_image"),
        (b"hello, not an image", (), "bad_message"),
        (b"\x00\x00\x00\x00\x01garbage", (), "bad_message"),
        (b"GIF89a\x01\x00\x01\x00", (), "unsupported_type"),
        (b"plain text", ((names.H_CONTENT_TYPE, b"image/jpeg"),), "unsupported_type"),
        (jpeg()[:20], (), "corrupt_image"),
        (png(2000, 1000), (), "image_too_large"),
        (request(b""), (), "empty_image"),
        (request(b"not an image"), (), "unsupported_type"),
        (jpeg(), ((names.H_DEADLINE_MS, b"later"),), "bad_message"),
        (jpeg(), ((names.H_REPLY_PARTITION, b"\x01\x02"),), "bad_reply_route"),
        (jpeg(), ((names.H_REPLY_PARTITION, names.encode_partition(16)),), "bad_reply_route"),
        (jpeg(), ((names.H_REPLY_PARTITION, names.encode_partition(-1)),), "bad_reply_route"),
        (jpeg(), ((names.H_REPLY_TOPIC, b"qr.detections"),), "bad_reply_route"),
        (jpeg(), ((names.H_REPLY_TOPIC, b"\xff\xfe"),), "bad_reply_route"),
        (b"", ((names.H_CONTENT_TYPE, b"image/png"),), "empty_image"),
    ],
    ids=[
        "null",
        "empty",
        "text",
        "confluent-garbage",
        "gif",
        "text-claiming-jpeg",
        "jpeg-header-cut",
        "too-many-pixels",
        "request-empty-image",
        "request-not-image",
        "bad-deadline",
        "bad-reply-partition",
        "reply-partition-out-of-range",
        "reply-partition-negative",
        "reply-topic-not-the-replies-topic",
        "reply-topic-not-utf8",
        "empty-value-claiming-png",
    ],
)
def test_bad_input_is_reported_not_raised(
    value: bytes | None, headers: tuple[tuple[str, bytes], ...], code: str
) -> None:
    item = parse(message(value, (CID, b"bad"), *headers))
    assert item.job is None
    assert item.error is not None
    assert (item.error.code, item.error.request_id) == (code, "bad")
    assert item.error.message
    assert item.value == value, "the original value is kept for the DLQ"


@pytest.mark.parametrize("value", [jpeg(), png(), request(jpeg()), request(png())])
def test_good_input_becomes_a_job_with_the_image_bytes(value: bytes) -> None:
    item = parse(message(value))
    assert item.error is None and item.job is not None
    assert looks_like_image(item.job.data)
    assert item.job.data in (jpeg(), png())


def test_request_fields_reach_the_job() -> None:
    options = {"confidence": 0.7, "decode_payloads": False}
    item = parse(message(request(jpeg(), source="cam-3", options=options)))
    assert item.job is not None
    assert (item.source, item.job.source) == ("cam-3", "cam-3")
    assert (item.job.conf, item.job.decode) == (0.7, False)
    assert item.job.submitted_at_ms == NOW_MS - 250, "queue time starts at submitted_at"


def test_raw_image_queue_time_starts_at_the_message_timestamp() -> None:
    item = parse(message(jpeg()))
    assert item.job is not None and item.job.submitted_at_ms == NOW_MS - 1000


@pytest.mark.parametrize(
    ("deadline", "expired"), [(NOW_MS - 1, True), (NOW_MS, False), (NOW_MS + 5000, False)]
)
def test_deadline(deadline: int, expired: bool) -> None:
    item = parse(message(jpeg(), (names.H_DEADLINE_MS, names.encode_deadline(deadline))))
    assert item.expired is expired
    assert (item.job is None) is expired
    assert item.error is None
    assert item.deadline_ms == deadline


@pytest.mark.parametrize(
    ("headers", "topic", "partition"),
    [
        ((), None, None),
        (
            ((names.H_REPLY_TOPIC, b"qr.replies"), (names.H_REPLY_PARTITION, b"\x00\x00\x00\x0f")),
            "qr.replies",
            15,
        ),
        (((names.H_REPLY_PARTITION, names.encode_partition(3)),), "qr.replies", 3),
        (((names.H_REPLY_TOPIC, b"qr.replies"),), "qr.replies", None),
    ],
    ids=["none", "topic-and-partition", "partition-only", "topic-only"],
)
def test_reply_routing(
    headers: tuple[tuple[str, bytes], ...], topic: str | None, partition: int | None
) -> None:
    item = parse(message(jpeg(), *headers))
    assert (item.reply_topic, item.reply_partition) == (topic, partition)


def test_the_job_carries_the_trace_id_of_its_traceparent() -> None:
    trace = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    item = parse(message(jpeg(), (names.H_TRACEPARENT, trace), ("x-other", b"1")))
    assert item.job is not None and item.job.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert parse(message(jpeg(), (names.H_TRACEPARENT, b"garbage"))).job.trace_id is None


@pytest.mark.parametrize(
    "trace", [b"x" * 100_000, b"not-a-trace", b"00-0af7651916cd43dd8448eb211c80319c-b7ad-01"]
)
def test_a_traceparent_that_is_not_w3c_is_dropped_not_copied_into_results(trace: bytes) -> None:
    item = parse(message(jpeg(), (names.H_TRACEPARENT, trace), ("tracestate", b"k=v")))
    assert item.error is None and item.job is not None and item.job.trace_id is None
    assert trace_headers(item.headers) == [], "what the results would carry on"


def test_a_valid_traceparent_and_a_sane_tracestate_are_passed_on() -> None:
    trace = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers = [(names.H_TRACEPARENT, trace), ("tracestate", b"k=v"), ("x", b"1")]
    assert trace_headers(headers) == headers[:2]
    assert trace_headers([headers[0], ("tracestate", b"k" * 10_000)]) == headers[:1]


def test_a_non_utf8_id_is_refused_but_echoed_so_the_caller_can_match_the_error() -> None:
    raw = b"id-\xff\xfe"
    item = parse(message(jpeg(), (CID, raw)))
    assert item.error is not None and item.error.code == "bad_message"
    assert item.result_key == raw
    assert item.request_id == "id-\\xff\\xfe"


@pytest.mark.parametrize(
    "msg",
    [message(jpeg(), (CID, b"i" * 100_000)), message(request(jpeg(), "r" * 300))],
    ids=["header", "record"],
)
def test_an_oversized_id_is_refused_and_the_result_keyed_by_position(msg: Message) -> None:
    item = parse(msg)
    assert item.error is not None and item.error.code == "bad_message"
    assert item.request_id == f"{TOPIC}-2-42"
    assert item.result_key == item.request_id.encode()


def test_next_offsets_is_highest_plus_one_per_partition() -> None:
    items = [parse(message(jpeg(), offset=o)) for o in (5, 9, 7)]
    other = parse(message(b"", offset=3))
    other.partition = 0
    assert next_offsets([*items, other]) == {(TOPIC, 2): 10, (TOPIC, 0): 4}


@pytest.mark.parametrize(
    ("options", "code", "says"),
    [
        ({"confidence": 0.25, "decode_payloads": False}, None, None),
        ({"confidence": None, "decode_payloads": None}, None, None),
        ({"confidence": 0.0, "decode_payloads": True}, None, None),
        ({"confidence": 1.0, "decode_payloads": None}, None, None),
        ({"confidence": 1.5, "decode_payloads": None}, "bad_request", "in [0, 1]"),
        ({"confidence": -0.1, "decode_payloads": None}, "bad_request", "in [0, 1]"),
        ({"confidence": float("nan"), "decode_payloads": None}, "bad_request", "in [0, 1]"),
        ({"confidence": float("inf"), "decode_payloads": None}, "bad_request", "in [0, 1]"),
    ],
)
def test_bad_request_options_become_an_error_result_as_the_api_refuses_them(
    options: dict[str, Any], code: str | None, says: str | None
) -> None:
    item = parse(message(request(jpeg(), options=options)))
    if code is None:
        assert item.error is None and item.job is not None
        assert item.job.conf == options["confidence"]
        assert item.job.decode == options["decode_payloads"]
        return
    assert item.job is None and item.error is not None
    assert item.error.code == code
    assert says in item.error.message and "options.confidence" in item.error.message


@pytest.mark.parametrize(
    "options",
    [{"decode_payloads": "yes"}, {"decode_payloads": 1}, {"confidence": "0.5"}, ["x"]],
)
def test_options_of_the_wrong_type_are_refused_with_a_clear_code(options: Any) -> None:
    with pytest.raises(BadRequestError) as caught:
        read_options(options)
    assert caught.value.code == "bad_request"
    assert "options" in caught.value.message
