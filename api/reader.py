"""The reply side of the reply client: one consumer manually assigned to *one* partition of
the replies topic, read by one thread that decodes each reply and completes its waiter's
future (as Faust's ``ReplyConsumer``).

Why the client is "ready" only after the assignment: a request whose reply lands on the
partition before this process reads it would lose its reply. The consumer is assigned at
the partition's high watermark read *before* the assignment, so every reply produced after
:attr:`ReplyReader.ready` is set is at or past the position. A reader started again after
a death resumes at the offset after the last reply it read (:attr:`ReplyReader.next_offset`),
so the requests already waiting still get their replies.

A thread that dies is not restarted here; :mod:`api.supervisor` decides when.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, cast

from confluent_kafka import (
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from api.waiters import Reply, Waiters
from core.runtime.errors import ConfigError, QrsightError
from core.runtime.kafka import consumer_config
from core.runtime.kafka_security import (
    authorization_problem,
    connection_problem,
    is_authorization_error,
)
from core.runtime.results import DetectionResult
from core.runtime.settings import Settings, env_name
from core.runtime.telemetry import KafkaHeaders
from schemas.codec import Codec, RegistryError, WireFormatError
from schemas.names import H_CORRELATION_ID, header_dict

logger = logging.getLogger(__name__)

ASSIGN_RETRY_S = 1.0
METADATA_TIMEOUT_S = 5.0
POLL_S = 0.2
SECURITY_CHECK_S = 3.0  # how long a failed assignment asks why (refused login, TLS)
READER_DIED = "the reply reader stopped; restarting it"


def start_offset(resume_at: int | None, high_watermark: int) -> int:
    """Where to read from: after the last reply read, else the high watermark (the end
    when the broker does not know it)."""
    if resume_at is not None:
        return resume_at
    return high_watermark if high_watermark >= 0 else OFFSET_END


def partition_problem(topic: str, partition: int, partitions: set[int] | None) -> str | None:
    """Why ``partition`` of ``topic`` cannot be assigned (``partitions`` None: no such
    topic), or None."""
    if partitions is None:
        return (
            f"reply partition not assigned: topic {topic} does not exist "
            "(create it: qrsight-topics)"
        )
    if partition not in partitions:
        return (
            f"reply partition not assigned: topic {topic} has {len(partitions)} "
            f"partitions, no partition {partition}: raise "
            f"{env_name('replies_partitions')} or fix {env_name('api_reply_partition')}"
        )
    return None


def correlation_id(headers: KafkaHeaders | None, key: bytes | None, result: DetectionResult) -> str:
    """The request a reply answers: its ``correlation_id`` header, else its key, else the
    result's ``request_id``."""
    raw = header_dict(headers).get(H_CORRELATION_ID) or key
    return raw.decode(errors="replace") if raw else str(result.get("request_id"))


class ReplyReader:
    """Reads one reply partition in a thread of its own and completes :class:`Waiters`."""

    def __init__(
        self,
        settings: Settings,
        partition: int,
        codec: Codec,
        waiters: Waiters,
        stop: threading.Event,
    ) -> None:
        self.settings = settings
        self.topic = settings.topic_replies
        self.partition = partition
        self.codec = codec
        self.waiters = waiters
        self.stop = stop
        self.ready = threading.Event()
        self.next_offset: int | None = None  # where a restarted reader resumes
        self.problem = "reply partition not assigned yet"
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """A new consumer and a new thread (after a death: resumes at :attr:`next_offset`)."""
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
        self.thread = threading.Thread(
            target=self.run, args=(consumer,), name="qrsight-replies", daemon=True
        )
        self.thread.start()

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def mark_dead(self) -> None:
        self.ready.clear()
        self.problem = READER_DIED

    def run(self, consumer: Consumer) -> None:
        try:
            while not self.stop.is_set():
                if not self.ready.is_set():
                    self._try_assign(consumer)
                    continue
                try:
                    msg = consumer.poll(POLL_S)
                except KafkaException as exc:  # keep reading: a dead thread strands every waiter
                    logger.warning("reply poll failed reason=%s", exc.args[0] if exc.args else exc)
                    self.stop.wait(POLL_S)
                    continue
                if msg is not None:
                    self.on_message(msg)
        except BaseException as exc:  # logged, not raised: the supervisor restarts the reader
            self.mark_dead()
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
            logger.warning(
                "cannot assign reply partition partition=%s bootstrap=%s reason=%s",
                self.partition,
                self.settings.kafka_bootstrap,
                exc.args[0] if exc.args else exc,
            )
            self.problem = (
                exc.message if isinstance(exc, QrsightError) else self._unreachable_reason()
            )
            self.stop.wait(ASSIGN_RETRY_S)

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
            refused = authorization_problem(self.settings, topic.error, "read", self.topic)
            raise ConfigError(f"reply partition not assigned: {refused}")
        known = None if topic is None or topic.error is not None else set(topic.partitions)
        problem = partition_problem(self.topic, self.partition, known)
        if problem is not None:
            raise ConfigError(problem)
        start = self.next_offset
        if start is None:
            tp = TopicPartition(self.topic, self.partition)
            _low, high = consumer.get_watermark_offsets(tp, timeout=METADATA_TIMEOUT_S)
            start = start_offset(None, high)
        consumer.assign([TopicPartition(self.topic, self.partition, start)])
        if start >= 0:
            self.next_offset = start
        self.problem = ""
        self.ready.set()
        logger.info(
            "reply partition assigned topic=%s partition=%s offset=%s",
            self.topic,
            self.partition,
            start,
        )

    def on_message(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                logger.warning("reply consumer error error=%s", err.str())
            return
        offset = msg.offset()
        if offset is not None and offset >= 0:
            self.next_offset = offset + 1
        try:
            self._complete(msg)
        except Exception:  # one odd reply must not stop the reader
            logger.exception("reply not handled offset=%s", offset)

    def _complete(self, msg: Message) -> None:
        value = msg.value()
        if value is None:
            return
        try:
            decoded: dict[str, Any] = self.codec.decode(value, self.topic)
        except (WireFormatError, RegistryError) as exc:
            logger.warning("undecodable reply offset=%s reason=%s", msg.offset(), exc)
            return
        result = cast(DetectionResult, decoded)
        headers = cast("KafkaHeaders | None", msg.headers())
        rid = correlation_id(headers, msg.key(), result)
        if not self.waiters.complete(rid, Reply(result, headers, time.time_ns())):
            logger.debug("reply without waiter request_id=%s (timed out or another process)", rid)
