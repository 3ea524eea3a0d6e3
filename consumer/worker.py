"""The micro-batching detection worker: ``qr.images`` in, one ``DetectionResult`` per image out.

One loop, one batch at a time::

    fetch → parse → Pipeline.run (decode pool, one ONNX run, NMS, payloads) → produce
    results (+ reply partition, + DLQ copies) → delivered? → commit the batch's offsets

The worker is that loop; its decisions live in small parts, each with unit tests that
start no broker: which partitions it owns and whether a fetched message is still its own
(:mod:`consumer.ownership`), the per-batch state (:mod:`consumer.batch`), the records a
batch produces and what to do with those the broker refuses (:mod:`consumer.outputs`),
what to commit when and what a dead predecessor left to commit (:mod:`consumer.commits`),
and the exactly-once transactions (:mod:`consumer.transactions`).

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
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from consumer.batch import Batch, one_at_a_time, stamp_epochs
from consumer.clients import worker_consumer_config, worker_producer_config
from consumer.commits import (
    CommitBook,
    as_partitions,
    committed_offsets,
    next_offsets,
    note_written_at,
    resume_moves,
)
from consumer.intake import Intake, parse_message
from consumer.journal import CrashJournal, MessageId, journal_path
from consumer.lag import LagReporter
from consumer.metrics import WorkerMetrics
from consumer.outputs import (
    DeliveryError,
    DeliveryTracker,
    OutputConfig,
    OutRecord,
    absorb,
    batch_records,
    produce_all,
    wait_delivered,
)
from consumer.ownership import (
    Fetched,
    Ownership,
    fmt,
    keys_of,
    message_key,
    reseek,
    split_owned,
)
from consumer.recovery import BatchRecovery, RetryPolicy, Stopping
from consumer.routes import ReplyRoutes
from consumer.transactions import DELIVERY_TIMEOUT_S, Outcome, Transactions, first_offsets, rewind
from consumer.watchdog import UNGUARDED, HangWatchdog
from core.runtime.errors import QuarantinedError
from core.runtime.kafka import avro_codec, message_limits
from core.runtime.results import error_record, expired_record
from core.runtime.settings import Settings
from core.runtime.telemetry import StageLog, header_traceparent, trace_id_of, tracing
from core.vision.images import ImageLimits
from core.vision.pipeline import Pipeline
from schemas import names
from schemas.codec import RegistryError

__all__ = ["ConsumerFenced", "Fetched", "Worker", "load_pipeline", "next_offsets", "split_owned"]

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.5  # also how quickly an idle worker notices stop()
DELIVERY_ROUNDS = 3  # first try, then records rebuilt after permanent refusals
REGISTRY_TRIES = 10
REBUILD_INTERVAL_S = 60.0
# At-least-once: fetching pauses once more than this many batches of delivered messages
# await a confirmed commit (consumer.commits.CommitBook.holding)
UNCOMMITTED_BATCHES = 2
COMMIT_STALLED_S = 2.0  # an unanswered commit this old: no synchronous commit on revoke
FINAL_COMMIT_SHARE = 0.25  # of QRSIGHT_SHUTDOWN_TIMEOUT_S, waiting for the final commit
CLOSE_SHARE = 0.4  # of QRSIGHT_SHUTDOWN_TIMEOUT_S, waiting for the consumer to leave the group
COMMITTED_TIMEOUT_S = 10.0  # reading the group's committed offsets on assignment


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
        self.ownership = Ownership()
        self.book = CommitBook(max_uncommitted=UNCOMMITTED_BATCHES * settings.max_batch)
        self._limits = ImageLimits.from_settings(settings)
        self._request_codec = avro_codec(settings, "ImageRequest")
        self._result_codec = avro_codec(settings, "DetectionResult")
        self._out = OutputConfig(
            settings.topic_detections,
            settings.topic_dlq,
            message_limits(settings).max_message_bytes,
        )
        self._policy = RetryPolicy.from_settings(settings)
        path = journal_path(settings.state_dir, settings.consumer_group, self.identity, index)
        self.journal = CrashJournal(path, settings.crash_limit)
        self._routes = ReplyRoutes(settings.topic_replies)
        self._lag = LagReporter(self.metrics)
        self._consumer: Consumer | None = None
        self._txns: Transactions | None = None
        self._last_rebuild = -REBUILD_INTERVAL_S
        self._note_written: float | None = None  # a dead predecessor's note (unix time)

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
        self._load_model()
        self._note_written = note_written_at(self.journal.path)
        if self.journal.recover():
            self.metrics.quarantined.labels("crash")  # make the series visible
        producer = Producer(
            worker_producer_config(
                self.settings,
                self.index,
                transactional_id=self.transactional_id if self.exactly_once else None,
            )
        )
        self._routes.producer = producer
        consumer = self._subscribe()
        try:
            if self.exactly_once:
                self._txns = Transactions(
                    producer, on_given_back=self.metrics.transactions_aborted.inc
                )
                self._txns.init()
            self._log_start()
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

    def _load_model(self) -> None:
        if self._pipeline is None:
            self._pipeline, facts = load_pipeline(self.settings)
            self._owns_pipeline = True
            self.metrics.set_model(facts)
        elif not self.metrics.model_loaded:
            self.metrics.set_model({"name": "injected"})

    def _log_start(self) -> None:
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

    def _subscribe(self) -> Consumer:
        consumer = Consumer(
            worker_consumer_config(
                self.settings,
                self.index,
                group_instance_id=self.group_instance_id,
                on_commit=self._on_commit,
                exactly_once=self.exactly_once,
            )
        )
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
        self._forget(list(self.ownership.assigned))
        return self._subscribe()

    def _loop(self, consumer: Consumer, producer: Producer) -> None:
        while not self._stop.is_set():
            if not self.exactly_once:
                self._hold_back(consumer)
            batch = self._fetch(consumer)
            if batch is not None:
                try:
                    self.process_batch(batch, consumer, producer)
                except Stopping:
                    logger.info("stopped during a retry; the batch stays uncommitted")
                    return
            self._lag.maybe_update(consumer, self.ownership.assigned)

    def _close(self, consumer: Consumer, producer: Producer) -> None:
        remaining = producer.flush(self.settings.shutdown_timeout_s / 2)
        if remaining:
            logger.warning("unflushed records at close count=%d", remaining)
        self._close_consumer(consumer)
        self._consumer = None
        self._routes.producer = None
        if self._owns_pipeline and self._pipeline is not None:
            self._pipeline.close()
        self.metrics.set_assigned(0)
        logger.info("worker stopped worker=%d", self.index)

    def _close_consumer(self, consumer: Consumer) -> None:
        """``close()`` leaves the group (a static member does not: it is expected back).
        It can wait for the group's rebalance to complete (while the group waits out a
        dead member, librdkafka finishes neither the pending commits nor the leave), so
        it runs in a thread of its own, waited for a bounded time: a graceful stop must
        not depend on a rebalance completing (the group then drops this member when its
        session times out)."""
        closer = threading.Thread(target=consumer.close, name="consumer-close", daemon=True)
        closer.start()
        closer.join(self.settings.shutdown_timeout_s * CLOSE_SHARE)
        if closer.is_alive():
            logger.warning(
                "consumer close waits for the group's rebalance, leaving without it worker=%d",
                self.index,
            )

    # --- fetching ---------------------------------------------------------------------
    def _fetch(self, consumer: Consumer) -> Batch | None:
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
        msgs = self._owned(consumer, got)
        if not msgs:
            return None
        return Batch(msgs, stamp_epochs(msgs, self.ownership.epoch))

    def _consume(self, consumer: Consumer, count: int, timeout_s: float) -> list[Fetched]:
        # after consume(): its rebalance callbacks have run, so this is the epoch they left
        return self.ownership.stamp(consumer.consume(num_messages=count, timeout=timeout_s))

    def _owned(self, consumer: Consumer, fetched: list[Fetched]) -> list[Message]:
        """Drop messages whose partition was revoked (or revoked and re-assigned) after
        ``consume()`` returned them: the partition's current owner reads them again."""
        keep, dropped = self.ownership.split(fetched)
        if dropped:
            count = sum(len(v) for v in dropped.values())
            self.metrics.dropped_revoked.inc(count)
            logger.info(
                "dropped messages of partitions revoked during the fetch worker=%d count=%d",
                self.index,
                count,
            )
            reseek(consumer, self.ownership.reseek_targets(dropped, keep))
        return keep

    # --- one batch --------------------------------------------------------------------
    def process_batch(self, batch: Batch, consumer: Consumer, producer: Producer) -> bool:
        """Results for the batch, delivered, then its offsets committed. False when the
        batch was given back (an aborted transaction: its partitions were rewound)."""
        ids = batch.ids
        plan = self.journal.plan(ids)
        if plan.one_at_a_time and len(batch.msgs) > 1:
            logger.warning(
                "running a batch one message at a time: the worker died on it before "
                "worker=%d messages=%d",
                self.index,
                len(batch.msgs),
            )
            ran = one_at_a_time(
                batch.msgs, lambda m: self._process_alone(m, batch, consumer, producer)
            )
            if ran < len(batch.msgs):  # given back: the messages not run are read again
                self._rewind(batch.msgs[ran:], consumer)
                return False
            return True
        self.journal.note(ids, self.book.unconfirmed)
        batch.items = self._parse(batch.msgs)
        if not batch.items:
            self.journal.done(ids)
            return True
        self.metrics.batch_size.observe(len(batch.items))
        with tracing().batch(batch.items, self.settings.consumer_group) as trace:
            batch.trace = trace
            batch.results = self._results(batch.items, plan.doomed, trace.stages)
            started = time.perf_counter()
            if not self._deliver_and_commit(batch, consumer, producer):
                self.journal.done(ids)  # given back (rewound), not a death
                return False
        self.journal.done(ids)
        self.metrics.observe_produce(time.perf_counter() - started, len(batch.items))
        for result in batch.results:
            self.metrics.observe_result(result)
        return True

    def _process_alone(
        self, msg: Message, batch: Batch, consumer: Consumer, producer: Producer
    ) -> bool:
        """One message of a batch the worker died on; its commit is waited for, since the
        next message may kill the worker again (and an unfinished commit would re-deliver
        this one)."""
        alone = Batch([msg], dict(batch.epochs), suspect=True)
        return self.process_batch(alone, consumer, producer)

    def _deliver_and_commit(self, batch: Batch, consumer: Consumer, producer: Producer) -> bool:
        if self.exactly_once:
            return self._deliver_transaction(batch, consumer)
        self._deliver(batch, producer)
        self._commit_batch(batch, consumer)
        return True

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
                delay = self._policy.delay_s(attempt)
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
                    reply_partitions=self._routes.partitions,
                )
            )
        return items

    def _consume_error(self, err: KafkaError) -> None:
        if err.fatal() or err.code() == KafkaError._FATAL:
            raise ConsumerFenced(err)  # this consumer instance is done

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
        recovery = BatchRecovery(
            functools.partial(self._run_pipeline, stages=stages),
            self._policy,
            self._stop.wait,
            on_retry=self.metrics.retries.inc,
            on_quarantine=self.metrics.quarantined.labels("error").inc,
        )
        ran = iter(recovery.run(jobs))  # ModelError, Stopping propagate
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

    def _run_pipeline(self, jobs: Sequence[Any], stages: StageLog | None) -> list[dict[str, Any]]:
        assert self._pipeline is not None
        with self.watchdog.guard():
            return self._pipeline.run(jobs, stages)

    @staticmethod
    def _expired(item: Intake) -> dict[str, Any]:
        now = int(time.time() * 1000)
        queued = 0.0 if item.queue_start_ms is None else float(max(now - item.queue_start_ms, 0))
        return expired_record(
            item.request_id, item.source, deadline_ms=item.deadline_ms, queue_ms=queued
        )

    # --- output records -----------------------------------------------------------------
    def _records(self, batch: Batch) -> list[OutRecord]:
        return batch_records(
            batch.items,
            batch.results,
            self._result_codec,
            self._out,
            trace_headers=batch.trace.headers,
            dlq_caps=batch.dlq_caps,
        )

    def _absorb(self, batch: Batch, tracker: DeliveryTracker) -> None:
        absorb(
            batch.items,
            batch.results,
            tracker.failures,
            batch.dlq_caps,
            on_truncated=self.metrics.dlq_truncated.inc,
        )

    def _log_outcomes(self, batch: Batch) -> None:
        for item, result in zip(batch.items, batch.results, strict=True):
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

    # --- at-least-once: delivery and offsets --------------------------------------------
    def _deliver(self, batch: Batch, producer: Producer) -> None:
        """Produce and wait; records refused for good are rebuilt and sent once more."""
        delivered: set[tuple[int, str]] = set()
        for _round in range(DELIVERY_ROUNDS):
            records = [r for r in self._records(batch) if (r.item, r.kind) not in delivered]
            tracker = DeliveryTracker()
            produce_all(producer, records, tracker)
            wait_delivered(producer, tracker, DELIVERY_TIMEOUT_S)
            failed = {(f.record.item, f.record.kind) for f in tracker.failures}
            delivered |= {(r.item, r.kind) for r in records} - failed
            if not tracker.failures:
                self._log_outcomes(batch)
                return
            self._absorb(batch, tracker)
        raise DeliveryError(f"records still refused after {DELIVERY_ROUNDS} rounds")

    def _commit_batch(self, batch: Batch, consumer: Consumer) -> None:
        """Store the batch's offsets and commit them at once, asynchronously unless the
        batch is a suspect's: a kill then re-delivers about the batch in hand (not 5 s of
        auto-commit interval), and a broker outage never blocks the worker in a commit
        (the next commit, or the one on revoke or at close, covers a failed one)."""
        nxt = next_offsets(batch.items)
        offsets = as_partitions(nxt)
        try:
            consumer.store_offsets(offsets=offsets)
            if batch.suspect:
                consumer.commit(offsets=offsets, asynchronous=False)
            else:
                self._commit_async(consumer, nxt)
        except KafkaException as exc:  # e.g. the partition was lost meanwhile
            logger.warning("storing or committing offsets failed error=%s", exc)
            return
        where = (((i.topic, i.partition), i.offset) for i in batch.items)
        self.book.committed(nxt, confirmed=batch.suspect, first=first_offsets(where))
        self.metrics.uncommitted.set(self.book.uncommitted())

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        failed = err is not None and err.code() != KafkaError._NO_OFFSET
        self.book.answered(not failed)
        if failed:
            assert err is not None
            self.metrics.commit_failures.inc()
            logger.warning("commit failed (the next commit covers it) error=%s", err.str())
        else:
            self.book.confirm(
                ((tp.topic, tp.partition), tp.offset) for tp in partitions if tp.error is None
            )
        self.metrics.uncommitted.set(self.book.uncommitted())

    def _commit_async(self, consumer: Consumer, offsets: dict[tuple[str, int], int]) -> None:
        consumer.commit(offsets=as_partitions(offsets), asynchronous=True)
        self.book.sent(time.monotonic())

    def _hold_back(self, consumer: Consumer) -> None:
        """Pause fetching while too much delivered work awaits a confirmed commit (the
        group is waiting out a dead member, say), re-sending a failed commit meanwhile;
        resume once commits are confirmed again or the partitions have moved."""
        own = self.ownership
        if self.book.holding():
            newly = own.assigned - own.paused
            if newly:
                if not own.paused:
                    self.metrics.commit_holds.inc()
                    logger.warning(
                        "offset commits unconfirmed, pausing fetch worker=%d uncommitted=%d "
                        "bound=%d",
                        self.index,
                        self.book.uncommitted(),
                        self.book.max_uncommitted,
                    )
                self._pause(consumer, newly)
            again = self.book.recommit()
            if again:
                self._try(lambda: self._commit_async(consumer, again), "re-commit")
        elif own.paused:
            paused = own.paused & own.assigned
            own.paused.clear()
            self._try(lambda: consumer.resume(as_partitions(dict.fromkeys(paused, 0))), "resume")
            logger.info("offset commits confirmed, fetching again worker=%d", self.index)
        self.metrics.fetch_paused.set(1 if own.paused else 0)

    def _pause(self, consumer: Consumer, keys: set[tuple[str, int]]) -> None:
        if self._try(lambda: consumer.pause(as_partitions(dict.fromkeys(keys, 0))), "pause"):
            self.ownership.paused |= keys

    @staticmethod
    def _try(call: Any, what: str) -> bool:
        try:
            call()
        except KafkaException as exc:  # e.g. a partition lost meanwhile
            logger.warning("%s failed error=%s", what, exc)
            return False
        return True

    def _resume_delivered(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions a dead predecessor (this identity) had delivered results for, with the
        commit still in flight when it died: commit those offsets now, never backwards, so
        the finished batch is not run and published a second time."""
        ahead = self.journal.take_delivered(keys_of(partitions))
        if not ahead or self.exactly_once:
            return
        try:
            committed = committed_offsets(consumer, ahead, COMMITTED_TIMEOUT_S)
            age = None if self._note_written is None else time.time() - self._note_written
            moves = resume_moves(ahead, committed, note_age_s=age)
            if not moves:
                return
            consumer.commit(offsets=as_partitions(moves), asynchronous=False)
        except KafkaException as exc:  # the batch is re-delivered: a duplicate, not a loss
            logger.warning("committing the predecessor's delivered offsets failed error=%s", exc)
            return
        logger.info(
            "committed what the previous worker delivered before it died worker=%d offsets=%s",
            self.index,
            ",".join(f"{t}[{p}]@{o}" for (t, p), o in moves.items()),
        )

    def _final_commit(self, consumer: Consumer) -> None:
        """Commit what is delivered and not confirmed, and wait for the answer, but not
        for long: while the group waits out a dead member, no commit is answered before
        the rebalance completes, and a graceful stop must not depend on that (the batch
        is then re-delivered: a duplicate, not a loss)."""
        pending = self.book.pending()
        if self.exactly_once or not pending:
            return
        if not self._try(lambda: self._commit_async(consumer, pending), "final commit"):
            return
        self._pause(consumer, set(self.ownership.assigned))  # wait without new messages
        deadline = time.monotonic() + self.settings.shutdown_timeout_s * FINAL_COMMIT_SHARE
        while self.book.unconfirmed and time.monotonic() < deadline:
            consumer.consume(num_messages=1, timeout=0.1)  # serves the commit callback
        if self.book.unconfirmed:
            logger.warning(
                "final commit unconfirmed, leaving anyway worker=%d uncommitted=%d",
                self.index,
                self.book.uncommitted(),
            )

    # --- exactly-once -------------------------------------------------------------------
    def _deliver_transaction(self, batch: Batch, consumer: Consumer) -> bool:
        """Records and offsets in one transaction. False when the transaction had to be
        aborted for a reason that is nobody's fault (a rebalance moved the group on): the
        consumer is rewound to the batch and whoever owns its partitions next redoes it."""
        txns = self._txns
        assert txns is not None
        offsets = as_partitions(next_offsets(batch.items))
        for _round in range(DELIVERY_ROUNDS):
            tracker = DeliveryTracker()
            outcome = txns.run(
                self._records(batch), offsets, tracker, consumer.consumer_group_metadata()
            )
            if outcome is Outcome.GIVEN_BACK:
                self._rewind(batch.msgs, consumer)
                return False
            if outcome is Outcome.COMMITTED:
                self._log_outcomes(batch)
                return True
            self._absorb(batch, tracker)
        raise DeliveryError(f"records still refused after {DELIVERY_ROUNDS} transactions")

    def _rewind(self, msgs: Sequence[Message], consumer: Consumer) -> None:
        where = ((message_key(m), m.offset() or 0) for m in msgs if m.error() is None)
        rewind(consumer, first_offsets(where), self.ownership.assigned)

    # --- rebalance callbacks ----------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.ownership.assign(keys_of(partitions))
        self.metrics.set_assigned(len(self.ownership.assigned))
        logger.info("partitions assigned worker=%d partitions=%s", self.index, fmt(partitions))
        self._resume_delivered(consumer, partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        logger.info("partitions revoked worker=%d partitions=%s", self.index, fmt(partitions))
        self._commit_revoked(consumer, partitions)
        self._forget(keys_of(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        logger.warning("partitions lost worker=%d partitions=%s", self.index, fmt(partitions))
        self._forget(keys_of(partitions))

    def _commit_revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what was stored for the partitions leaving us, before the next owner starts."""
        if self.exactly_once:
            return
        offsets = self.book.for_revoke(keys_of(partitions))
        if not offsets:
            return
        if self._stop.is_set() or self.book.stalled(time.monotonic(), COMMIT_STALLED_S):
            # a synchronous commit would wait for the rebalance to complete: send it and go
            self._try(lambda: self._commit_async(consumer, offsets), "commit on revoke")
            return
        try:
            consumer.commit(offsets=as_partitions(offsets), asynchronous=False)
        except KafkaException as exc:
            logger.warning("commit on revoke failed error=%s", exc)

    def _forget(self, keys: list[tuple[str, int]]) -> None:
        self.ownership.release(keys)
        self.book.forget(keys)
        self.metrics.uncommitted.set(self.book.uncommitted())
        for topic, partition in keys:
            self.metrics.drop_lag(topic, partition)
        self.metrics.set_assigned(len(self.ownership.assigned))


def _ids(item: Intake) -> dict[str, str | None]:
    """A log line's request fields (``core.runtime.logs``)."""
    return {
        "request_id": item.request_id,
        "trace_id": trace_id_of(header_traceparent(item.headers)),
    }
