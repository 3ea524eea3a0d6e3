"""The request side of the reply client: encode an ``ImageRequest``, set its headers, produce
it with back-pressure and wait (bounded) for the broker to acknowledge it.

The producer is idempotent with ``acks=all`` (``core.runtime.kafka.producer_config``): a
request retried by librdkafka after a lost acknowledgement is written once, and only once
every in-sync replica has it. Its ``message.timeout.ms`` (librdkafka's name for
``delivery.timeout.ms``) is ``QRSIGHT_API_PRODUCE_TIMEOUT_MS``, well inside the request's
own timeout, so a write Kafka cannot take is a 503 and never a 504.

Every write's outcome goes to the :class:`~api.circuit.WriteCircuit`: when Kafka stops
taking writes, new requests are refused at once (503 with ``Retry-After``) instead of each
waiting out the produce timeout.

Error messages name no broker address (they reach HTTP clients); the log has the details.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from api.circuit import WriteCircuit, retry_after_s
from api.metrics import WRITE_CIRCUIT_OPEN
from core.runtime.errors import KafkaUnavailableError
from core.runtime.kafka import check_value_size, producer_config
from core.runtime.settings import Settings, env_name
from core.runtime.telemetry import KafkaHeaders
from schemas.codec import Codec, RegistryError
from schemas.names import (
    H_CORRELATION_ID,
    H_DEADLINE_MS,
    H_REPLY_PARTITION,
    H_REPLY_TOPIC,
    H_TRACEPARENT,
    encode_deadline,
    encode_partition,
)

logger = logging.getLogger(__name__)

QUEUE_FULL_RETRY_S = 0.01
DELIVERY_POLL_S = 0.1
# Delivery errors that are the request's own fault, not the cluster's: they do not count
# towards opening the circuit.
ALL_BROKERS_DOWN = "every broker is unreachable"
REQUEST_FAULTS = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD})


def api_producer_config(settings: Settings) -> dict[str, Any]:
    """The API's producer: idempotent, ``acks=all``, no linger (a request waits for it), and
    a delivery timeout of ``QRSIGHT_API_PRODUCE_TIMEOUT_MS``."""
    return producer_config(
        settings,
        "api",
        **{"linger.ms": 0, "message.timeout.ms": settings.api_produce_timeout_ms},
    )


def request_headers(
    rid: str, reply_topic: str, reply_partition: int, deadline_ms: int, traceparent: str
) -> KafkaHeaders:
    """Request headers; no ``content_type``: that one announces a *raw* image value."""
    return [
        (H_CORRELATION_ID, rid.encode()),
        (H_REPLY_TOPIC, reply_topic.encode()),
        (H_REPLY_PARTITION, encode_partition(reply_partition)),
        (H_DEADLINE_MS, encode_deadline(deadline_ms)),
        (H_TRACEPARENT, traceparent.encode()),
    ]


class Sender:
    """One producer per process, its delivery reports served by :meth:`serve`."""

    def __init__(
        self, settings: Settings, codec: Codec, circuit: WriteCircuit | None = None
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.circuit = circuit or WriteCircuit()
        self.timeout_s = settings.api_produce_timeout_ms / 1000
        self._producer: Producer | None = None

    def start(self) -> None:
        if self._producer is None:
            conf = api_producer_config(self.settings)
            conf["error_cb"] = self._on_client_error
            self._producer = Producer(conf)

    @property
    def started(self) -> bool:
        return self._producer is not None

    def serve(self, stop: threading.Event) -> None:
        """Serve delivery reports and client errors until ``stop`` (the delivery thread)."""
        assert self._producer is not None
        while not stop.is_set():
            self._producer.poll(DELIVERY_POLL_S)

    def flush(self, timeout_s: float) -> None:
        if self._producer is not None:
            self._producer.flush(timeout_s)

    def topics(self, timeout_s: float) -> dict[str, KafkaError | None]:
        """The topics the cluster tells of, each with its error (a refused Describe, …) or
        None (KafkaException when it cannot be asked)."""
        assert self._producer is not None
        metadata = self._producer.list_topics(timeout=timeout_s)
        return {name: topic.error for name, topic in metadata.topics.items()}

    def encode(self, record: Mapping[str, Any], rid: str) -> bytes:
        """The Avro value of ``record``, checked against the message size limit."""
        try:
            value = self.codec.encode(dict(record), self.settings.topic_images)
        except RegistryError as exc:
            logger.warning("schema registry failed request_id=%s reason=%s", rid, exc)
            raise KafkaUnavailableError(
                "the schema registry is unavailable", request_id=rid
            ) from exc
        check_value_size(self.settings, value, what="image request")
        return value

    def refuse_if_open(self, rid: str) -> None:
        """503 at once, with ``Retry-After``, while the circuit is open."""
        wait = self.circuit.refusal(time.monotonic())
        if wait is not None:
            problem = self.circuit.problem(time.monotonic()) or "Kafka is not taking writes"
            raise KafkaUnavailableError(problem, request_id=rid, retry_after=retry_after_s(wait))

    def send(
        self, rid: str, value: bytes, headers: KafkaHeaders, partition: int | None = None
    ) -> Future[None]:
        """Hand the request to librdkafka (which copies it), retrying a full local queue
        until the produce timeout; the future completes with its delivery report. Without
        a ``partition`` librdkafka's partitioner chooses one by key (the request id)."""
        assert self._producer is not None
        delivered: Future[None] = Future()
        give_up = time.monotonic() + self.timeout_s

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if not delivered.set_running_or_notify_cancel():
                return  # the caller stopped waiting and counted it as a failure
            self._record(err)
            if err is None:
                delivered.set_result(None)
            else:
                delivered.set_exception(DeliveryError(err))

        while True:
            try:
                self._producer.produce(
                    self.settings.topic_images,
                    value=value,
                    key=rid.encode(),
                    # librdkafka's partitioner by key when none is given (-1: RD_KAFKA_PARTITION_UA)
                    partition=-1 if partition is None else partition,
                    headers=list(headers),  # librdkafka's type: values str | bytes | None
                    on_delivery=on_delivery,
                )
                return delivered
            except BufferError:
                if time.monotonic() >= give_up:
                    self._failed("local queue full")
                    raise KafkaUnavailableError(
                        "producer queue is full (Kafka slow or down)", request_id=rid
                    ) from None
                time.sleep(QUEUE_FULL_RETRY_S)
            except KafkaException as exc:
                logger.warning("produce refused request_id=%s reason=%s", rid, exc.args[0])
                self._failed("produce refused")
                raise KafkaUnavailableError(
                    "Kafka refused the request (the API log has the details)", request_id=rid
                ) from exc

    def await_delivery(self, rid: str, delivered: Future[None]) -> None:
        """Wait (bounded) for the broker to acknowledge the request."""
        try:
            delivered.result(self.timeout_s)
        except FutureTimeout:
            # counted now, not when librdkafka's report comes (a little later), so that the
            # next requests already see the circuit open
            if delivered.cancel():
                self._failed("no acknowledgement in time")
            raise KafkaUnavailableError(
                f"Kafka did not accept the request within {self.timeout_s * 1000:.0f} ms "
                f"({env_name('api_produce_timeout_ms')})",
                request_id=rid,
            ) from None
        except DeliveryError as exc:
            logger.warning("request not delivered request_id=%s reason=%s", rid, exc.error.str())
            raise KafkaUnavailableError(
                f"Kafka did not accept the request ({exc.error.name()})", request_id=rid
            ) from None

    def _record(self, err: KafkaError | None) -> None:
        if err is None:
            if self.circuit.is_open():
                logger.info("Kafka takes writes again; write circuit closed")
                WRITE_CIRCUIT_OPEN.set(0)
            self.circuit.succeeded()
        elif err.code() not in REQUEST_FAULTS:
            self._failed(err.name())

    def _on_client_error(self, err: KafkaError) -> None:
        """librdkafka's error callback (served by :meth:`serve`)."""
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            waiting = self._producer is not None and len(self._producer) > 0
            log = logger.warning if waiting else logger.info  # idle: often an idle close
            log("every broker is down reason=%s writes_waiting=%s", err.str(), waiting)
            was_open = self.circuit.is_open()
            self.circuit.all_brokers_down(
                time.monotonic(), ALL_BROKERS_DOWN, writes_waiting=waiting
            )
            if self.circuit.is_open() and not was_open:
                WRITE_CIRCUIT_OPEN.set(1)
        else:  # librdkafka's own log line (logger "librdkafka") already says it
            logger.debug("producer error code=%s reason=%s", err.name(), err.str())

    def _failed(self, reason: str) -> None:
        was_open = self.circuit.is_open()
        self.circuit.failed(time.monotonic(), reason)
        if self.circuit.is_open() and not was_open:
            logger.warning("Kafka does not take writes; write circuit open reason=%s", reason)
            WRITE_CIRCUIT_OPEN.set(1)


class DeliveryError(Exception):
    """A delivery report with an error (carried to the waiting request)."""

    def __init__(self, error: KafkaError) -> None:
        super().__init__(error.str())
        self.error = error
