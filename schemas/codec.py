"""Avro codec of qrsight's wire records (``ImageRequest``, ``DetectionResult``).

Two wire formats, chosen by whether a Schema Registry URL is configured:

* **plain** (no registry): the record's schemaless Avro body, nothing else. Reader and
  writer are assumed to share ``schemas/<Name>.avsc``.
* **Confluent** (registry URL set): ``0x00`` magic byte, the schema id as a 4-byte
  big-endian int, then the Avro body, as Confluent's serializers write it. The schema is
  registered under ``<topic>-value`` (TopicNameStrategy); a reader fetches the writer's
  schema by id and resolves it against its own, so old and new schemas interoperate.

:meth:`Codec.decode` accepts both, whatever the codec was built with: a first byte of 0
means framed, anything else plain (the first field of both records is the non-empty
``request_id`` string, whose length byte is never 0, so the two cannot be confused).

Schema evolution rule: **new fields go at the end, with a default**, and no field is
removed, renamed or retyped. The registry resolves writer and reader schemas exactly.
In plain mode there is no writer schema to resolve, so the reader reads the fields it
knows, in order, and ignores what follows: a record written by a newer schema with
fields appended at the end still decodes with the older schema (that is why they go at
the end). Enum ``Status`` has a default symbol (``ERROR``) for symbols added later.

Timestamps (``submitted_at``, ``created_at``) are ``timestamp-millis`` longs: encode
takes an int (epoch ms) or a ``datetime`` (naive means UTC), decode always returns the
int. Any value that is not a valid record raises :class:`WireFormatError`; a registry
that cannot be reached raises :class:`RegistryError` (not the message's fault).
"""

from __future__ import annotations

import io
import json
import logging
import struct
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, cast

from fastavro import parse_schema, schemaless_reader, schemaless_writer

logger = logging.getLogger(__name__)

SCHEMA_DIR = Path(__file__).resolve().parent
SCHEMA_NAMES = ("ImageRequest", "DetectionResult")
MAGIC_BYTE = 0
FRAME = struct.Struct(">bI")  # magic byte, schema id (Confluent wire format)
_TIMESTAMP_FIELDS = ("submitted_at", "created_at")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class WireFormatError(ValueError):
    """A value that is not a valid record of the expected schema (or cannot be encoded)."""

    code = "bad_message"


class RegistryError(RuntimeError):
    """The Schema Registry could not be reached or refused a request.

    Not the message's fault: callers should retry or stop, not dead-letter the message.
    """

    code = "schema_registry_error"


@cache
def schema_json(name: str) -> dict[str, Any]:
    """The raw JSON of ``schemas/<name>.avsc``."""
    if name not in SCHEMA_NAMES:
        raise ValueError(f"unknown schema {name!r}; expected one of {', '.join(SCHEMA_NAMES)}")
    with (SCHEMA_DIR / f"{name}.avsc").open(encoding="utf-8") as f:
        raw: dict[str, Any] = json.load(f)
    return raw


@cache
def load_schema(name: str) -> dict[str, Any]:
    """``schemas/<name>.avsc`` parsed by fastavro (parsed once, then cached)."""
    return _parse(schema_json(name))


@cache
def _decode_schema(name: str) -> dict[str, Any]:
    """The schema as decode reads it: timestamps as plain longs (epoch ms ints)."""
    return _parse(_plain_timestamps(schema_json(name)))


def _parse(raw: Any) -> dict[str, Any]:
    """fastavro's parsed form (its own named types, so variants of a schema never clash)."""
    return cast(dict[str, Any], parse_schema(raw, named_schemas={}))


def _plain_timestamps(node: Any) -> Any:
    """``node`` without ``timestamp-millis`` logical types (same bytes, int values).

    fastavro would turn them into datetimes that the codec would turn back; reading the
    long directly is faster and exact.
    """
    if isinstance(node, dict):
        drop = "logicalType" if node.get("logicalType") == "timestamp-millis" else None
        return {k: _plain_timestamps(v) for k, v in node.items() if k != drop}
    if isinstance(node, list):
        return [_plain_timestamps(v) for v in node]
    return node


