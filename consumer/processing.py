"""From a batch's messages to its results: parse each message, then run the pipeline once
for the batch under the hang watchdog, with retries, isolation and quarantine
(:mod:`consumer.recovery`); messages that killed the worker too often are quarantined
unrun (:mod:`consumer.journal`)."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError, Message

from consumer.intake import Intake, ReplyPartitions, parse_message
from consumer.journal import CrashJournal, MessageId
from consumer.metrics import WorkerMetrics
from consumer.recovery import BatchRecovery, RetryPolicy, Stopping
from consumer.watchdog import HangWatchdog
from core.runtime.errors import ConfigError, QuarantinedError
from core.runtime.kafka_security import authorization_problem, is_authorization_error
from core.runtime.results import error_record, expired_record, now_ms
from core.runtime.settings import Settings
from core.runtime.telemetry import StageLog
from core.vision.images import ImageLimits
from core.vision.pipeline import Pipeline
from schemas.codec import Codec, RegistryError

logger = logging.getLogger(__name__)

REGISTRY_TRIES = 10


class ConsumerFenced(Exception):  # noqa: N818  (a state, handled by replacing the consumer)
    """librdkafka declared the consumer fatally failed (e.g. fenced)."""

    def __init__(self, error: KafkaError) -> None:
        super().__init__(error.str())
        self.error = error


class Processing:
    """Parses a batch and computes one ``DetectionResult`` per message, in order."""

    def __init__(
        self,
        settings: Settings,
        codec: Codec,
        journal: CrashJournal,
        metrics: WorkerMetrics,
        stop: threading.Event,
        *,
        reply_partitions: ReplyPartitions,
        watchdog: HangWatchdog,
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.journal = journal
        self.metrics = metrics
        self.stop = stop
        self.reply_partitions = reply_partitions
        self.watchdog = watchdog
        self.limits = ImageLimits.from_settings(settings)
        self.policy = RetryPolicy.from_settings(settings)
        self.pipeline: Pipeline | None = None

    # --- parsing ------------------------------------------------------------------------
    def parse(self, msgs: Sequence[Message]) -> list[Intake]:
        """Parse the batch; while the Schema Registry is away (not the messages' fault),
        back off and try again, then give up (exit without committing) after
        REGISTRY_TRIES."""
        for attempt in range(1, REGISTRY_TRIES + 1):
            try:
                return self._parse_once(msgs)
            except RegistryError as exc:
                if attempt == REGISTRY_TRIES:
                    raise
                delay = self.policy.delay_s(attempt)
                logger.warning(
                    "schema registry unavailable, retrying attempt=%d backoff_s=%.2f error=%s",
                    attempt,
                    delay,
                    exc,
                )
                self.metrics.retries.inc()
                if self.stop.wait(delay):
                    raise Stopping("stopped while the schema registry was away") from exc
        raise AssertionError("unreachable")

    def _parse_once(self, msgs: Sequence[Message]) -> list[Intake]:
        items: list[Intake] = []
        for msg in msgs:
            err = msg.error()
            if err is not None:
                consume_error(err, self.settings)
                continue
            items.append(
                parse_message(
                    msg,
                    self.codec,
                    self.limits,
                    default_replies_topic=self.settings.topic_replies,
                    reply_partitions=self.reply_partitions,
                )
            )
        return items

    # --- results ------------------------------------------------------------------------
    def results(
        self,
        items: list[Intake],
        doomed: frozenset[MessageId] = frozenset(),
        stages: StageLog | None = None,
    ) -> list[dict[str, Any]]:
        """One DetectionResult per item, same order; the model runs once for the batch."""
        for item in items:
            if item.job is not None and (item.topic, item.partition, item.offset) in doomed:
                self._doom(item)
        jobs = [item.job for item in items if item.job is not None]
        ran = iter(self._recovery(stages).run(jobs))  # ModelError, Stopping propagate
        results: list[dict[str, Any]] = []
        for item in items:
            if item.error is not None:
                results.append(error_record(item.request_id, item.source, item.error))
            elif item.expired:
                results.append(expired(item))
            else:
                results.append(next(ran))
        return results

    def _recovery(self, stages: StageLog | None) -> BatchRecovery:
        run: Callable[[Sequence[Any]], list[dict[str, Any]]] = functools.partial(
            self._run_pipeline, stages=stages
        )
        return BatchRecovery(
            run,
            self.policy,
            self.stop.wait,
            on_retry=self.metrics.retries.inc,
            on_quarantine=self.metrics.quarantined.labels("error").inc,
        )

    def _doom(self, item: Intake) -> None:
        suspect = self.journal.suspects[(item.topic, item.partition, item.offset)]
        item.error = QuarantinedError(
            f"the worker died (crashed, was killed or hung) {suspect.deaths} times with this "
            f"message in hand (QRSIGHT_CRASH_LIMIT={self.settings.crash_limit}); "
            "quarantined without running",
            request_id=item.request_id,
        )
        item.job = None
        self.metrics.quarantined.labels("crash").inc()
        logger.error("quarantined request_id=%s %s reason=crash", item.request_id, item.where)

    def _run_pipeline(self, jobs: Sequence[Any], stages: StageLog | None) -> list[dict[str, Any]]:
        assert self.pipeline is not None
        with self.watchdog.guard():
            return self.pipeline.run(jobs, stages)


def consume_error(err: KafkaError, settings: Settings) -> None:
    """An error event from ``consume()``: fatal ones end this consumer instance, a refused
    ACL ends the process (no retry grants it), naming the permission it lacks."""
    if err.fatal() or err.code() == KafkaError._FATAL:
        raise ConsumerFenced(err)
    if is_authorization_error(err):
        refused = (
            settings.consumer_group
            if err.code() == KafkaError.GROUP_AUTHORIZATION_FAILED
            else settings.topic_images
        )
        raise ConfigError(authorization_problem(settings, err, "read", refused))
    if err.code() != KafkaError._PARTITION_EOF:
        logger.warning("consume error code=%s error=%s", err.name(), err.str())


def refused_write(
    err: KafkaError, settings: Settings, transactional_id: str | None
) -> ConfigError | None:
    """A producer's refused ACL, e.g. a user without Write gets no idempotent producer id
    (a fatal error at its first request): like a refused read it ends the process, naming
    what it lacks; any other producer failure is not a setting to fix (None)."""
    if not is_authorization_error(err):
        return None
    refused = {
        KafkaError.CLUSTER_AUTHORIZATION_FAILED: "kafka-cluster",
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED: transactional_id or "-",
        KafkaError.GROUP_AUTHORIZATION_FAILED: settings.consumer_group,
    }.get(err.code(), settings.topic_detections)
    return ConfigError(authorization_problem(settings, err, "write to", refused))


def expired(item: Intake) -> dict[str, Any]:
    now = now_ms()
    queued = 0.0 if item.queue_start_ms is None else float(max(now - item.queue_start_ms, 0))
    return expired_record(
        item.request_id, item.source, deadline_ms=item.deadline_ms, queue_ms=queued
    )
