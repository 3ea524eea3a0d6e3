"""The micro-batching detection worker: ``qr.images`` in, one ``DetectionResult`` per image out.

One loop, one batch at a time::

    fetch → parse → Pipeline.run (decode pool, one ONNX run, NMS, payloads) → produce
    results (+ reply partition, + DLQ copies) → delivered? → commit the batch's offsets

**Fetch without idle wait.** A blocking ``consume`` for the first message, then whatever
librdkafka has already fetched (``consume(max_batch - 1, timeout=0)``); only when images
were already waiting does the worker top the batch up for at most
``QRSIGHT_MAX_WAIT_MS``. A lone image runs at once; under load batches fill by themselves
(continuous batching). Rebalance callbacks run inside ``consume()``, so a fetch keeps only
messages of partitions still owned, by the same assignment, when it ends.

**Offsets.** At-least-once: after every record of a batch is acknowledged the worker
commits the batch's offsets (asynchronously: one OffsetCommit per batch, never blocking
the loop during an outage), so a kill re-delivers about the batch in hand. Exactly-once:
records and offsets commit in one transaction per batch, under a ``transactional.id``
built from the worker's stable identity (``QRSIGHT_GROUP_INSTANCE_ID``, else the host
name), so a restarted worker fences and aborts its predecessor's open transaction at once;
a transaction the group's rebalance makes abortable is aborted and the batch given back.

**Failures.** Bad input becomes an ``ERROR`` result plus a DLQ copy. A record the broker
refuses for good (too large) does too. Any other exception from the pipeline is retried,
isolated and quarantined (:mod:`consumer.recovery`); a message that kills the process is
recognised after restarts (:mod:`consumer.journal`), and so is one that hangs it past
``QRSIGHT_PIPELINE_TIMEOUT_S`` (:mod:`consumer.watchdog` makes the hang a death). A
broken model or an unreachable broker raises, so the process exits non-zero without
committing and its supervisor restarts it.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from consumer.intake import Intake, parse_message
from consumer.journal import CrashJournal, MessageId, journal_path
from consumer.metrics import WorkerMetrics
from consumer.outputs import (
    DLQ_FALLBACK_BYTES,
    DeliveryError,
    DeliveryTracker,
    Failure,
    OutputConfig,
    OutRecord,
    dlq_record,
    produce_all,
    raise_unrecoverable,
    result_records,
    wait_delivered,
)
from consumer.recovery import BatchRecovery, RetryPolicy, Stopping
from consumer.watchdog import UNGUARDED, HangWatchdog
from core.runtime.errors import ConfigError, QuarantinedError, UndeliverableError
from core.runtime.kafka import avro_codec, consumer_config, message_limits, producer_config
from core.runtime.kafka_security import authorization_problem, is_authorization_error
from core.runtime.results import error_record, expired_record
from core.runtime.settings import Settings
from core.runtime.telemetry import BatchTrace, StageLog, header_traceparent, trace_id_of, tracing
from core.vision.images import ImageLimits
from core.vision.pipeline import Pipeline
from schemas import names
from schemas.codec import RegistryError

logger = logging.getLogger(__name__)

LAG_INTERVAL_S = 5.0
IDLE_POLL_S = 0.5  # also how quickly an idle worker notices stop()
DELIVERY_TIMEOUT_S = 120.0
TXN_TIMEOUT_S = 30.0
TXN_COMMIT_TRIES = 5
DELIVERY_ROUNDS = 3  # first try, then records rebuilt after permanent refusals
REPLY_METADATA_REFRESH_S = 10.0
REGISTRY_TRIES = 10
REBUILD_INTERVAL_S = 60.0
COMMITTED_TIMEOUT_S = 10.0  # reading the group's committed offsets on assignment

Key = tuple[str, int]


def load_pipeline(settings: Settings) -> tuple[Pipeline, dict[str, Any]]:
    """The detector and pipeline, plus the model facts the metrics publish."""
    from core.vision.detector import Detector

    detector = Detector.from_settings(settings)
    info = detector.info
    facts = {
        "name": info.name,
        "version": info.version,
        "input_size": info.input_size,
        "layout": info.layout,
        "providers": ",".join(detector.providers),
        "path": str(settings.model_path),
    }
    pipeline = Pipeline(settings, detector)
    facts["verifier"] = str(settings.verifier_path) if pipeline.verifier else "off"
    return pipeline, facts


class ConsumerFenced(Exception):  # noqa: N818  (a state, handled by replacing the consumer)
    """librdkafka declared the consumer fatally failed (e.g. fenced)."""

    def __init__(self, error: KafkaError) -> None:
        super().__init__(error.str())
        self.error = error


@dataclass
class Fetched:
    """A message and the assignment epoch of its partition when ``consume()`` returned it."""

    msg: Message
    epoch: int


class Worker:
    """One consumer-group member. ``run()`` blocks until ``stop()`` or a failure."""

    def __init__(
        self,
        settings: Settings,
        index: int = 0,
        *,
        pipeline: Pipeline | None = None,
        metrics: WorkerMetrics | None = None,
        watchdog: HangWatchdog = UNGUARDED,
    ) -> None:
        self.settings = settings
        self.watchdog = watchdog  # armed around each pipeline run (consumer.watchdog)
        self.index = index
        self.metrics = metrics or WorkerMetrics(index)
        self.exactly_once = settings.processing_guarantee == "exactly_once"
        self._pipeline = pipeline
        self._owns_pipeline = False
        self._stop = threading.Event()
        self._assigned: set[Key] = set()
        self._epochs: dict[Key, int] = {}  # bumped on every assign, revoke, loss
        self._stored: dict[Key, int] = {}
        self._unconfirmed: dict[Key, int] = {}  # committed asynchronously, not yet confirmed
        self._limits = ImageLimits.from_settings(settings)
        self._request_codec = avro_codec(settings, "ImageRequest")
        self._result_codec = avro_codec(settings, "DetectionResult")
        self._out = OutputConfig(
            settings.topic_detections,
            settings.topic_dlq,
            message_limits(settings).max_message_bytes,
        )
        self._recovery = BatchRecovery(
            self._run_pipeline,
            RetryPolicy.from_settings(settings),
            self._stop.wait,
            on_retry=self.metrics.retries.inc,
            on_quarantine=self.metrics.quarantined.labels("error").inc,
        )
        path = journal_path(settings.state_dir, settings.consumer_group, self.identity, index)
        self.journal = CrashJournal(path, settings.crash_limit)
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._reply_count: int | None = None
        self._reply_checked = -REPLY_METADATA_REFRESH_S
        self._last_lag = 0.0
        self._last_rebuild = -REBUILD_INTERVAL_S
        self._trace: BatchTrace = BatchTrace()  # the batch in hand's spans
        self._stages: StageLog | None = None

    # --- identity and lifecycle -------------------------------------------------------
    def stop(self) -> None:
        """Stop fetching; the batch in hand is finished, delivered and committed."""
        self._stop.set()

    @property
    def live(self) -> bool:
        return not self._stop.is_set()

    @property
    def identity(self) -> str:
        """This host's stable name: ``QRSIGHT_GROUP_INSTANCE_ID``, else the host name."""
        return self.settings.group_instance_id or socket.gethostname()

    @property
    def group_instance_id(self) -> str | None:
        base = self.settings.group_instance_id
        return f"{base}-{self.index}" if base else None

    @property
    def transactional_id(self) -> str:
        return f"{self.settings.consumer_group}-{self.identity}-{self.index}"

    def run(self) -> None:
        """Consume until stopped. Raises on a model, broker or delivery failure."""
        if self._pipeline is None:
            self._pipeline, facts = load_pipeline(self.settings)
            self._owns_pipeline = True
            self.metrics.set_model(facts)
        elif not self.metrics.model_loaded:
            self.metrics.set_model({"name": "injected"})
        if self.journal.recover():
            self.metrics.quarantined.labels("crash")  # make the series visible
        producer = Producer(self._producer_config())
        self._producer = producer
        consumer = self._subscribe()
        try:
            if self.exactly_once:
                producer.init_transactions(TXN_TIMEOUT_S)
            logger.info(
                "worker started worker=%d group=%s instance=%s topic=%s guarantee=%s "
                "max_batch=%d max_wait_ms=%d",
                self.index,
                self.settings.consumer_group,
                self.group_instance_id or "-",
                self.settings.topic_images,
                self.settings.processing_guarantee,
                self.settings.max_batch,
                self.settings.max_wait_ms,
            )
            while True:
                try:
                    self._loop(consumer, producer)
                    break
                except ConsumerFenced as exc:
                    consumer = self._rebuild(consumer, exc)
            self._final_commit(consumer)
        finally:
            self.journal.clear()  # leaving on our own: nothing in hand killed us
            self._close(consumer, producer)

    def _subscribe(self) -> Consumer:
        consumer = Consumer(self._consumer_config())
        consumer.subscribe(
            [self.settings.topic_images],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._consumer = consumer
        return consumer

    def _rebuild(self, consumer: Consumer, exc: ConsumerFenced) -> Consumer:
        """A consumer librdkafka declared fatally failed is replaced in place, once a
        minute at most (more often means a real duplicate ``group.instance.id``: exit).

        Known cause: after a session timeout (a broker outage), librdkafka may still send
        an offset commit with the reset member id, and the broker fences the static member
        for good (librdkafka PR #5585). The batch in hand was not committed; the new
        consumer rejoins under the same ``group.instance.id`` and resumes from the last
        commit."""
        now = time.monotonic()
        if now - self._last_rebuild < REBUILD_INTERVAL_S:
            raise KafkaException(exc.error) from exc
        self._last_rebuild = now
        self.metrics.consumer_rebuilds.inc()
        logger.warning("consumer failed for good, replacing it error=%s", exc.error.str())
        self.journal.clear()
        try:
            consumer.close()
        except (KafkaException, RuntimeError) as close_exc:
            logger.info("closing the failed consumer error=%s", close_exc)
        self._forget([TopicPartition(t, p) for t, p in list(self._assigned)])
        return self._subscribe()

    def _loop(self, consumer: Consumer, producer: Producer) -> None:
        while not self._stop.is_set():
            msgs = self._fetch(consumer)
            if msgs:
                try:
                    self.process_batch(msgs, consumer, producer)
                except Stopping:
                    logger.info("stopped during a retry; the batch stays uncommitted")
                    return
            self._maybe_update_lag(consumer)

    # --- fetching ---------------------------------------------------------------------
    def _fetch(self, consumer: Consumer) -> list[Message]:
        """One micro-batch, without idle wait, of messages of partitions still owned.

        1. wait (up to IDLE_POLL_S) for a first message;
        2. take what librdkafka has already fetched (no wait);
        3. only if images were waiting and the batch is not full: top it up for at most
           ``max_wait_ms``.
        """
        max_batch = self.settings.max_batch
        got = self._consume(consumer, 1, IDLE_POLL_S)
        if got and max_batch > 1:
            more = self._consume(consumer, max_batch - 1, 0)
            got += more
            wait_s = self.settings.max_wait_ms / 1000.0
            if more and len(got) < max_batch and wait_s > 0:
                got += self._consume(consumer, max_batch - len(got), wait_s)
        return self._owned(consumer, got)

    def _consume(self, consumer: Consumer, count: int, timeout_s: float) -> list[Fetched]:
        msgs = consumer.consume(num_messages=count, timeout=timeout_s)
        # after consume(): its rebalance callbacks have run, so this is the epoch they left
        return [Fetched(m, self._epochs.get(_key(m), 0)) for m in msgs]

    def _owned(self, consumer: Consumer, fetched: list[Fetched]) -> list[Message]:
        """Drop messages whose partition was revoked (or revoked and re-assigned) after
        ``consume()`` returned them: the partition's current owner reads them again."""
        keep, dropped = split_owned(fetched, self._assigned, self._epochs)
        if dropped:
            self.metrics.dropped_revoked.inc(sum(len(v) for v in dropped.values()))
            logger.info(
                "dropped messages of partitions revoked during the fetch worker=%d count=%d",
                self.index,
                sum(len(v) for v in dropped.values()),
            )
            self._reseek(consumer, dropped, keep)
        return keep

    def _reseek(
        self, consumer: Consumer, dropped: dict[Key, list[int]], keep: list[Message]
    ) -> None:
        """A partition revoked and re-assigned during the fetch resumes from its committed
        offset; should its position already be past a dropped message, seek back to it."""
        kept = {(m.topic(), m.partition()) for m in keep}
        for key, offsets in dropped.items():
            if key not in self._assigned or key in kept:
                continue
            first = min(offsets)
            try:
                (pos,) = consumer.position([TopicPartition(key[0], key[1])])
                if pos.offset != OFFSET_INVALID and pos.offset > first:
                    consumer.seek(TopicPartition(key[0], key[1], first))
                    logger.info("re-seek partition=%s[%d] offset=%d", key[0], key[1], first)
            except KafkaException as exc:
                logger.warning("re-seek failed partition=%s[%d] error=%s", *key, exc)

    def _close(self, consumer: Consumer, producer: Producer) -> None:
        remaining = producer.flush(self.settings.shutdown_timeout_s / 2)
        if remaining:
            logger.warning("unflushed records at close count=%d", remaining)
        consumer.close()  # leaves the group (a static member does not: it is expected back)
        self._consumer = self._producer = None
        if self._owns_pipeline and self._pipeline is not None:
            self._pipeline.close()
        self.metrics.set_assigned(0)
        logger.info("worker stopped worker=%d", self.index)

    # --- one batch --------------------------------------------------------------------
    def process_batch(
        self,
        msgs: Sequence[Message],
        consumer: Consumer,
        producer: Producer,
        *,
        suspect: bool = False,
    ) -> None:
        """Results for ``msgs``, delivered, then their offsets committed. ``suspect``: one
        message of a batch the worker died on; its commit is waited for, since the next
        message may kill the worker again (and an unfinished commit would re-deliver this
        one)."""
        ids = [message_id(m) for m in msgs if m.error() is None]
        plan = self.journal.plan(ids)
        if plan.one_at_a_time and len(msgs) > 1:
            logger.warning(
                "running a batch one message at a time: the worker died on it before "
                "worker=%d messages=%d",
                self.index,
                len(msgs),
            )
            for msg in msgs:
                self.process_batch([msg], consumer, producer, suspect=True)
            return
        self.journal.note(ids, self._unconfirmed)
        items = self._parse(msgs)
        if not items:
            self.journal.done(ids)
            return
        self.metrics.batch_size.observe(len(items))
        with tracing().batch(items, self.settings.consumer_group) as trace:
            self._trace = trace
            results = self._results(items, plan.doomed, trace.stages)
            started = time.perf_counter()
            if self.exactly_once:
                if not self._deliver_transaction(items, results, consumer, producer):
                    self.journal.done(ids)  # given back (rewound), not a death
                    return
            else:
                self._deliver(items, results, producer)
                self._commit_batch(items, consumer, wait=suspect)
        self.journal.done(ids)
        self.metrics.observe_produce(time.perf_counter() - started, len(items))
        for result in results:
            self.metrics.observe_result(result)

    def _parse(self, msgs: Sequence[Message]) -> list[Intake]:
        """Parse the batch; while the Schema Registry is away (not the messages' fault),
        back off and try again, then give up (exit without committing) after
        REGISTRY_TRIES."""
        for attempt in range(1, REGISTRY_TRIES + 1):
            try:
                return self._parse_once(msgs)
            except RegistryError as exc:
                if attempt == REGISTRY_TRIES:
                    raise
                delay = self._recovery.policy.delay_s(attempt)
                logger.warning(
                    "schema registry unavailable, retrying attempt=%d backoff_s=%.2f error=%s",
                    attempt,
                    delay,
                    exc,
                )
                self.metrics.retries.inc()
                if self._stop.wait(delay):
                    raise Stopping("stopped while the schema registry was away") from exc
        raise AssertionError("unreachable")

    def _parse_once(self, msgs: Sequence[Message]) -> list[Intake]:
        items: list[Intake] = []
        for msg in msgs:
            err = msg.error()
            if err is not None:
                self._consume_error(err)
                continue
            items.append(
                parse_message(
                    msg,
                    self._request_codec,
                    self._limits,
                    default_replies_topic=self.settings.topic_replies,
                    reply_partitions=self._reply_partitions,
                )
            )
        return items

    def _consume_error(self, err: KafkaError) -> None:
        if err.fatal() or err.code() == KafkaError._FATAL:
            raise ConsumerFenced(err)  # this consumer instance is done
        if is_authorization_error(err):  # no retry grants an ACL: exit, naming the one missing
            refused = (
                self.settings.consumer_group
                if err.code() == KafkaError.GROUP_AUTHORIZATION_FAILED
                else self.settings.topic_images
            )
            raise ConfigError(authorization_problem(self.settings, err, "read", refused))

        if err.code() != KafkaError._PARTITION_EOF:
            logger.warning("consume error code=%s error=%s", err.name(), err.str())

    def _results(
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
        self._stages = stages
        ran = iter(self._recovery.run(jobs))  # ModelError, Stopping propagate
        results: list[dict[str, Any]] = []
        for item in items:
            if item.error is not None:
                results.append(error_record(item.request_id, item.source, item.error))
            elif item.expired:
                results.append(self._expired(item))
            else:
                results.append(next(ran))
        return results

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

    def _run_pipeline(self, jobs: Sequence[Any]) -> list[dict[str, Any]]:
        assert self._pipeline is not None
        with self.watchdog.guard():
            return self._pipeline.run(jobs, self._stages)

    @staticmethod
    def _expired(item: Intake) -> dict[str, Any]:
        now = int(time.time() * 1000)
        queued = 0.0 if item.queue_start_ms is None else float(max(now - item.queue_start_ms, 0))
        return expired_record(
            item.request_id, item.source, deadline_ms=item.deadline_ms, queue_ms=queued
        )

    # --- output records -----------------------------------------------------------------
    def _records(
        self,
        items: list[Intake],
        results: list[dict[str, Any]],
        dlq_caps: dict[int, int] | None = None,
    ) -> list[OutRecord]:
        records: list[OutRecord] = []
        caps = dlq_caps or {}
        trace = self._trace
        for i, (item, result) in enumerate(zip(items, results, strict=True)):
            headers = functools.partial(trace.headers, item, result)
            records.extend(
                result_records(
                    item, result, self._result_codec, self._out, i, trace_headers=headers
                )
            )
            if result.get("status") == names.STATUS_ERROR:
                error = result.get("error") or {}
                code, message = str(error.get("code", "")), str(error.get("message", ""))
                dlq = dlq_record(item, code, message, self._out, i, max_bytes=caps.get(i))
                records.append(dlq)
        return records

    def _log_outcomes(self, items: list[Intake], results: list[dict[str, Any]]) -> None:
        for item, result in zip(items, results, strict=True):
            status = result.get("status")
            if status == names.STATUS_ERROR:
                error = result.get("error") or {}
                self.metrics.dlq.labels(str(error.get("code", ""))).inc()
                logger.warning(
                    "bad input request_id=%s %s code=%s message=%s",
                    item.request_id,
                    item.where,
                    error.get("code"),
                    error.get("message"),
                    extra=_ids(item),
                )
            elif status == names.STATUS_EXPIRED:
                logger.info(
                    "expired request_id=%s %s", item.request_id, item.where, extra=_ids(item)
                )

    def _absorb(
        self,
        items: list[Intake],
        results: list[dict[str, Any]],
        failures: list[Failure],
        dlq_caps: dict[int, int],
    ) -> None:
        """Turn records the broker refused for good into what can be delivered: an
        ``ERROR`` result (and DLQ copy) for an image whose result is refused, a shorter
        DLQ copy, no reply for a refused reply route. Raises for anything transient."""
        raise_unrecoverable(failures)
        for failure in failures:
            rec, i = failure.record, failure.record.item
            item = items[i]
            if rec.kind == "dlq":
                size = len(rec.value or b"")
                dlq_caps[i] = DLQ_FALLBACK_BYTES if size > DLQ_FALLBACK_BYTES else 0
                self.metrics.dlq_truncated.inc()
                logger.warning(
                    "DLQ copy refused, truncating request_id=%s size=%d cap=%d error=%s",
                    item.request_id,
                    rec.size(),
                    dlq_caps[i],
                    failure.error.str(),
                )
            elif rec.kind == "reply":
                logger.warning(
                    "reply refused, none sent request_id=%s error=%s",
                    item.request_id,
                    failure.error.str(),
                )
                item.reply_topic = None
            else:
                error = UndeliverableError(
                    f"the broker refused this image's result: {failure.error.str()}",
                    request_id=item.request_id,
                )
                results[i] = error_record(item.request_id, item.source, error)

    # --- delivery and offsets ---------------------------------------------------------
    def _deliver(
        self, items: list[Intake], results: list[dict[str, Any]], producer: Producer
    ) -> None:
        """Produce and wait; records refused for good are rebuilt and sent once more."""
        caps: dict[int, int] = {}
        delivered: set[tuple[int, str]] = set()
        for _round in range(DELIVERY_ROUNDS):
            records = [
                r for r in self._records(items, results, caps) if (r.item, r.kind) not in delivered
            ]
            tracker = DeliveryTracker()
            produce_all(producer, records, tracker)
            wait_delivered(producer, tracker, DELIVERY_TIMEOUT_S)
            failed = {(f.record.item, f.record.kind) for f in tracker.failures}
            delivered |= {(r.item, r.kind) for r in records} - failed
            if not tracker.failures:
                self._log_outcomes(items, results)
                return
            self._absorb(items, results, tracker.failures, caps)
        raise DeliveryError(f"records still refused after {DELIVERY_ROUNDS} rounds")

    def _commit_batch(self, items: list[Intake], consumer: Consumer, wait: bool = False) -> None:
        """Store the batch's offsets and commit them at once, asynchronously unless
        ``wait``: a kill then re-delivers about the batch in hand (not 5 s of auto-commit
        interval), and a broker outage never blocks the worker in a commit (the next
        commit, or the one on revoke or at close, covers a failed one)."""
        nxt = next_offsets(items)
        offsets = [TopicPartition(t, p, o) for (t, p), o in nxt.items()]
        try:
            consumer.store_offsets(offsets=offsets)
            if wait:
                consumer.commit(offsets=offsets, asynchronous=False)
            else:
                consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:  # e.g. the partition was lost meanwhile
            logger.warning("storing or committing offsets failed error=%s", exc)
            return
        self._stored.update(nxt)
        if wait:
            self._confirmed(offsets)
        else:
            self._unconfirmed.update(nxt)  # noted with the next batch until confirmed

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if err is not None and err.code() != KafkaError._NO_OFFSET:
            self.metrics.commit_failures.inc()
            logger.warning("commit failed (the next commit covers it) error=%s", err.str())
            return
        self._confirmed([tp for tp in partitions if tp.error is None])

    def _confirmed(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            key = (tp.topic, tp.partition)
            if key in self._unconfirmed and tp.offset >= self._unconfirmed[key]:
                del self._unconfirmed[key]

    def _resume_delivered(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions a dead predecessor (this identity) had delivered results for, with the
        commit still in flight when it died: commit those offsets now, never backwards, so
        the finished batch is not run and published a second time."""
        ahead = self.journal.take_delivered((tp.topic, tp.partition) for tp in partitions)
        if not ahead or self.exactly_once:
            return
        try:
            committed = consumer.committed(
                [TopicPartition(t, p) for t, p in ahead], timeout=COMMITTED_TIMEOUT_S
            )
            moves = [
                TopicPartition(tp.topic, tp.partition, ahead[(tp.topic, tp.partition)])
                for tp in committed
                if tp.error is None and tp.offset < ahead[(tp.topic, tp.partition)]
            ]
            if not moves:
                return
            consumer.commit(offsets=moves, asynchronous=False)
        except KafkaException as exc:  # the batch is re-delivered: a duplicate, not a loss
            logger.warning("committing the predecessor's delivered offsets failed error=%s", exc)
            return
        logger.info(
            "committed what the previous worker delivered before it died worker=%d offsets=%s",
            self.index,
            ",".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in moves),
        )

    def _deliver_transaction(
        self,
        items: list[Intake],
        results: list[dict[str, Any]],
        consumer: Consumer,
        producer: Producer,
    ) -> bool:
        """Records and offsets in one transaction. False when the transaction had to be
        aborted for a reason that is nobody's fault (a rebalance moved the group on): the
        consumer is rewound to the batch and whoever owns its partitions next redoes it."""
        caps: dict[int, int] = {}
        offsets = [TopicPartition(t, p, o) for (t, p), o in next_offsets(items).items()]
        for _round in range(DELIVERY_ROUNDS):
            tracker = DeliveryTracker()
            records = self._records(items, results, caps)
            if not self._transaction(records, offsets, tracker, consumer):
                self._rewind(items, consumer)
                return False
            if not tracker.failures:
                self._log_outcomes(items, results)
                return True
            self._absorb(items, results, tracker.failures, caps)
        raise DeliveryError(f"records still refused after {DELIVERY_ROUNDS} transactions")

    def _transaction(
        self,
        records: list[OutRecord],
        offsets: list[TopicPartition],
        tracker: DeliveryTracker,
        consumer: Consumer,
    ) -> bool:
        """One transaction: records + offsets. True when committed, or aborted because
        records were refused for good (``tracker.failures`` says which); False when it
        was aborted because the group moved on; raises for anything else."""
        producer = self._producer
        assert producer is not None
        producer.begin_transaction()
        try:
            produce_all(producer, records, tracker)
            wait_delivered(producer, tracker, DELIVERY_TIMEOUT_S)
            if tracker.failures:
                raise_unrecoverable(tracker.failures)
                producer.abort_transaction(TXN_TIMEOUT_S)
                return True
            producer.send_offsets_to_transaction(
                offsets, consumer.consumer_group_metadata(), TXN_TIMEOUT_S
            )
            _commit_transaction(producer)
            return True
        except KafkaException as exc:
            err = exc.args[0]
            abortable = not err.fatal() and (err.txn_requires_abort() or err.retriable())
            self._abort(producer, err)
            if abortable:
                self.metrics.transactions_aborted.inc()
                logger.warning(
                    "transaction aborted, batch given back error=%s (a rebalance moved the "
                    "group on: the partitions' owner redoes it)",
                    err.str(),
                )
                return False
            raise DeliveryError(f"transaction of {len(records)} record(s) failed: {exc}") from exc
        except DeliveryError as exc:
            self._abort(producer, exc)
            raise

    @staticmethod
    def _abort(producer: Producer, reason: object) -> None:
        logger.warning("aborting transaction reason=%s", reason)
        try:
            producer.abort_transaction(TXN_TIMEOUT_S)
        except KafkaException as abort_exc:
            logger.error("abort_transaction failed error=%s", abort_exc)

    def _rewind(self, items: list[Intake], consumer: Consumer) -> None:
        """Seek the batch's partitions back to its first offsets (what the last committed
        transaction left), so no message of an aborted transaction is skipped."""
        first: dict[Key, int] = {}
        for item in items:
            key = (item.topic, item.partition)
            first[key] = min(first.get(key, item.offset), item.offset)
        for (topic, partition), offset in first.items():
            if (topic, partition) not in self._assigned:
                continue
            try:
                consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:  # revoked meanwhile: the new owner starts there
                logger.info("rewind skipped partition=%s[%d] error=%s", topic, partition, exc)

    def _final_commit(self, consumer: Consumer) -> None:
        if self.exactly_once or not self._stored:
            return
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                logger.warning("final commit failed error=%s", exc)

    # --- reply routes -----------------------------------------------------------------
    def _reply_partitions(self, asked: int) -> int:
        """Partitions of the replies topic, from metadata; refreshed (at most every
        REPLY_METADATA_REFRESH_S) when a request names one beyond the known count."""
        now = time.monotonic()
        stale = self._reply_count is None or asked >= self._reply_count
        if stale and now - self._reply_checked >= REPLY_METADATA_REFRESH_S:
            self._reply_checked = now
            self._refresh_reply_partitions()
        if self._reply_count is None:  # metadata unknown (broker away): let produce decide
            return asked + 1
        return self._reply_count

    def _refresh_reply_partitions(self) -> None:
        topic = self.settings.topic_replies
        producer = self._producer
        if producer is None:
            return
        try:
            meta = producer.list_topics(topic, timeout=5).topics.get(topic)
        except KafkaException as exc:
            logger.warning("replies topic metadata unavailable topic=%s error=%s", topic, exc)
            return
        if meta is None or meta.error is not None:
            self._reply_count = 0
            logger.warning("replies topic missing topic=%s error=%s", topic, meta and meta.error)
            return
        self._reply_count = len(meta.partitions)

    # --- rebalance callbacks ----------------------------------------------------------
    def _bump(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._epochs[key] = self._epochs.get(key, 0) + 1

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._bump(partitions)
        self._assigned.update((tp.topic, tp.partition) for tp in partitions)
        self.metrics.set_assigned(len(self._assigned))
        logger.info("partitions assigned worker=%d partitions=%s", self.index, _fmt(partitions))
        self._resume_delivered(consumer, partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        logger.info("partitions revoked worker=%d partitions=%s", self.index, _fmt(partitions))
        self._commit_revoked(consumer, partitions)
        self._forget(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        logger.warning("partitions lost worker=%d partitions=%s", self.index, _fmt(partitions))
        self._forget(partitions)

    def _commit_revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what was stored for the partitions leaving us, before the next owner starts."""
        if self.exactly_once:
            return
        offsets = [
            TopicPartition(tp.topic, tp.partition, self._stored[(tp.topic, tp.partition)])
            for tp in partitions
            if (tp.topic, tp.partition) in self._stored
        ]
        if not offsets:
            return
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            logger.warning("commit on revoke failed error=%s", exc)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        self._bump(partitions)
        for tp in partitions:
            self._assigned.discard((tp.topic, tp.partition))
            self._stored.pop((tp.topic, tp.partition), None)
            self._unconfirmed.pop((tp.topic, tp.partition), None)
            self.metrics.drop_lag(tp.topic, tp.partition)
        self.metrics.set_assigned(len(self._assigned))

    # --- lag --------------------------------------------------------------------------
    def _maybe_update_lag(self, consumer: Consumer) -> None:
        now = time.monotonic()
        if now - self._last_lag < LAG_INTERVAL_S or not self._assigned:
            return
        self._last_lag = now
        try:
            positions = consumer.position([TopicPartition(t, p) for t, p in self._assigned])
        except KafkaException as exc:
            logger.debug("lag update skipped error=%s", exc)
            return
        for tp in positions:
            try:
                _low, high = consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            if tp.offset >= 0 and high >= 0:
                self.metrics.set_lag(tp.topic, tp.partition, high - tp.offset)

    # --- client configs ---------------------------------------------------------------
    def _consumer_config(self) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "partition.assignment.strategy": "cooperative-sticky",
            "on_commit": self._on_commit,
        }
        if self.group_instance_id:
            extra["group.instance.id"] = self.group_instance_id
        # Offsets are committed by the worker: per batch, on revoke and at close. No auto
        # commit: librdkafka's revoke-time auto commit after a session timeout goes out with
        # a reset member id, which fences a static member for good (librdkafka PR #5585).
        extra["enable.auto.commit"] = False
        if self.exactly_once:
            extra["isolation.level"] = "read_committed"
        return consumer_config(
            self.settings, self.settings.consumer_group, role=f"worker-{self.index}", **extra
        )

    def _producer_config(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.exactly_once:
            extra["transactional.id"] = self.transactional_id
        return producer_config(self.settings, role=f"worker-{self.index}", **extra)


def _key(msg: Message) -> Key:
    return (msg.topic() or "", msg.partition() or 0)


def message_id(msg: Message) -> MessageId:
    return (msg.topic() or "", msg.partition() or 0, msg.offset() or 0)


def split_owned(
    fetched: Sequence[Fetched], assigned: set[Key], epochs: dict[Key, int]
) -> tuple[list[Message], dict[Key, list[int]]]:
    """Messages still owned (partition assigned, same assignment epoch as when they were
    returned) and, per partition, the offsets of those that are not. Error events (no
    partition of ours) are kept for the caller to log."""
    keep: list[Message] = []
    dropped: dict[Key, list[int]] = {}
    for f in fetched:
        if f.msg.error() is not None:
            keep.append(f.msg)
            continue
        key = _key(f.msg)
        if key in assigned and epochs.get(key, 0) == f.epoch:
            keep.append(f.msg)
        else:
            dropped.setdefault(key, []).append(f.msg.offset() or 0)
    return keep, dropped


def next_offsets(items: Sequence[Intake]) -> dict[Key, int]:
    """Per partition, the offset to commit after this batch: the highest seen + 1."""
    nxt: dict[Key, int] = {}
    for item in items:
        key = (item.topic, item.partition)
        nxt[key] = max(nxt.get(key, 0), item.offset + 1)
    return nxt


def _commit_transaction(producer: Producer) -> None:
    """``commit_transaction`` with the retries the confluent EOS example does."""
    for attempt in range(1, TXN_COMMIT_TRIES + 1):
        try:
            producer.commit_transaction(TXN_TIMEOUT_S)
            return
        except KafkaException as exc:
            err = exc.args[0]
            if err.retriable() and attempt < TXN_COMMIT_TRIES:
                logger.warning("commit_transaction retry attempt=%d error=%s", attempt, err)
                continue
            raise


def _ids(item: Intake) -> dict[str, str | None]:
    """A log line's request fields (``core.runtime.logs``)."""
    return {
        "request_id": item.request_id,
        "trace_id": trace_id_of(header_traceparent(item.headers)),
    }


def _fmt(partitions: list[TopicPartition]) -> str:
    return ",".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "-"
