"""The wire contract: Avro schemas and the codec (plain mode; the registry is tested in
tests/integration/test_registry.py)."""

from __future__ import annotations

import ast
import copy
import io
import random
import struct
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_writer

from schemas.codec import (
    FRAME,
    SCHEMA_NAMES,
    Codec,
    RegistryError,
    WireFormatError,
    load_schema,
    schema_json,
)

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
TOPIC = "qr.images"
TS = 1_700_000_000_123  # 2023-11-14T22:13:20.123Z


def image_request(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "request_id": "req-1",
        "source": "cam/7",
        "image": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
        "content_type": "image/jpeg",
        "submitted_at": TS,
        "options": {"confidence": 0.35, "decode_payloads": True},
    }
    record.update(changes)
    return record


def detection(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "x1": 10.5,
        "y1": 20.25,
        "x2": 110.0,
        "y2": 120.75,
        "confidence": 0.875,
        "class_id": 0,
        "label": "qr",
        "text": "https://example.org/?q=1",
        "corners": [{"x": 10.5, "y": 20.25}, {"x": 110.0, "y": 20.25}] * 2,
    }
    record.update(changes)
    return record


def detection_result(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "request_id": "req-1",
        "source": "cam/7",
        "status": "OK",
        "error": None,
        "image": {"width": 1920, "height": 1080},
        "model": {"name": "qrsight-qr", "version": "1.0.0", "input_size": 640},
        "detections": [detection(class_id=i, confidence=0.9 - i / 10) for i in range(5)],
        "timings": {
            "queue_ms": 1.5,
            "decode_ms": 2.25,
            "infer_ms": 12.0,
            "post_ms": 0.5,
            "total_ms": 16.25,
        },
        "created_at": TS + 17,
    }
    record.update(changes)
    return record


# --- the schemas ----------------------------------------------------------------------

EXPECTED_FIELDS = {
    "ImageRequest": [
        "request_id",
        "source",
        "image",
        "content_type",
        "submitted_at",
        "options",
    ],
    "ImageOptions": ["confidence", "decode_payloads"],
    "DetectionResult": [
        "request_id",
        "source",
        "status",
        "error",
        "image",
        "model",
        "detections",
        "timings",
        "created_at",
    ],
    "ErrorInfo": ["code", "message"],
    "ImageSize": ["width", "height"],
    "ModelInfo": ["name", "version", "input_size"],
    "Detection": ["x1", "y1", "x2", "y2", "confidence", "class_id", "label", "text", "corners"],
    "Point": ["x", "y"],
    "Timings": ["queue_ms", "decode_ms", "infer_ms", "post_ms", "total_ms"],
}


