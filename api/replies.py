"""Request/reply over Kafka: produce an ``ImageRequest``, wait for the correlated result.

One :class:`ReplyClient` per process, made of small parts:

- :mod:`api.sender`: encodes the request, sets its headers, produces it with back-pressure
  and waits (bounded) for its delivery; a write circuit (:mod:`api.circuit`) refuses new
  requests at once while Kafka does not take writes;
- :mod:`api.waiters`: correlation id → the ``Future`` of its reply;
- :mod:`api.reader`: one consumer manually assigned to *one* partition of the replies topic
  at its high watermark, read by a thread that decodes replies and completes the futures;
- :mod:`api.supervisor`: restarts a dead reader after a back-off, and gives up (the process
  is replaced) when it keeps dying;
- :mod:`api.routing`: sends each request to a partition of the least-loaded worker, from
  the workers' group assignment (a thread refreshes it).

This module wires them together; ``qrsight-publish --wait`` uses it too.

Memory: a ``bytearray`` image is consumed, cleared as soon as its Kafka record is
encoded, and the record is dropped as soon as librdkafka has its copy, so a request
waiting for its reply holds no copy of its image.

Nothing here blocks without a bound: producing waits at most
``QRSIGHT_API_PRODUCE_TIMEOUT_MS`` for Kafka to accept the request (then
:class:`~core.runtime.errors.KafkaUnavailableError`, 503), and the reply wait ends at the
request's deadline (:class:`~core.runtime.errors.ReplyTimeoutError`, 504). Error messages
name no broker address (they reach HTTP clients); the log has the details.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from confluent_kafka import KafkaException

from api.circuit import WriteCircuit
from api.reader import ReplyReader
from api.routing import Router
from api.sender import Sender, request_headers
from api.slots import reply_partition
from api.supervisor import MAX_RESTARTS, Supervisor
from api.waiters import DuplicateRequestError, Waiters, new_request_id
from core.runtime.errors import ConfigError, KafkaUnavailableError, QrsightError, ReplyTimeoutError
from core.runtime.kafka import avro_codec
from core.runtime.kafka_security import authorization_problem, is_authorization_error
from core.runtime.results import DetectionResult, image_request, now_ms
from core.runtime.settings import Settings, env_name
from core.runtime.telemetry import tracing

logger = logging.getLogger(__name__)

# /ready asks the broker at most this often (probes and floods share one answer).
READY_CACHE_S = 1.0

__all__ = ["DuplicateRequestError", "ReplyClient", "new_request_id"]


class ReplyClient:
    """Produces requests and waits for their replies on one partition of the replies topic."""

    def __init__(
        self,
        settings: Settings,
        partition: int | None = None,
        *,
        on_give_up: Callable[[], None] | None = None,
        max_restarts: int = MAX_RESTARTS,
        circuit: WriteCircuit | None = None,
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
        self._request_codec = avro_codec(settings, "ImageRequest")
        self._result_codec = avro_codec(settings, "DetectionResult")
        self._stop = threading.Event()
        self.waiters = Waiters()
        self.sender = Sender(settings, self._request_codec, circuit)
        self.router = Router(settings, prefer=partition)
        self._routing: threading.Thread | None = None
        self.reader = ReplyReader(settings, partition, self._result_codec, self.waiters, self._stop)
        self.supervisor = Supervisor(
            self.reader,
            self._start_deliveries,
            self._stop,
            max_restarts=max_restarts,
            on_give_up=on_give_up,
        )
        self._ready_cache: tuple[float, list[str]] = (0.0, [])

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> ReplyClient:
        """Create the clients and start the threads; the assignment happens in the background."""
        if self.sender.started:
            return self
        self.sender.start()
        self.supervisor.start()
        if self.router.enabled:
            self._routing = threading.Thread(
                target=self.router.serve, args=(self._stop,), name="qrsight-routing", daemon=True
            )
            self._routing.start()
        logger.info("reply client started topic=%s partition=%s", self.topic, self.partition)
        return self

    def ready(self) -> bool:
        """True once the reply partition is assigned at a known position and read."""
        return self.reader.ready.is_set()

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until :meth:`ready` (True) or ``timeout_s`` passes (False)."""
        return self.reader.ready.wait(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        for thread in self.supervisor.threads().values():
            if thread is not None:
                thread.join(timeout_s)
        if self._routing is not None:
            self._routing.join(timeout_s)
        self.sender.flush(timeout_s)
        self._request_codec.close()
        self._result_codec.close()
        self.reader.ready.clear()
        logger.info("reply client closed partition=%s", self.partition)

    # --- the supervisor's figures, for tests and /ready -----------------------------------
    @property
    def restarts(self) -> int:
        return self.supervisor.restarts

    @property
    def gave_up(self) -> bool:
        return self.supervisor.gave_up

    @property
    def max_restarts(self) -> int:
        return self.supervisor.max_restarts

    @max_restarts.setter
    def max_restarts(self, value: int) -> None:
        self.supervisor.max_restarts = value

    @property
    def on_give_up(self) -> Callable[[], None] | None:
        return self.supervisor.on_give_up

    @property
    def last_problem(self) -> str:
        if not self.sender.started:
            return "not started"
        return self.supervisor.problem if self.supervisor.gave_up else self.reader.problem

    def check(self, timeout_s: float = 2.0) -> list[str]:
        """Problems that make this process unready (empty when ready); no broker address."""
        if not self.sender.started:
            return [self.last_problem]
        problems = [
            f"the {name} thread is not running"
            for name, thread in self.supervisor.threads().items()
            if thread is None or not thread.is_alive()
        ]
        if self.gave_up:
            problems.append(self.last_problem)
        if problems or not self.ready():
            return problems or [self.last_problem]
        refused = self.sender.circuit.problem(time.monotonic())
        if refused is not None:
            return [refused]
        checked_at, cached = self._ready_cache
        if time.monotonic() - checked_at < READY_CACHE_S:
            return cached
        problems = self._check_topics(timeout_s)
        self._ready_cache = (time.monotonic(), problems)
        return problems

    def _check_topics(self, timeout_s: float) -> list[str]:
        try:
            topics = self.sender.topics(timeout_s)
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
            error = topics.get(name)
            if error is not None and is_authorization_error(error):
                problems.append(authorization_problem(self.settings, error, operation, name))
            elif name not in topics or error is not None:
                problems.append(f"topic {name} does not exist (create it: qrsight-topics)")
        return problems

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
    ) -> DetectionResult:
        """Send one image and return its ``DetectionResult``.

        A ``bytearray`` is consumed: it is cleared once the Kafka record is encoded. Raises
        :class:`KafkaUnavailableError` when Kafka does not take the request within the
        produce timeout (or does not take writes at all: at once, with ``retry_after``),
        :class:`ReplyTimeoutError` when no reply comes by the deadline and
        :class:`DuplicateRequestError` for an id already waiting.
        """
        started = time.monotonic()
        record = request_record(
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
        deadline_ms = now_ms() + int(timeout_s * 1000)
        value = self.sender.encode(record, rid)
        del record
        if isinstance(data, bytearray):
            data.clear()
        self.sender.refuse_if_open(rid)
        span = tracing().send(self.settings.topic_images, traceparent, {"qrsight.request_id": rid})
        headers = request_headers(rid, self.topic, self.partition, deadline_ms, span.traceparent)
        future = self.waiters.add(rid)
        partition = self.router.acquire()
        try:
            try:
                delivered = self.sender.send(rid, value, headers, partition)
                del value  # librdkafka holds its own copy until the broker acknowledges it
                self.sender.await_delivery(rid, delivered)
            except QrsightError as exc:
                span.end(exc.code)
                raise
            span.end()
            remaining = timeout_s - (time.monotonic() - started)
            try:
                reply = future.result(max(remaining, 0.0))
            except FutureTimeout:
                raise ReplyTimeoutError(
                    f"no reply within {timeout_s * 1000:.0f} ms (are workers running?)",
                    request_id=rid,
                ) from None
            tracing().received(self.topic, reply.headers, span.traceparent, reply.received_ns, {})
            return reply.result
        finally:
            self.router.release(partition)
            self.waiters.remove(rid)

    def pending(self) -> int:
        return len(self.waiters)

    def _start_deliveries(self) -> threading.Thread:
        thread = threading.Thread(
            target=self.sender.serve, args=(self._stop,), name="qrsight-deliveries", daemon=True
        )
        thread.start()
        return thread


def request_record(
    data: bytes | bytearray | Mapping[str, Any],
    *,
    content_type: str,
    conf: float | None,
    decode: bool | None,
    source: str | None,
    request_id: str | None,
) -> dict[str, Any]:
    """The ``ImageRequest`` record: ``data`` itself when it is one, else one made around it
    (``options`` only when an option is given)."""
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
