"""Request/reply over Kafka: produce an ``ImageRequest``, wait for the correlated result.

One :class:`ReplyClient` per process. It owns one producer, one consumer manually
assigned to *one* partition of the replies topic, a thread that reads that partition
and completes waiters (a map correlation id → waiter), and a thread that serves the
producer's delivery reports.

Why the client is "ready" only after the assignment: a request whose reply lands on
the partition before this process reads it would lose its reply. The consumer is
assigned at the partition's high watermark read *before* the assignment, so every
reply produced after :meth:`ReplyClient.ready` turns true is at or past the position.

Nothing here blocks without a bound: producing waits at most
``QRSIGHT_API_PRODUCE_TIMEOUT_MS`` for Kafka to accept the request (then
:class:`~core.errors.KafkaUnavailableError`, 503), and the reply wait ends at the
request's deadline (:class:`~core.errors.ReplyTimeoutError`, 504).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import (
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from api.slots import reply_partition
from core.errors import (
    ConfigError,
    KafkaUnavailableError,
    QrsightError,
    ReplyTimeoutError,
)
from core.kafka import avro_codec, check_value_size, consumer_config, producer_config
from core.settings import Settings, env_name
from core.telemetry import tracing
from schemas.codec import RegistryError, WireFormatError
from schemas.names import (
    H_CORRELATION_ID,
    H_DEADLINE_MS,
    H_REPLY_PARTITION,
    H_REPLY_TOPIC,
    H_TRACEPARENT,
    encode_deadline,
    encode_partition,
    header_dict,
)

logger = logging.getLogger(__name__)

ASSIGN_RETRY_S = 1.0
METADATA_TIMEOUT_S = 5.0
POLL_S = 0.2


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class _Waiter:
    """One request in flight: set once by its delivery report, once by its reply."""

    delivered: threading.Event = field(default_factory=threading.Event)
    replied: threading.Event = field(default_factory=threading.Event)
    delivery_error: KafkaError | None = None
    result: dict[str, Any] | None = None
    reply_headers: list[tuple[str, bytes | None]] | None = None
    replied_ns: int = 0  # when the reply thread took the reply (for its span)


class ReplyClient:
    """Produces requests and waits for their replies on one partition of the replies topic."""

    def __init__(self, settings: Settings, partition: int | None = None) -> None:
        if partition is None:
            partition = reply_partition(settings)
        if partition < 0 or partition >= settings.replies_partitions:
            raise ConfigError(
                f"reply partition {partition} is outside 0..{settings.replies_partitions - 1}: "
                f"fix {env_name('api_reply_partition')} or {env_name('replies_partitions')}"
            )
        self.settings = settings
        self.partition = partition
        self.topic = settings.topic_replies
        self._request_codec = avro_codec(settings, "ImageRequest")
        self._result_codec = avro_codec(settings, "DetectionResult")
        self._waiters: dict[str, _Waiter] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._producer: Producer | None = None
        self._consumer: Consumer | None = None
        self._threads: list[threading.Thread] = []
        self.last_problem = "not started"

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> ReplyClient:
        """Create the clients and start the threads; the assignment happens in the background."""
        if self._threads:
            return self
        produce_ms = self.settings.api_produce_timeout_ms
        self._producer = Producer(
            producer_config(
                self.settings,
                "api",
                **{"linger.ms": 0, "message.timeout.ms": produce_ms},
            )
        )
        self._consumer = Consumer(
            consumer_config(
                self.settings,
                f"{self.settings.consumer_group}-api-replies",
                "api-replies",
                **{"enable.auto.commit": False, "fetch.wait.max.ms": 100},
            )
        )
        self.last_problem = "reply partition not assigned yet"
        for target, name in ((self._read_replies, "replies"), (self._serve_producer, "deliveries")):
            thread = threading.Thread(target=target, name=f"qrsight-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info("reply client started topic=%s partition=%s", self.topic, self.partition)
        return self

    def ready(self) -> bool:
        """True once the reply partition is assigned at a known position."""
        return self._ready.is_set()

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until :meth:`ready` (True) or ``timeout_s`` passes (False)."""
        return self._ready.wait(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout_s)
        if self._producer is not None:
            self._producer.flush(timeout_s)
        self._request_codec.close()
        self._result_codec.close()
        self._ready.clear()
        self._threads.clear()
        logger.info("reply client closed partition=%s", self.partition)

    def check(self, timeout_s: float = 2.0) -> list[str]:
        """Problems that make this process unready (empty when ready)."""
        if not self.ready() or self._producer is None:
            return [self.last_problem]
        try:
            metadata = self._producer.list_topics(timeout=timeout_s)
        except KafkaException as exc:
            return [f"Kafka unreachable at {self.settings.kafka_bootstrap}: {exc.args[0]}"]
        wanted = (self.settings.topic_images, self.settings.topic_replies)
        missing = [t for t in wanted if t not in metadata.topics or metadata.topics[t].error]
        return [f"topic {t} does not exist (create it: qrsight-topics)" for t in missing]

    # --- requests -------------------------------------------------------------------------
    def request(
        self,
        data: bytes | Mapping[str, Any],
        timeout_s: float,
        *,
        content_type: str = "",
        conf: float | None = None,
        decode: bool | None = None,
        source: str | None = None,
        request_id: str | None = None,
        traceparent: str | None = None,
    ) -> dict[str, Any]:
        """Send one image and return its ``DetectionResult`` dict.

        Raises :class:`KafkaUnavailableError` when Kafka does not take the request within
        the produce timeout and :class:`ReplyTimeoutError` when no reply comes by the deadline.
        """
        started = time.monotonic()
        record = self._record(
            data,
            content_type=content_type,
            conf=conf,
            decode=decode,
            source=source,
            request_id=request_id,
        )
        rid = record["request_id"]
        if not self.ready():
            raise KafkaUnavailableError(f"not ready: {self.last_problem}", request_id=rid)
        deadline_ms = int(time.time() * 1000 + timeout_s * 1000)
        try:
            value = self._request_codec.encode(record, self.settings.topic_images)
        except RegistryError as exc:
            raise KafkaUnavailableError(f"schema registry: {exc}", request_id=rid) from exc
        check_value_size(self.settings, value, what="image request")
        span = tracing().send(self.settings.topic_images, traceparent, {"qrsight.request_id": rid})
        headers = self._headers(rid, deadline_ms, span.traceparent)
        waiter = _Waiter()
        with self._lock:
            self._waiters[rid] = waiter
        try:
            try:
                self._produce(rid, value, headers, waiter)
            except QrsightError as exc:
                span.end(exc.code)
                raise
            span.end()
            remaining = timeout_s - (time.monotonic() - started)
            if not waiter.replied.wait(max(remaining, 0.0)) or waiter.result is None:
                raise ReplyTimeoutError(
                    f"no reply within {timeout_s * 1000:.0f} ms (are workers running?)",
                    request_id=rid,
                )
            tracing().received(
                self.topic, waiter.reply_headers, span.traceparent, waiter.replied_ns, {}
            )
            return waiter.result
        finally:
            with self._lock:
                self._waiters.pop(rid, None)

    def pending(self) -> int:
        with self._lock:
            return len(self._waiters)

    def _record(
        self,
        data: bytes | Mapping[str, Any],
        *,
        content_type: str,
        conf: float | None,
        decode: bool | None,
        source: str | None,
        request_id: str | None,
    ) -> dict[str, Any]:
        if isinstance(data, Mapping):
            return dict(data)
        options = None
        if conf is not None or decode is not None:
            options = {"confidence": conf, "decode_payloads": decode}
        return {
            "request_id": request_id or new_request_id(),
            "source": source,
            "image": bytes(data),
            "content_type": content_type or "",
            "submitted_at": int(time.time() * 1000),
            "options": options,
        }

    def _headers(
        self, rid: str, deadline_ms: int, traceparent: str
    ) -> list[tuple[str, str | bytes | None]]:
        """Request headers; no ``content_type``: that one announces a *raw* image value."""
        headers: list[tuple[str, str | bytes | None]] = [
            (H_CORRELATION_ID, rid.encode()),
            (H_REPLY_TOPIC, self.topic.encode()),
            (H_REPLY_PARTITION, encode_partition(self.partition)),
            (H_DEADLINE_MS, encode_deadline(deadline_ms)),
            (H_TRACEPARENT, traceparent.encode()),
        ]
        return headers

    def _produce(
        self, rid: str, value: bytes, headers: list[tuple[str, str | bytes | None]], waiter: _Waiter
    ) -> None:
        """Hand the request to Kafka and wait (bounded) for the broker to acknowledge it."""
        assert self._producer is not None
        limit_s = self.settings.api_produce_timeout_ms / 1000
        give_up = time.monotonic() + limit_s

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            waiter.delivery_error = err
            waiter.delivered.set()

        while True:
            try:
                self._producer.produce(
                    self.settings.topic_images,
                    value=value,
                    key=rid.encode(),
                    headers=headers,
                    on_delivery=on_delivery,
                )
                break
            except BufferError:
                if time.monotonic() >= give_up:
                    raise KafkaUnavailableError(
                        "producer queue is full (Kafka slow or down)", request_id=rid
                    ) from None
                time.sleep(0.01)
            except KafkaException as exc:
                raise KafkaUnavailableError(
                    f"Kafka refused the request: {exc.args[0]}", request_id=rid
                ) from exc
        if not waiter.delivered.wait(max(give_up - time.monotonic(), 0.0)):
            raise KafkaUnavailableError(
                f"Kafka did not accept the request within {limit_s * 1000:.0f} ms "
                f"({env_name('api_produce_timeout_ms')})",
                request_id=rid,
            )
        if waiter.delivery_error is not None:
            raise KafkaUnavailableError(
                f"Kafka did not accept the request: {waiter.delivery_error.str()}", request_id=rid
            )

    # --- background threads ---------------------------------------------------------------
    def _serve_producer(self) -> None:
        assert self._producer is not None
        while not self._stop.is_set():
            self._producer.poll(0.1)

    def _read_replies(self) -> None:
        assert self._consumer is not None
        try:
            while not self._stop.is_set():
                if not self._ready.is_set():
                    self._try_assign()
                    continue
                try:
                    msg = self._consumer.poll(POLL_S)
                except KafkaException as exc:  # keep reading: a dead thread strands every waiter
                    logger.warning("reply poll failed reason=%s", exc.args[0] if exc.args else exc)
                    self._stop.wait(POLL_S)
                    continue
                if msg is not None:
                    self._on_message(msg)
        finally:
            self._consumer.close()

    def _try_assign(self) -> None:
        try:
            self._assign()
        except (KafkaException, QrsightError) as exc:
            problem = exc.args[0] if exc.args else exc
            self.last_problem = f"reply partition not assigned: {problem}"
            logger.warning(
                "cannot assign reply partition partition=%s reason=%s", self.partition, problem
            )
            self._stop.wait(ASSIGN_RETRY_S)

    def _assign(self) -> None:
        assert self._consumer is not None
        metadata = self._consumer.list_topics(self.topic, timeout=METADATA_TIMEOUT_S)
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None:
            raise ConfigError(f"topic {self.topic} does not exist (create it: qrsight-topics)")
        if self.partition not in topic.partitions:
            raise ConfigError(
                f"topic {self.topic} has {len(topic.partitions)} partitions, no partition "
                f"{self.partition}: raise {env_name('replies_partitions')} or fix "
                f"{env_name('api_reply_partition')}"
            )
        tp = TopicPartition(self.topic, self.partition)
        _low, high = self._consumer.get_watermark_offsets(tp, timeout=METADATA_TIMEOUT_S)
        start = high if high >= 0 else OFFSET_END
        self._consumer.assign([TopicPartition(self.topic, self.partition, start)])
        self.last_problem = ""
        self._ready.set()
        logger.info(
            "reply partition assigned topic=%s partition=%s offset=%s",
            self.topic,
            self.partition,
            start,
        )

    def _on_message(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                logger.warning("reply consumer error error=%s", err.str())
            return
        value = msg.value()
        if value is None:
            return
        try:
            result = self._result_codec.decode(value, self.topic)
        except (WireFormatError, RegistryError) as exc:
            logger.warning("undecodable reply offset=%s reason=%s", msg.offset(), exc)
            return
        raw_headers = cast("list[tuple[str, bytes | None]] | None", msg.headers())
        headers = header_dict(raw_headers)
        raw_id = headers.get(H_CORRELATION_ID) or msg.key()
        rid = raw_id.decode(errors="replace") if raw_id else str(result.get("request_id"))
        with self._lock:
            waiter = self._waiters.get(rid)
        if waiter is None:
            logger.debug("reply without waiter request_id=%s (timed out or another process)", rid)
            return
        waiter.result = result
        waiter.reply_headers = raw_headers
        waiter.replied_ns = time.time_ns()
        waiter.replied.set()
