"""The codec against a real Schema Registry (Confluent wire format, schema evolution).

The registry is ``QRSIGHT_TEST_SCHEMA_REGISTRY_URL`` when set (any Confluent-compatible
API root), else an Apicurio Registry that ``deploy/local/registry/run.sh`` starts on a
free port for this module (``fetch.sh`` builds it once from Maven Central).
"""

from __future__ import annotations

import copy
import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from fastavro import parse_schema, schemaless_writer

from core.runtime.kafka import consumer_config, producer_config
from core.runtime.settings import Settings
from schemas.codec import FRAME, Codec, RegistryError, WireFormatError, schema_json

REGISTRY_DIR = Path(__file__).resolve().parents[2] / "deploy" / "local" / "registry"
FETCH_TIMEOUT_S = 900  # a cold fetch downloads the registry's jars first
START_TIMEOUT_S = 90
# The module's registry starts in the first test's setup; a cold fetch there must not trip
# the suite's per-test timeout (CI runs fetch.sh beforehand, so it is normally instant).
pytestmark = pytest.mark.timeout(FETCH_TIMEOUT_S + START_TIMEOUT_S + 60)
TS = 1_700_000_000_123


def image_request(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "request_id": "req-1",
        "source": "cam/7",
        "image": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
        "content_type": "image/jpeg",
        "submitted_at": TS,
        "options": {"confidence": 0.35, "decode_payloads": True},
    }
    return {**record, **changes}


def detection(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "x1": 10.5,
        "y1": 20.25,
        "x2": 110.0,
        "y2": 120.75,
        "confidence": 0.875,
        "class_id": 0,
        "label": "qr",
        "text": "https://example.org/?q=1 ✓",
        "corners": [{"x": 10.5, "y": 20.25}, {"x": 110.0, "y": 20.25}] * 2,
    }
    return {**record, **changes}


def detection_result(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "request_id": "req-1",
        "source": "cam/7",
        "status": "OK",
        "error": None,
        "image": {"width": 1920, "height": 1080},
        "model": {"name": "qrsight-qr", "version": "1.0.0", "input_size": 640},
        "detections": [detection(class_id=i) for i in range(5)],
        "timings": {
            "queue_ms": 1.5,
            "decode_ms": 2.25,
            "infer_ms": 12.0,
            "post_ms": 0.5,
            "total_ms": 16.25,
        },
        "created_at": TS + 17,
    }
    return {**record, **changes}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _is_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/subjects", timeout=2) as response:
            return int(response.status) == 200
    except OSError:
        return False