def named_types(node: Any, found: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every named type (record, enum) defined anywhere in a schema, by name."""
    if isinstance(node, dict):
        if node.get("type") in ("record", "enum"):
            found[node["name"]] = node
        for value in node.values():
            named_types(value, found)
    elif isinstance(node, list):
        for value in node:
            named_types(value, found)
    return found


ALL_TYPES = {
    name: node
    for schema in SCHEMA_NAMES
    for name, node in named_types(schema_json(schema), {}).items()
}


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_file_is_valid_avro_in_the_qrsight_namespace(name: str) -> None:
    raw = schema_json(name)
    assert raw["name"] == name
    assert raw["namespace"] == "qrsight.v1"
    assert load_schema(name)["name"] == f"qrsight.v1.{name}"
    assert (SCHEMAS / f"{name}.avsc").is_file()


@pytest.mark.parametrize("record", sorted(EXPECTED_FIELDS))
def test_records_have_exactly_the_contract_fields_in_order(record: str) -> None:
    assert [f["name"] for f in ALL_TYPES[record]["fields"]] == EXPECTED_FIELDS[record]


@pytest.mark.parametrize("name", sorted(ALL_TYPES))
def test_every_type_and_field_is_documented(name: str) -> None:
    node = ALL_TYPES[name]
    assert node.get("doc", "").strip(), f"{name} has no doc"
    for field in node.get("fields", []):
        assert field.get("doc", "").strip(), f"{name}.{field['name']} has no doc"


NULLABLE = [
    pytest.param(field, id=f"{name}.{field['name']}")
    for name, node in ALL_TYPES.items()
    for field in node.get("fields", [])
    if isinstance(field["type"], list)
]


def test_the_nullable_fields_are_the_contract_ones() -> None:
    names = {p.id for p in NULLABLE}
    assert names == {
        "ImageRequest.source",
        "ImageRequest.options",
        "ImageOptions.confidence",
        "ImageOptions.decode_payloads",
        "DetectionResult.source",
        "DetectionResult.error",
        "DetectionResult.image",
        "DetectionResult.model",
        "Detection.text",
        "Detection.corners",
    }


@pytest.mark.parametrize("field", NULLABLE)
def test_nullable_fields_are_null_first_with_default_null(field: dict[str, Any]) -> None:
    assert field["type"][0] == "null"
    assert len(field["type"]) == 2
    assert "default" in field
    assert field["default"] is None


@pytest.mark.parametrize(
    ("record", "field"), [("ImageRequest", "submitted_at"), ("DetectionResult", "created_at")]
)
def test_timestamps_are_timestamp_millis_longs(record: str, field: str) -> None:
    (spec,) = [f for f in ALL_TYPES[record]["fields"] if f["name"] == field]
    assert spec["type"] == {"type": "long", "logicalType": "timestamp-millis"}


def test_status_is_an_enum_with_an_error_default_for_symbols_added_later() -> None:
    status = ALL_TYPES["Status"]
    assert status["type"] == "enum"
    assert status["symbols"] == ["OK", "ERROR", "EXPIRED"]
    assert status["default"] == "ERROR"


def test_schemas_package_imports_nothing_of_ours() -> None:
    ours = {"core", "consumer", "api", "producer_tools", "training", "bench", "tests"}
    for path in SCHEMAS.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not {n.split(".")[0] for n in names} & ours, f"{path.name} imports {names}"


def test_load_schema_parses_once() -> None:
    assert load_schema("ImageRequest") is load_schema("ImageRequest")


def test_load_schema_refuses_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown schema 'Nope'"):
        load_schema("Nope")


# --- round trips ----------------------------------------------------------------------

ROUND_TRIPS = [
    pytest.param("ImageRequest", image_request(), id="request-full"),
    pytest.param(
        "ImageRequest", image_request(source=None, options=None, content_type=""), id="request-min"
    ),
    pytest.param(
        "ImageRequest",
        image_request(options={"confidence": None, "decode_payloads": False}),
        id="request-partial-options",
    ),
    pytest.param(
        "ImageRequest",
        image_request(request_id="répét-✓-日本", source="カメラ/🎥"),
        id="request-unicode",
    ),
    pytest.param(
        "ImageRequest",
        image_request(image=random.Random(7).randbytes(8 * 1024 * 1024)),
        id="request-8MB-image",
    ),
    pytest.param("ImageRequest", image_request(image=b""), id="request-empty-image"),
    pytest.param("DetectionResult", detection_result(), id="result-5-detections"),
    pytest.param("DetectionResult", detection_result(detections=[]), id="result-no-detections"),
    pytest.param(
        "DetectionResult",
        detection_result(detections=[detection(text=None, corners=None)]),
        id="result-unread-payload",
    ),
    pytest.param(
        "DetectionResult",
        detection_result(
            source=None,
            detections=[detection(text="Grüße, 世界 🌍\n\x00tab\t")],
        ),
        id="result-unicode-payload",
    ),
    pytest.param(
        "DetectionResult",
        detection_result(
            status="ERROR",
            error={"code": "corrupt_image", "message": "truncated JPEG at byte 1234"},
            image=None,
            model=None,
            detections=[],
        ),
        id="result-error",
    ),
    pytest.param(
        "DetectionResult",
        detection_result(
            status="EXPIRED",
            error={"code": "deadline_expired", "message": "late"},
            image=None,
            model=None,
            detections=[],
        ),
        id="result-expired",
    ),
]


@pytest.mark.parametrize(("name", "record"), ROUND_TRIPS)
def test_round_trip_gives_back_the_same_record(name: str, record: dict[str, Any]) -> None:
    codec = Codec(name)
    data = codec.encode(record, TOPIC)
    assert data[0] != 0, "a plain value must not look framed"
    assert codec.decode(data, TOPIC) == record


@pytest.mark.parametrize(("name", "record"), ROUND_TRIPS)
def test_encode_all_gives_every_topic_the_bytes_of_encode(
    name: str, record: dict[str, Any]
) -> None:
    """Without a registry the value does not depend on the topic: one encode serves all."""
    codec = Codec(name)
    values = codec.encode_all(record, [TOPIC, "qr.replies"])
    assert values == {TOPIC: codec.encode(record, TOPIC), "qr.replies": codec.encode(record, TOPIC)}
    assert codec.encode_all(record, []) == {}


@pytest.mark.parametrize(("name", "record"), ROUND_TRIPS)
def test_encode_writes_the_same_bytes_as_fastavro(name: str, record: dict[str, Any]) -> None:
    """The codec names union branches for speed; the bytes must not change."""
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(schema_json(name)), record)
    assert Codec(name).encode(record, TOPIC) == buf.getvalue()


def test_decode_returns_timestamps_as_int_epoch_ms() -> None:
    codec = Codec("DetectionResult")
    decoded = codec.decode(codec.encode(detection_result(), TOPIC), TOPIC)
    assert type(decoded["created_at"]) is int
    assert decoded["created_at"] == TS + 17


@pytest.mark.parametrize(
    "when",
    [
        datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC),
        datetime(2023, 11, 14, 23, 13, 20, 123000, tzinfo=timezone(timedelta(hours=1))),
        datetime(2023, 11, 14, 22, 13, 20, 123000),  # naive: UTC
        datetime(2023, 11, 14, 22, 13, 20, 123999, tzinfo=UTC),  # sub-ms truncated
    ],
    ids=["utc", "plus-one-hour", "naive-is-utc", "microseconds"],
)
def test_encode_takes_datetimes_and_decode_gives_epoch_ms(when: datetime) -> None:
    codec = Codec("ImageRequest")
    record = image_request(submitted_at=when)
    assert codec.decode(codec.encode(record, TOPIC), TOPIC)["submitted_at"] == TS
    assert record["submitted_at"] is when, "encode must not change the caller's dict"


def test_missing_optional_fields_take_their_defaults() -> None:
    codec = Codec("ImageRequest")
    record = image_request()
    for key in ("source", "content_type", "options"):
        del record[key]
    decoded = codec.decode(codec.encode(record, TOPIC), TOPIC)
    assert decoded["source"] is None
    assert decoded["content_type"] == ""
    assert decoded["options"] is None


def test_plain_bytes_are_the_avro_binary_encoding() -> None:
    """Hand-computed: strings and bytes are zigzag length + data, null branch 0, long 1 -> 2."""
    record = {
        "request_id": "a",
        "source": None,
        "image": b"\x01\x02",
        "content_type": "",
        "submitted_at": 1,
        "options": None,
    }
    expected = b"\x02a" + b"\x00" + b"\x04\x01\x02" + b"\x00" + b"\x02" + b"\x00"
    assert Codec("ImageRequest").encode(record, TOPIC) == expected


def test_a_framed_value_decodes_without_a_registry() -> None:
    """0x00, 4-byte big-endian id, body: read with our own schema when no registry is set."""
    codec = Codec("DetectionResult")
    body = codec.encode(detection_result(), TOPIC)
    framed = b"\x00" + (123456).to_bytes(4, "big") + body
    assert FRAME.pack(0, 123456) == framed[:5]
    assert codec.decode(framed, TOPIC) == detection_result()


# --- schema evolution, plain mode -----------------------------------------------------


def with_appended_field(name: str) -> dict[str, Any]:
    """A "v2" of a schema: one new field at the end, with a default (the evolution rule)."""
    raw = copy.deepcopy(schema_json(name))
    raw["fields"].append(
        {"name": "priority", "type": ["null", "int"], "default": None, "doc": "new in v2"}
    )
    return raw


@pytest.mark.parametrize(
    ("name", "record"),
    [("ImageRequest", image_request()), ("DetectionResult", detection_result())],
)
def test_old_reader_reads_a_record_with_a_new_field_appended(
    name: str, record: dict[str, Any]
) -> None:
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(with_appended_field(name)), {**record, "priority": 7})
    assert Codec(name).decode(buf.getvalue(), TOPIC) == record


# --- bad input --------------------------------------------------------------------------

VALID_REQUEST = Codec("ImageRequest").encode(image_request(), TOPIC)
VALID_RESULT = Codec("DetectionResult").encode(detection_result(), TOPIC)

GARBAGE = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x00", id="magic-byte-only"),
    pytest.param(b"\x00\x00\x00\x01", id="short-frame-header"),
    pytest.param(b"\x00\x00\x00\x00\x01", id="frame-header-without-body"),
    pytest.param(b"\x00\x00\x00\x00\x01" + b"\xff" * 40, id="frame-garbage-body"),
    pytest.param(random.Random(1).randbytes(64), id="random-64"),
    pytest.param(random.Random(2).randbytes(1024), id="random-1k"),
    pytest.param(bytes([random.Random(3).randrange(1, 256)]), id="one-random-byte"),
    pytest.param(b'{"request_id": "req-1", "image": "aGVsbG8="}', id="json-text"),
    pytest.param(
        bytes.fromhex("ffd8ffe000104a46494600010100000100010000ffdb004300"), id="jpeg-header"
    ),
    pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", id="png-header"),
    pytest.param(b"\x02\xc3\x28" + b"\x00" * 20, id="invalid-utf8-request-id"),
]


@pytest.mark.parametrize("name", SCHEMA_NAMES)
@pytest.mark.parametrize("data", GARBAGE)
def test_garbage_raises_wire_format_error(name: str, data: bytes) -> None:
    with pytest.raises(WireFormatError) as caught:
        Codec(name).decode(data, TOPIC)
    assert caught.value.code == "bad_message"
    assert name in str(caught.value)


@pytest.mark.parametrize(
    ("name", "valid"), [("ImageRequest", VALID_REQUEST), ("DetectionResult", VALID_RESULT)]
)
def test_every_truncation_of_a_valid_record_raises_wire_format_error(
    name: str, valid: bytes
) -> None:
    codec = Codec(name)
    cuts = sorted({*range(1, 64), *range(64, len(valid), 97), len(valid) - 1})
    for cut in cuts:
        with pytest.raises(WireFormatError):
            codec.decode(valid[:cut], TOPIC)


def test_a_record_of_the_other_schema_raises_wire_format_error() -> None:
    with pytest.raises(WireFormatError):
        Codec("ImageRequest").decode(VALID_RESULT, TOPIC)
    with pytest.raises(WireFormatError):
        Codec("DetectionResult").decode(VALID_REQUEST, TOPIC)


@pytest.mark.parametrize("value", [None, "text", 42, ["list"]])
def test_a_value_that_is_not_bytes_raises_wire_format_error(value: Any) -> None:
    with pytest.raises(WireFormatError, match="must be bytes"):
        Codec("ImageRequest").decode(value, TOPIC)


def test_wire_format_error_is_a_value_error_with_the_bad_message_code() -> None:
    assert issubclass(WireFormatError, ValueError)
    assert WireFormatError.code == "bad_message"
    assert RegistryError.code != WireFormatError.code


BAD_RECORDS = [
    pytest.param("ImageRequest", image_request(request_id=""), "non-empty", id="empty-id"),
    pytest.param("ImageRequest", image_request(image="not bytes"), "image", id="str-image"),
    pytest.param("ImageRequest", image_request(extra=1), "extra", id="unknown-key"),
    pytest.param(
        "ImageRequest",
        image_request(options={"confidence": 0.5, "decode": True}),
        "decode",
        id="unknown-option",
    ),
    pytest.param(
        "ImageRequest",
        {k: v for k, v in image_request().items() if k != "image"},
        "image",
        id="missing-image",
    ),
    pytest.param("DetectionResult", detection_result(status="DONE"), "DONE", id="bad-status"),
    pytest.param(
        "DetectionResult",
        detection_result(detections=[detection(class_id="qr")]),
        "class_id",
        id="str-class-id",
    ),
    pytest.param(
        "DetectionResult",
        {k: v for k, v in detection_result().items() if k != "timings"},
        "timings",
        id="missing-timings",
    ),
    pytest.param("DetectionResult", "not a dict", "request_id", id="not-a-dict"),
]


@pytest.mark.parametrize(("name", "record", "mentions"), BAD_RECORDS)
def test_encoding_a_bad_record_raises_wire_format_error(
    name: str, record: Any, mentions: str
) -> None:
    with pytest.raises(WireFormatError, match=mentions):
        Codec(name).encode(record, TOPIC)


def test_frame_header_is_magic_byte_and_big_endian_id() -> None:
    assert FRAME.size == 5
    assert FRAME.pack(0, 0x01020304) == b"\x00\x01\x02\x03\x04"
    assert struct.unpack(">bI", b"\x00\x00\x00\x01\x00") == (0, 256)
