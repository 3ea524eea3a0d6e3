"""Request/reply over Kafka: produce an ``ImageRequest``, wait for the correlated result.

One :class:`ReplyClient` per process. It owns one producer, one consumer manually
assigned to *one* partition of the replies topic, a thread that reads that partition
and completes waiters (a map correlation id → waiter), a thread that serves the
producer's delivery reports, and a supervisor thread that keeps both running.

Correlation ids are unique by construction: the API makes a random one per request, and
:meth:`ReplyClient.request` refuses an id that is already waiting, so one caller can
never take another's reply.

Why the client is "ready" only after the assignment: a request whose reply lands on
the partition before this process reads it would lose its reply. The consumer is
assigned at the partition's high watermark read *before* the assignment, so every
reply produced after :meth:`ReplyClient.ready` turns true is at or past the position.

Supervision: if the reply reader thread dies, the client turns unready at once (``/ready``
503, new requests 503) and the supervisor starts a new reader after a back-off (1 s,
doubling), which resumes at the offset after the last reply read, so the requests already
waiting still get their replies. After ``max_restarts`` deaths within
``RESTART_WINDOW_S`` it gives up and calls ``on_give_up`` (under gunicorn: the worker
exits and the master starts a fresh one).

Memory: a ``bytearray`` image is consumed, cleared as soon as its Kafka record is
encoded, and the record is dropped as soon as librdkafka has its copy, so a request
waiting for its reply holds no copy of its image.

Nothing here blocks without a bound: producing waits at most
``QRSIGHT_API_PRODUCE_TIMEOUT_MS`` for Kafka to accept the request (then
:class:`~core.runtime.errors.KafkaUnavailableError`, 503), and the reply wait ends at the
request's deadline (:class:`~core.runtime.errors.ReplyTimeoutError`, 504). Error messages name no
broker address (they reach HTTP clients); the log has the details.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
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
from confluent_kafka.admin import AdminClient

from api.metrics import REPLY_READER_RESTARTS, REPLY_WAITERS
from api.slots import reply_partition
from core.runtime.errors import (
    ConfigError,
    KafkaUnavailableError,
    QrsightError,
    ReplyTimeoutError,
)
from core.runtime.kafka import avro_codec, check_value_size, consumer_config, producer_config
from core.runtime.kafka_security import (
    authorization_problem,
    connection_problem,
    is_authorization_error,
)
from core.runtime.results import image_request
from core.runtime.settings import Settings, env_name
from core.runtime.telemetry import tracing
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
SECURITY_CHECK_S = 3.0  # how long a failed assignment asks why (refused login, TLS)
POLL_S = 0.2
SUPERVISE_S = 0.2
RESTART_BACKOFF_S = 1.0
MAX_RESTART_BACKOFF_S = 30.0
RESTART_WINDOW_S = 300.0
MAX_RESTARTS = 5
# /ready asks the broker at most this often (probes and floods share one answer).
READY_CACHE_S = 1.0

Headers = list[tuple[str, str | bytes | None]]


def new_request_id() -> str:
    return uuid.uuid4().hex


class DuplicateRequestError(QrsightError):
    """A request id that is already waiting for its reply: a caller's bug, never a client's
    (the API makes its ids)."""

    code = "duplicate_request_id"


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

    def __init__(
        self,
        settings: Settings,
        partition: int | None = None,
        *,
        on_give_up: Callable[[], None] | None = None,
        max_restarts: int = MAX_RESTARTS,
    ) -> None:
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
        self.on_give_up = on_give_up
        self.max_restarts = max_restarts
        self._request_codec = avro_codec(settings, "ImageRequest")
        self._result_codec = avro_codec(settings, "DetectionResult")
        self._waiters: dict[str, _Waiter] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._producer: Producer | None = None
        self._reader: threading.Thread | None = None
        self._deliveries: threading.Thread | None = None
        self._supervisor: threading.Thread | None = None
        self._next_offset: int | None = None  # where a restarted reader resumes
        self._reader_died_at: float | None = None
        self._restart_times: deque[float] = deque()
        self._ready_cache: tuple[float, list[str]] = (0.0, [])
        self.restarts = 0
        self.gave_up = False
        self.last_problem = "not started"

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> ReplyClient:
        """Create the clients and start the threads; the assignment happens in the background."""
        if self._producer is not None:
            return self
        produce_ms = self.settings.api_produce_timeout_ms
        self._producer = Producer(
            producer_config(
                self.settings,
                "api",
                **{"linger.ms": 0, "message.timeout.ms": produce_ms},
            )
        )
        self.last_problem = "reply partition not assigned yet"
        self._deliveries = self._spawn(self._serve_producer, "deliveries")
        self._start_reader()
        self._supervisor = self._spawn(self._supervise, "reply-supervisor")
        logger.info("reply client started topic=%s partition=%s", self.topic, self.partition)
        return self

    def ready(self) -> bool:
        """True once the reply partition is assigned at a known position and read."""
        return self._ready.is_set()

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until :meth:`ready` (True) or ``timeout_s`` passes (False)."""
        return self._ready.wait(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        for thread in (self._supervisor, self._reader, self._deliveries):
            if thread is not None:
                thread.join(timeout_s)
        if self._producer is not None:
            self._producer.flush(timeout_s)
        self._request_codec.close()
        self._result_codec.close()
        self._ready.clear()
        logger.info("reply client closed partition=%s", self.partition)

    def check(self, timeout_s: float = 2.0) -> list[str]:
        """Problems that make this process unready (empty when ready); no broker address."""
        if self._producer is None:
            return [self.last_problem]
        problems = [
            f"the {name} thread is not running"
            for name, thread in self._threads().items()
            if thread is None or not thread.is_alive()
        ]
        if self.gave_up:
            problems.append(self.last_problem)
        if problems or not self.ready():
            return problems or [self.last_problem]
        checked_at, cached = self._ready_cache
        if time.monotonic() - checked_at < READY_CACHE_S:
            return cached
        problems = self._check_topics(timeout_s)
        self._ready_cache = (time.monotonic(), problems)
        return problems

    def _check_topics(self, timeout_s: float) -> list[str]:
        assert self._producer is not None
        try:
            metadata = self._producer.list_topics(timeout=timeout_s)
        except KafkaException as exc:
            logger.warning(
                "Kafka unreachable bootstrap=%s reason=%s",
                self.settings.kafka_bootstrap,
                exc.args[0] if exc.args else exc,
            )
            return ["Kafka unreachable (the API log has the details)"]
        wanted = {self.settings.topic_images: "write", self.settings.topic_replies: "read"}
        problems = []
        for name, operation in wanted.items():
            topic = metadata.topics.get(name)
            if (
                topic is not None
                and topic.error is not None
                and is_authorization_error(topic.error)
            ):
                problems.append(authorization_problem(self.settings, topic.error, operation, name))
            elif topic is None or topic.error is not None:
                problems.append(f"topic {name} does not exist (create it: qrsight-topics)")
        return problems

    def _threads(self) -> dict[str, threading.Thread | None]:
        return {
            "reply reader": self._reader,
            "delivery": self._deliveries,
            "supervisor": self._supervisor,
        }

    # --- requests -------------------------------------------------------------------------
    def request(
        self,
        data: bytes | bytearray | Mapping[str, Any],
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

        A ``bytearray`` is consumed: it is cleared once the Kafka record is encoded. Raises
        :class:`KafkaUnavailableError` when Kafka does not take the request within the
        produce timeout, :class:`ReplyTimeoutError` when no reply comes by the deadline and
        :class:`DuplicateRequestError` for an id already waiting.
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
        rid = str(record["request_id"])
        if not self.ready():
            raise KafkaUnavailableError(f"not ready: {self.last_problem}", request_id=rid)
        deadline_ms = int(time.time() * 1000 + timeout_s * 1000)
        value = self._encode(record, rid)
        del record
        if isinstance(data, bytearray):
            data.clear()
        check_value_size(self.settings, value, what="image request")
        span = tracing().send(self.settings.topic_images, traceparent, {"qrsight.request_id": rid})
        headers = self._headers(rid, deadline_ms, span.traceparent)
        waiter = self._add_waiter(rid)
        try:
            try:
                self._send(rid, value, headers, waiter)
                del value  # librdkafka holds its own copy until the broker acknowledges it
                self._await_delivery(rid, waiter)
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
            self._remove_waiter(rid)

    def pending(self) -> int:
        with self._lock:
            return len(self._waiters)

    def _add_waiter(self, rid: str) -> _Waiter:
        waiter = _Waiter()
        with self._lock:
            if rid in self._waiters:
                raise DuplicateRequestError(
                    f"request id {rid!r} is already waiting for its reply", request_id=rid
                )
            self._waiters[rid] = waiter
        REPLY_WAITERS.inc()
        return waiter

    def _remove_waiter(self, rid: str) -> None:
        with self._lock:
            self._waiters.pop(rid, None)
        REPLY_WAITERS.dec()

    def _record(
        self,
        data: bytes | bytearray | Mapping[str, Any],
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
        return image_request(
            request_id or new_request_id(),
            data,
            source=source,
            content_type=content_type or "",
            options=options,
        )

    def _encode(self, record: dict[str, Any], rid: str) -> bytes:
        try:
            return self._request_codec.encode(record, self.settings.topic_images)
        except RegistryError as exc:
            logger.warning("schema registry failed request_id=%s reason=%s", rid, exc)
            raise KafkaUnavailableError(
                "the schema registry is unavailable", request_id=rid
            ) from exc

    def _headers(self, rid: str, deadline_ms: int, traceparent: str) -> Headers:
        """Request headers; no ``content_type``: that one announces a *raw* image value."""
        return [
            (H_CORRELATION_ID, rid.encode()),
            (H_REPLY_TOPIC, self.topic.encode()),
            (H_REPLY_PARTITION, encode_partition(self.partition)),
            (H_DEADLINE_MS, encode_deadline(deadline_ms)),
            (H_TRACEPARENT, traceparent.encode()),
        ]

    def _send(self, rid: str, value: bytes, headers: Headers, waiter: _Waiter) -> None:
        """Hand the request to librdkafka (which copies it), retrying a full local queue
        until the produce timeout."""
        assert self._producer is not None
        give_up = time.monotonic() + self.settings.api_produce_timeout_ms / 1000

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
                return
            except BufferError:
                if time.monotonic() >= give_up:
                    raise KafkaUnavailableError(
                        "producer queue is full (Kafka slow or down)", request_id=rid
                    ) from None
                time.sleep(0.01)
            except KafkaException as exc:
                logger.warning("produce refused request_id=%s reason=%s", rid, exc.args[0])
                raise KafkaUnavailableError(
                    "Kafka refused the request (the API log has the details)", request_id=rid
                ) from exc

    def _await_delivery(self, rid: str, waiter: _Waiter) -> None:
        """Wait (bounded) for the broker to acknowledge the request."""
        limit_s = self.settings.api_produce_timeout_ms / 1000
        if not waiter.delivered.wait(limit_s):
            raise KafkaUnavailableError(
                f"Kafka did not accept the request within {limit_s * 1000:.0f} ms "
                f"({env_name('api_produce_timeout_ms')})",
                request_id=rid,
            )
        if waiter.delivery_error is not None:
            logger.warning(
                "request not delivered request_id=%s reason=%s", rid, waiter.delivery_error.str()
            )
            raise KafkaUnavailableError(
                f"Kafka did not accept the request ({waiter.delivery_error.name()})",
                request_id=rid,
            )

    # --- background threads ---------------------------------------------------------------
    def _spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=f"qrsight-{name}", daemon=True)
        thread.start()
        return thread

    def _serve_producer(self) -> None:
        assert self._producer is not None
        while not self._stop.is_set():
            self._producer.poll(0.1)

    def _start_reader(self) -> None:
        # fetch.wait.max.ms stays librdkafka's 500 ms: the broker answers a waiting fetch
        # as soon as a reply lands, so a shorter wait only adds empty fetches while idle
        # (100 ms cost the broker about 10 fetches a second per API process).
        consumer = Consumer(
            consumer_config(
                self.settings,
                f"{self.settings.consumer_group}-api-replies",
                "api-replies",
                **{"enable.auto.commit": False},
            )
        )
        self._reader = self._spawn(lambda: self._read_replies(consumer), "replies")

    def _read_replies(self, consumer: Consumer) -> None:
        try:
            while not self._stop.is_set():
                if not self._ready.is_set():
                    self._try_assign(consumer)
                    continue
                try:
                    msg = consumer.poll(POLL_S)
                except KafkaException as exc:  # keep reading: a dead thread strands every waiter
                    logger.warning("reply poll failed reason=%s", exc.args[0] if exc.args else exc)
                    self._stop.wait(POLL_S)
                    continue
                if msg is not None:
                    self._on_message(msg)
        except BaseException as exc:  # logged, not raised: the supervisor restarts the reader
            self._ready.clear()
            self.last_problem = "the reply reader stopped; restarting it"
            logger.error(
                "reply reader died partition=%s error=%s",
                self.partition,
                type(exc).__name__,
                exc_info=not isinstance(exc, SystemExit),
            )
        finally:
            consumer.close()

    def _try_assign(self, consumer: Consumer) -> None:
        try:
            self._assign(consumer)
        except (KafkaException, QrsightError) as exc:
            problem = exc.args[0] if exc.args else exc
            logger.warning(
                "cannot assign reply partition partition=%s bootstrap=%s reason=%s",
                self.partition,
                self.settings.kafka_bootstrap,
                problem,
            )
            self.last_problem = (
                exc.message if isinstance(exc, QrsightError) else self._unreachable_reason()
            )
            self._stop.wait(ASSIGN_RETRY_S)

    def _unreachable_reason(self) -> str:
        """Why Kafka does not answer: a refused login or certificate, named with the
        setting to fix, else plain unreachable."""
        problem = connection_problem(self.settings, "api", AdminClient, SECURITY_CHECK_S)
        if problem is not None:
            logger.error("Kafka refuses the API problem=%r", problem)
            return f"reply partition not assigned: {problem}"
        return "reply partition not assigned: Kafka unreachable (the API log has the details)"

    def _assign(self, consumer: Consumer) -> None:
        metadata = consumer.list_topics(self.topic, timeout=METADATA_TIMEOUT_S)
        topic = metadata.topics.get(self.topic)
        if topic is not None and topic.error is not None and is_authorization_error(topic.error):
            problem = authorization_problem(self.settings, topic.error, "read", self.topic)
            raise ConfigError(f"reply partition not assigned: {problem}")
        if topic is None or topic.error is not None:
            raise ConfigError(
                f"reply partition not assigned: topic {self.topic} does not exist "
                "(create it: qrsight-topics)"
            )
        if self.partition not in topic.partitions:
            raise ConfigError(
                f"reply partition not assigned: topic {self.topic} has {len(topic.partitions)} "
                f"partitions, no partition {self.partition}: raise "
                f"{env_name('replies_partitions')} or fix {env_name('api_reply_partition')}"
            )
        tp = TopicPartition(self.topic, self.partition)
        start = self._next_offset
        if start is None:
            _low, high = consumer.get_watermark_offsets(tp, timeout=METADATA_TIMEOUT_S)
            start = high if high >= 0 else OFFSET_END
        consumer.assign([TopicPartition(self.topic, self.partition, start)])
        if start >= 0:
            self._next_offset = start
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
        offset = msg.offset()
        if offset is not None and offset >= 0:
            self._next_offset = offset + 1
        try:
            self._complete(msg)
        except Exception:  # one odd reply must not stop the reader
            logger.exception("reply not handled offset=%s", offset)

    def _complete(self, msg: Message) -> None:
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

    # --- supervision ----------------------------------------------------------------------
    def _supervise(self) -> None:
        while not self._stop.wait(SUPERVISE_S) and not self.gave_up:
            try:
                self._keep_threads_running()
            except Exception:
                logger.exception("reply supervisor check failed")

    def _keep_threads_running(self) -> None:
        if self._deliveries is not None and not self._deliveries.is_alive():
            logger.error("delivery thread died; starting it again partition=%s", self.partition)
            self._deliveries = self._spawn(self._serve_producer, "deliveries")
        reader = self._reader
        if reader is None or reader.is_alive() or self._stop.is_set():
            return
        now = time.monotonic()
        if self._reader_died_at is None:
            self._reader_died_at = now
            self._ready.clear()
            self.last_problem = "the reply reader stopped; restarting it"
        while self._restart_times and now - self._restart_times[0] > RESTART_WINDOW_S:
            self._restart_times.popleft()
        if len(self._restart_times) >= self.max_restarts:
            self._give_up()
            return
        backoff = min(RESTART_BACKOFF_S * 2 ** len(self._restart_times), MAX_RESTART_BACKOFF_S)
        if now - self._reader_died_at < backoff:
            return
        self._restart_times.append(now)
        self._reader_died_at = None
        self.restarts += 1
        REPLY_READER_RESTARTS.inc()
        logger.warning(
            "restarting the reply reader partition=%s resume_offset=%s restarts=%s",
            self.partition,
            self._next_offset,
            self.restarts,
        )
        self._start_reader()

    def _give_up(self) -> None:
        self.gave_up = True
        self.last_problem = (
            f"the reply reader died {self.max_restarts + 1} times within "
            f"{RESTART_WINDOW_S:.0f} s; this process cannot serve requests"
        )
        logger.critical("giving up partition=%s reason=%s", self.partition, self.last_problem)
        if self.on_give_up is not None:
            self.on_give_up()