def _wait_until_up(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"the registry exited with {proc.returncode}:\n{log.read_text()[-3000:]}",
                pytrace=False,
            )
        if _is_up(url):
            return
        time.sleep(0.5)
    pytest.fail(
        f"the registry did not answer within {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}",
        pytrace=False,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def registry_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("QRSIGHT_TEST_SCHEMA_REGISTRY_URL")
    if external:
        yield external.rstrip("/")
        return
    fetched = subprocess.run(
        [str(REGISTRY_DIR / "fetch.sh")],
        capture_output=True,
        text=True,
        timeout=FETCH_TIMEOUT_S,
        check=False,
    )
    if fetched.returncode != 0:
        pytest.fail(
            f"{REGISTRY_DIR / 'fetch.sh'} failed ({fetched.returncode}):\n{fetched.stderr}",
            pytrace=False,
        )
    port = _free_port()
    log = tmp_path_factory.mktemp("registry") / "registry.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(REGISTRY_DIR / "run.sh"), str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        url = f"http://127.0.0.1:{port}/apis/ccompat/v7"
        _wait_until_up(url, proc, log)
        yield url
    finally:
        _stop(proc)


@pytest.fixture
def client(registry_url: str) -> Iterator[SchemaRegistryClient]:
    with SchemaRegistryClient({"url": registry_url}) as registry_client:
        yield registry_client


@pytest.fixture
def codec(registry_url: str) -> Iterator[Callable[..., Codec]]:
    """``codec(name, url=registry_url)``: a codec closed after the test."""
    made: list[Codec] = []

    def make(name: str, url: str | None = registry_url) -> Codec:
        made.append(Codec(name, url))
        return made[-1]

    yield make
    for each in made:
        each.close()


@pytest.fixture
def topic() -> str:
    """A topic name of its own, so each test has fresh subjects."""
    return f"qr.test.{uuid.uuid4().hex[:12]}"


def register(client: SchemaRegistryClient, subject: str, raw: dict[str, Any]) -> int:
    return int(client.register_schema(subject, Schema(json.dumps(raw), "AVRO")))


def framed(schema_id: int, raw: dict[str, Any], record: dict[str, Any]) -> bytes:
    """What another producer with schema ``raw`` (registered as ``schema_id``) writes."""
    buf = io.BytesIO()
    buf.write(FRAME.pack(0, schema_id))
    schemaless_writer(buf, parse_schema(raw, named_schemas={}), record)
    return buf.getvalue()


RECORDS = [
    pytest.param("ImageRequest", image_request(), id="request"),
    pytest.param("ImageRequest", image_request(source=None, options=None), id="request-min"),
    pytest.param("DetectionResult", detection_result(), id="result"),
    pytest.param(
        "DetectionResult",
        detection_result(
            status="ERROR", error={"code": "corrupt_image", "message": "bad"}, detections=[]
        ),
        id="result-error",
    ),
]


@pytest.mark.parametrize(("name", "record"), RECORDS)
def test_framed_value_is_magic_byte_registered_id_and_avro_body(
    codec: Callable[..., Codec],
    client: SchemaRegistryClient,
    topic: str,
    name: str,
    record: dict[str, Any],
) -> None:
    data = codec(name).encode(record, topic)

    latest = client.get_latest_version(f"{topic}-value")
    assert data[0] == 0
    assert int.from_bytes(data[1:5], "big") == latest.schema_id
    assert data[5:] == Codec(name).encode(record, topic)
    assert json.loads(latest.schema.schema_str)["name"] == name


@pytest.mark.parametrize(("name", "record"), RECORDS)
def test_round_trip_through_the_registry(
    codec: Callable[..., Codec], topic: str, name: str, record: dict[str, Any]
) -> None:
    data = codec(name).encode(record, topic)
    # a fresh codec has no cache: it must fetch the writer schema by id
    assert codec(name).decode(data, topic) == record


@pytest.mark.parametrize(("name", "record"), RECORDS)
def test_encode_all_frames_one_body_for_each_topic(
    codec: Callable[..., Codec], topic: str, name: str, record: dict[str, Any]
) -> None:
    """A worker encodes a result once for qr.detections and the reply topic: each value is
    what encode() gives for its topic (its subject's schema id), the bodies are equal."""
    other = f"{topic}.replies"
    values = codec(name).encode_all(record, [topic, other])
    one_by_one = codec(name)
    assert values == {t: one_by_one.encode(record, t) for t in (topic, other)}
    assert values[topic][5:] == values[other][5:]
    assert codec(name).decode(values[other], other) == record


def test_registering_again_reuses_the_id(codec: Callable[..., Codec], topic: str) -> None:
    first = codec("ImageRequest").encode(image_request(), topic)
    second = codec("ImageRequest").encode(image_request(), topic)
    assert first[:5] == second[:5]


def test_codecs_read_both_formats(codec: Callable[..., Codec], topic: str) -> None:
    record = detection_result()
    with_registry = codec("DetectionResult")
    plain = Codec("DetectionResult")
    assert plain.decode(with_registry.encode(record, topic), topic) == record
    assert with_registry.decode(plain.encode(record, topic), topic) == record


def appended(name: str) -> dict[str, Any]:
    raw = copy.deepcopy(schema_json(name))
    raw["fields"].append(
        {"name": "priority", "type": ["null", "int"], "default": None, "doc": "new in v2"}
    )
    return raw


@pytest.mark.parametrize(("name", "record"), RECORDS)
def test_old_reader_reads_what_a_new_writer_wrote(
    codec: Callable[..., Codec],
    client: SchemaRegistryClient,
    topic: str,
    name: str,
    record: dict[str, Any],
) -> None:
    new = appended(name)
    schema_id = register(client, f"{topic}-value", new)
    data = framed(schema_id, new, {**record, "priority": 3})
    assert codec(name).decode(data, topic) == record


def without_options() -> dict[str, Any]:
    """ImageRequest before ``options`` existed."""
    raw = copy.deepcopy(schema_json("ImageRequest"))
    raw["fields"] = [f for f in raw["fields"] if f["name"] != "options"]
    return raw


def without_payloads() -> dict[str, Any]:
    """DetectionResult before detections carried ``text`` and ``corners``."""
    raw = copy.deepcopy(schema_json("DetectionResult"))
    (dets,) = [f for f in raw["fields"] if f["name"] == "detections"]
    item = dets["type"]["items"]
    item["fields"] = [f for f in item["fields"] if f["name"] not in ("text", "corners")]
    return raw


def test_new_reader_reads_what_an_old_writer_wrote_request(
    codec: Callable[..., Codec], client: SchemaRegistryClient, topic: str
) -> None:
    old = without_options()
    record = image_request()
    del record["options"]
    data = framed(register(client, f"{topic}-value", old), old, record)
    assert codec("ImageRequest").decode(data, topic) == {**record, "options": None}


def test_new_reader_reads_what_an_old_writer_wrote_result(
    codec: Callable[..., Codec], client: SchemaRegistryClient, topic: str
) -> None:
    old = without_payloads()
    bare = detection()
    del bare["text"], bare["corners"]
    record = detection_result(detections=[bare, bare])
    data = framed(register(client, f"{topic}-value", old), old, record)
    decoded = codec("DetectionResult").decode(data, topic)
    assert decoded["detections"] == [{**bare, "text": None, "corners": None}] * 2
    assert decoded["created_at"] == record["created_at"]


def test_a_status_added_later_reads_as_error(
    codec: Callable[..., Codec], client: SchemaRegistryClient, topic: str
) -> None:
    new = copy.deepcopy(schema_json("DetectionResult"))
    (status,) = [f for f in new["fields"] if f["name"] == "status"]
    status["type"]["symbols"].append("THROTTLED")
    data = framed(
        register(client, f"{topic}-value", new), new, detection_result(status="THROTTLED")
    )
    assert codec("DetectionResult").decode(data, topic)["status"] == "ERROR"


BAD_FRAMED = [
    pytest.param("unknown-id", id="id-unknown-to-the-registry"),
    pytest.param("incompatible", id="writer-schema-incompatible"),
    pytest.param("other-record", id="writer-schema-of-another-record"),
    pytest.param("trailing", id="trailing-bytes-after-the-record"),
    pytest.param("truncated", id="truncated-body"),
]


def bad_framed(kind: str, client: SchemaRegistryClient, topic: str) -> bytes:
    good = Codec("ImageRequest").encode(image_request(), topic)
    subject = f"{topic}-value"
    if kind == "unknown-id":
        return FRAME.pack(0, 2**31 - 7) + good
    if kind == "incompatible":
        raw = {
            "type": "record",
            "name": "ImageRequest",
            "namespace": "qrsight.v1",
            "fields": [{"name": "request_id", "type": "long"}],
        }
        return framed(register(client, subject, raw), raw, {"request_id": 42})
    if kind == "other-record":
        raw = schema_json("DetectionResult")
        return framed(register(client, subject, raw), raw, detection_result())
    schema_id = register(client, subject, schema_json("ImageRequest"))
    if kind == "trailing":
        return FRAME.pack(0, schema_id) + good + b"\x00junk"
    return FRAME.pack(0, schema_id) + good[: len(good) // 2]


@pytest.mark.parametrize("kind", BAD_FRAMED)
def test_bad_framed_values_raise_wire_format_error(
    codec: Callable[..., Codec], client: SchemaRegistryClient, topic: str, kind: str
) -> None:
    data = bad_framed(kind, client, topic)
    with pytest.raises(WireFormatError) as caught:
        codec("ImageRequest").decode(data, topic)
    assert caught.value.code == "bad_message"


def test_an_unreachable_registry_is_a_registry_error_not_a_bad_message(topic: str) -> None:
    url = f"http://127.0.0.1:{_free_port()}/apis/ccompat/v7"
    framed_value = FRAME.pack(0, 1) + Codec("ImageRequest").encode(image_request(), topic)
    with Codec("ImageRequest", url) as unreachable:
        with pytest.raises(RegistryError, match="QRSIGHT_SCHEMA_REGISTRY_URL"):
            unreachable.encode(image_request(), topic)
        with pytest.raises(RegistryError):
            unreachable.decode(framed_value, topic)


def test_framed_values_through_kafka(
    registry_url: str,
    codec: Callable[..., Codec],
    kafka_settings_factory: Callable[..., Settings],
) -> None:
    settings = kafka_settings_factory(schema_registry_url=registry_url)
    writer = codec("ImageRequest", settings.schema_registry_url)
    records = [image_request(request_id=f"req-{i}", image=os.urandom(50_000)) for i in range(3)]
    producer = Producer(producer_config(settings))
    for record in records:
        producer.produce(
            settings.topic_images,
            key=record["request_id"],
            value=writer.encode(record, settings.topic_images),
        )
    assert producer.flush(30) == 0

    consumer = Consumer(consumer_config(settings, settings.consumer_group))
    consumer.subscribe([settings.topic_images])
    reader = codec("ImageRequest", settings.schema_registry_url)
    got: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 60
    try:
        while len(got) < len(records) and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None or msg.error():
                continue
            record = reader.decode(msg.value() or b"", msg.topic() or "")
            got[record["request_id"]] = record
    finally:
        consumer.close()
    assert got == {r["request_id"]: r for r in records}