def _epoch_ms(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // timedelta(milliseconds=1)


class Codec:
    """Encodes and decodes one record type for Kafka values.

    ``registry_url`` is the Confluent-compatible API root (Confluent Schema Registry:
    ``http://host:8081``; Apicurio Registry: ``http://host:8080/apis/ccompat/v7``);
    ``registry_auth`` is ``user:password`` for HTTP basic auth. Without a URL the codec
    writes plain Avro; it reads both formats either way (see the module docstring).
    A codec with a registry holds HTTP connections: :meth:`close` it (or use ``with``).
    Safe to share between threads.
    """

    def __init__(
        self, schema_name: str, registry_url: str | None = None, registry_auth: str | None = None
    ) -> None:
        self.schema_name = schema_name
        self.schema = load_schema(schema_name)
        self._tag = _union_tagger(self.schema) or _identity
        self._reader = _decode_schema(schema_name)
        self.registry_url = registry_url or None
        self._client: Any = _registry_client(registry_url, registry_auth) if registry_url else None
        self._ids: dict[str, int] = {}  # topic -> id of our schema under <topic>-value
        # schema id -> (writer schema, reader schema or None when the writer is ours)
        self._writers: dict[int, tuple[dict[str, Any], dict[str, Any] | None]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the registry client's connections (a no-op without a registry)."""
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> Codec:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- encode -----------------------------------------------------------------------
    def encode(self, record: dict[str, Any], topic: str) -> bytes:
        """``record`` as a Kafka value for ``topic`` (framed when a registry is set)."""
        return self.encode_all(record, (topic,))[topic]

    def encode_all(self, record: dict[str, Any], topics: Sequence[str]) -> dict[str, bytes]:
        """``record`` as a Kafka value for each of ``topics``: the Avro body is written
        once; with a registry each topic's value is framed with its subject's schema id,
        without one every topic gets the same bytes (a worker's result and its reply)."""
        if not isinstance(record, dict) or not record.get("request_id"):
            # an empty id would also make the plain body start with 0, the framing byte
            raise WireFormatError(f"{self.schema_name} needs a dict with a non-empty request_id")
        if not topics:
            return {}
        record = self._tag(_with_epoch_ms(record))
        buf = io.BytesIO()
        if self._client is not None:
            buf.write(FRAME.pack(MAGIC_BYTE, self._schema_id(topics[0])))
        try:
            schemaless_writer(buf, self.schema, record, strict_allow_default=True)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            raise WireFormatError(
                f"record does not match schema {self.schema_name}: {exc}"
            ) from exc
        value = buf.getvalue()
        out = dict.fromkeys(topics, value)
        if self._client is not None:
            first = self._schema_id(topics[0])
            for topic in topics[1:]:
                if (schema_id := self._schema_id(topic)) != first:
                    out[topic] = FRAME.pack(MAGIC_BYTE, schema_id) + value[FRAME.size :]
        return out

    def _schema_id(self, topic: str) -> int:
        schema_id = self._ids.get(topic)
        if schema_id is None:
            with self._lock:
                schema_id = self._ids.get(topic)
                if schema_id is None:
                    schema_id = self._register(f"{topic}-value")
                    self._ids[topic] = schema_id
                    self._writers[schema_id] = (self._reader, None)
        return schema_id

    def _register(self, subject: str) -> int:
        """Id of our schema under ``subject``: registered if new, else looked up."""
        from confluent_kafka.schema_registry import Schema, SchemaRegistryError

        schema = Schema(json.dumps(schema_json(self.schema_name)), "AVRO")
        try:
            schema_id = int(self._client.register_schema(subject, schema))
        except SchemaRegistryError as exc:
            if exc.http_status_code not in (401, 403):
                raise self._registry_error(f"registering {subject}", exc) from exc
            # no right to register (auto-registration off): the schema must exist already
            try:
                schema_id = int(self._client.lookup_schema(subject, schema).schema_id)
            except Exception as lookup_exc:
                raise self._registry_error(f"looking up {subject}", lookup_exc) from lookup_exc
        except Exception as exc:
            raise self._registry_error(f"registering {subject}", exc) from exc
        logger.info("schema registered subject=%s schema_id=%d", subject, schema_id)
        return schema_id

    # --- decode -----------------------------------------------------------------------
    def decode(self, data: bytes, topic: str) -> dict[str, Any]:
        """The record in a Kafka value of ``topic``, framed or plain.

        A framed value read by a codec without a registry is decoded with this codec's
        own schema (the id is not checked): right as long as writers use the same
        schema, or one with fields appended at the end.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise WireFormatError(
                f"{self.schema_name} value must be bytes, got {type(data).__name__}"
            )
        if len(data) == 0:
            raise WireFormatError(f"empty value on topic {topic}: expected {self.schema_name}")
        if data[0] != MAGIC_BYTE:
            return self._read(data, 0, self._reader, None, exact=False)
        if len(data) < FRAME.size:
            raise WireFormatError(
                f"truncated {self.schema_name} on topic {topic}: {len(data)} bytes, "
                f"shorter than the {FRAME.size}-byte Schema Registry header"
            )
        schema_id = FRAME.unpack_from(data)[1]
        if self._client is None:
            return self._read(data, FRAME.size, self._reader, None, exact=False)
        writer, reader = self._writer_schema(schema_id, topic)
        return self._read(data, FRAME.size, writer, reader, exact=True)

    def _read(
        self,
        data: bytes | bytearray | memoryview,
        offset: int,
        writer: dict[str, Any],
        reader: dict[str, Any] | None,
        *,
        exact: bool,
    ) -> dict[str, Any]:
        fo = io.BytesIO(data)
        fo.seek(offset)
        try:
            record = schemaless_reader(fo, writer, reader)
        # fastavro raises a grab-bag on bad input (EOFError, UnicodeDecodeError,
        # IndexError, SchemaResolutionError, OverflowError, ...): all mean "not this record"
        except Exception as exc:
            raise WireFormatError(
                f"not a valid {self.schema_name} ({len(data)} bytes): {type(exc).__name__}: {exc}"
            ) from exc
        if exact and fo.tell() != len(data):
            raise WireFormatError(
                f"not a valid {self.schema_name}: {len(data) - fo.tell()} bytes left over "
                "after the record"
            )
        if not isinstance(record, dict) or not record.get("request_id"):
            raise WireFormatError(f"not a valid {self.schema_name}: empty request_id")
        return record

    def _writer_schema(
        self, schema_id: int, topic: str
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        cached = self._writers.get(schema_id)
        if cached is not None:
            return cached
        with self._lock:
            cached = self._writers.get(schema_id)
            if cached is None:
                cached = self._fetch_writer(schema_id, topic)
                self._writers[schema_id] = cached
        return cached

    def _fetch_writer(
        self, schema_id: int, topic: str
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        from confluent_kafka.schema_registry import SchemaRegistryError

        try:
            text = self._client.get_schema(schema_id).schema_str
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                raise WireFormatError(
                    f"value on topic {topic} names schema id {schema_id}, which the "
                    f"Schema Registry at {self.registry_url} does not know"
                ) from exc
            raise self._registry_error(f"fetching schema id {schema_id}", exc) from exc
        except Exception as exc:
            raise self._registry_error(f"fetching schema id {schema_id}", exc) from exc
        try:
            raw = _plain_timestamps(json.loads(text))
            writer = _parse(raw)
        except Exception as exc:
            raise WireFormatError(
                f"schema id {schema_id} (topic {topic}) is not a usable Avro schema: {exc}"
            ) from exc
        if raw == _plain_timestamps(schema_json(self.schema_name)):
            return self._reader, None
        logger.info(
            "resolving writer schema schema_id=%d topic=%s reader=%s",
            schema_id,
            topic,
            self.schema_name,
        )
        return writer, self._reader

    def _registry_error(self, what: str, exc: Exception) -> RegistryError:
        return RegistryError(
            f"Schema Registry at {self.registry_url} failed {what}: {exc} "
            "(check QRSIGHT_SCHEMA_REGISTRY_URL and QRSIGHT_SCHEMA_REGISTRY_BASIC_AUTH)"
        )


def _identity(value: Any) -> Any:
    return value


def _union_tagger(schema: Any) -> Callable[[Any], Any] | None:
    """A function giving ``["null", X]`` union values of ``schema`` their branch's name.

    Without the name fastavro picks the branch by validating the value against each
    one, which for ``corners`` (an array of records) costs more than writing it. With
    fastavro's tuple notation ``(name, value)`` it writes the branch directly; the
    bytes are the same. None when the schema has no such union.
    """
    if isinstance(schema, list):
        if len(schema) != 2 or schema[0] != "null" or not isinstance(schema[1], dict):
            return None
        branch = schema[1]
        name = branch["name"] if branch["type"] in ("record", "enum", "fixed") else branch["type"]
        inner = _union_tagger(branch) or _identity
        return lambda value: value if value is None else (name, inner(value))
    if not isinstance(schema, dict):
        return None
    if schema["type"] == "array":
        items = _union_tagger(schema["items"])
        if items is None:
            return None
        return lambda value: [items(v) for v in value] if isinstance(value, list) else value
    if schema["type"] == "record":
        taggers = [(f["name"], t) for f in schema["fields"] if (t := _union_tagger(f["type"]))]
        if not taggers:
            return None

        def tag_record(value: Any) -> Any:
            if not isinstance(value, dict):
                return value
            tagged = dict(value)
            for field, tag in taggers:
                if field in tagged:
                    tagged[field] = tag(tagged[field])
            return tagged

        return tag_record
    return None


def _registry_client(url: str, auth: str | None) -> Any:
    from confluent_kafka.schema_registry import SchemaRegistryClient

    conf = {"url": url}
    if auth:
        conf["basic.auth.user.info"] = auth
    return SchemaRegistryClient(conf)


def _with_epoch_ms(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with datetime timestamps as epoch ms (a copy only when one is changed)."""
    changed = None
    for name in _TIMESTAMP_FIELDS:
        value = record.get(name)
        if isinstance(value, datetime):
            changed = changed if changed is not None else dict(record)
            changed[name] = _epoch_ms(value)
    return record if changed is None else changed
