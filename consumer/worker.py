"""The micro-batching detection worker: ``qr.images`` in, one ``DetectionResult`` per image out.

One loop, one batch at a time::

    fetch → parse → Pipeline.run (decode pool, one ONNX run, NMS, payloads) → produce
    results (+ reply partition, + DLQ copies) → delivered? → commit the batch's offsets

The worker is that loop, wiring small parts whose decisions are plain code with unit
tests that start no broker: which partitions it owns and whether a fetched message is
still its own (:mod:`consumer.ownership`), the per-batch state (:mod:`consumer.batch`),
parsing and the pipeline run (:mod:`consumer.processing`), the records a batch produces
and what to do with those the broker refuses (:mod:`consumer.outputs`,
:mod:`consumer.delivery`), what to commit when, when to hold back and what a dead
predecessor left to commit (:mod:`consumer.commits`, carried out on the consumer by
:mod:`consumer.committer`), and the exactly-once transactions
(:mod:`consumer.transactions`). The confluent-kafka calls stay at those edges.

**Fetch without idle wait.** A blocking ``consume`` for the first message, then whatever
librdkafka has already fetched (``consume(max_batch - 1, timeout=0)``); only when images
were already waiting does the worker top the batch up for at most
``QRSIGHT_MAX_WAIT_MS``. A lone image runs at once; under load batches fill by themselves
(continuous batching). Rebalance callbacks run inside ``consume()``, so a fetch keeps only
messages of partitions still owned, by the same assignment, when it ends.

**Offsets.** At-least-once: after every record of a batch is acknowledged the worker
commits the batch's offsets (asynchronously: one OffsetCommit per batch, never blocking
the loop during an outage), so a kill re-delivers about the batch in hand; while commits
go unanswered (the group waiting out a dead member) it stops running ahead of them. Exactly-once:
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

import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from consumer.batch import Batch, one_at_a_time, stamp_epochs
from consumer.clients import worker_consumer_config, worker_producer_config
from consumer.commits import CommitBook, first_offsets, next_offsets, note_written_at
from consumer.committer import Committer
from consumer.delivery import Delivery
from consumer.journal import CrashJournal, journal_path
from consumer.lag import LagReporter
from consumer.metrics import WorkerMetrics
from consumer.outputs import OutputConfig
from consumer.ownership import (
    Fetched,
    Key,
    Ownership,
    fmt,
    keys_of,
    message_key,
    reseek,
    split_owned,
)
from consumer.processing import ConsumerFenced, Processing, refused_write
from consumer.recovery import Stopping
from consumer.routes import ReplyRoutes
from consumer.transactions import Transactions, rewind
from consumer.watchdog import UNGUARDED, HangWatchdog
from core.runtime.busy import BusyBoard
from core.runtime.errors import ConfigError
from core.runtime.kafka import avro_codec, message_limits
from core.runtime.settings import Settings
from core.runtime.telemetry import tracing
from core.vision.pipeline import Pipeline

__all__ = ["ConsumerFenced", "Fetched", "Worker", "load_pipeline", "next_offsets", "split_owned"]

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.5  # also how quickly an idle worker notices stop()
HELD_POLL_S = 0.05
REBUILD_INTERVAL_S = 60.0
# At-least-once: unless QRSIGHT_MAX_UNCOMMITTED says otherwise, fetching pauses once more
# than this many batches of delivered messages await a confirmed commit
# (consumer.commits.CommitBook.holding)
UNCOMMITTED_BATCHES = 2
FINAL_COMMIT_SHARE = 0.25  # of QRSIGHT_SHUTDOWN_TIMEOUT_S: the final commit or the open transaction
CLOSE_SHARE = 0.4  # of QRSIGHT_SHUTDOWN_TIMEOUT_S, waiting for the consumer to leave the group


def uncommitted_limit(settings: Settings) -> int:
    """Delivered messages awaiting a confirmed commit past which the worker pauses fetching:
    ``QRSIGHT_MAX_UNCOMMITTED``, else two batches (0: never)."""
    if settings.max_uncommitted is not None:
        return settings.max_uncommitted
    return UNCOMMITTED_BATCHES * settings.max_batch


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
        self.index = index
        self.metrics = metrics or WorkerMetrics(index)
        self.exactly_once = settings.processing_guarantee == "exactly_once"
        self._stop = threading.Event()
        path = journal_path(settings.state_dir, settings.consumer_group, self.identity, index)
        self.journal = CrashJournal(path, settings.crash_limit)
        self.ownership = Ownership()
        self.book = CommitBook(max_uncommitted=uncommitted_limit(settings))
        self.commits = Committer(self.book, self.ownership, self.metrics, index)
        self._routes = ReplyRoutes(settings.topic_replies)
        self.processing = Processing(
            settings,
            avro_codec(settings, "ImageRequest"),
            self.journal,
            self.metrics,
            self._stop,
            reply_partitions=self._routes.partitions,
            watchdog=watchdog,  # armed around each pipeline run (consumer.watchdog)
        )
        self.processing.pipeline = pipeline
        self._owns_pipeline = False
        out = OutputConfig(
            settings.topic_detections,
            settings.topic_dlq,
            message_limits(settings).max_message_bytes,
        )
        self.delivery = Delivery(avro_codec(settings, "DetectionResult"), out, self.metrics)
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
        failing = True
        try:
            if self.exactly_once:
                self._txns = Transactions(
                    producer,
                    on_given_back=self.metrics.transactions_aborted.inc,
                    stop=self._stop,
                    stop_wait_s=self.settings.shutdown_timeout_s * FINAL_COMMIT_SHARE,
                )
                self._txns.init()
            self._log_start()
            while True:
                try:
                    self._loop(consumer, producer)
                    break
                except ConsumerFenced as exc:
                    consumer = self._rebuild(consumer, exc)
            if not self.exactly_once:
                wait_s = self.settings.shutdown_timeout_s * FINAL_COMMIT_SHARE
                self.commits.final_commit(consumer, wait_s)
            failing = False
        except KafkaException as exc:
            refused = self._refused(exc)
            if refused is None:
                raise
            raise refused from exc
        finally:
            self.journal.clear()  # leaving on our own: nothing in hand killed us
            self._close(consumer, producer, failing=failing)

    def _load_model(self) -> None:
        if self.processing.pipeline is None:
            self.processing.pipeline, facts = load_pipeline(self.settings)
            # a solo session (QRSIGHT_ORT_SOLO_THREADS) takes the host's other workers'
            # cores only while they are idle: this worker's slot of the host's busy board
            detector = self.processing.pipeline.detector
            if detector.solo_session is not None:
                detector.busy = BusyBoard(self.settings.consumer_group, self.index)
                self.metrics.watch_solo(lambda: (detector.lone_runs, detector.solo_runs))
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
                on_commit=self.commits.on_commit,
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
                self.commits.hold_back(consumer)
            batch = self._fetch(consumer)
            if batch is not None:
                try:
                    self.process_batch(batch, consumer, producer)
                except Stopping:
                    logger.info("stopped during a retry; the batch stays uncommitted")
                    return
            self._lag.maybe_update(consumer, self.ownership.assigned)

    def _close(self, consumer: Consumer, producer: Producer, *, failing: bool) -> None:
        """Flush, leave the group, free the model. A producer that librdkafka declared
        fatally failed raises from ``flush``: the consumer is closed all the same (what
        the producer held stays uncommitted, read again), and when the run is already
        failing its error is the one reported, this one logged."""
        flush_error: KafkaException | None = None
        try:
            remaining = producer.flush(self.settings.shutdown_timeout_s / 2)
        except KafkaException as exc:
            flush_error, remaining = exc, len(producer)
        if remaining:
            logger.warning("unflushed records at close count=%d", remaining)
        self._close_consumer(consumer)
        self._consumer = None
        self._routes.producer = None
        if self._owns_pipeline and self.processing.pipeline is not None:
            detector = self.processing.pipeline.detector
            if detector.solo_session is not None:
                logger.info(
                    "solo session lone_batches=%d solo_runs=%d",
                    detector.lone_runs,
                    detector.solo_runs,
                )
            self.processing.pipeline.close()
        self.metrics.set_assigned(0)
        logger.info("worker stopped worker=%d", self.index)
        if flush_error is not None:
            if failing:
                logger.error("the producer failed too error=%s", flush_error)
                return
            raise self._refused(flush_error) or flush_error

    def _refused(self, exc: KafkaException) -> ConfigError | None:
        """A refused ACL as the setting to fix, else None."""
        err = exc.args[0] if exc.args else None
        if not isinstance(err, KafkaError):
            return None
        return refused_write(err, self.settings, self.transactional_id)

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
        # held back (partitions paused): poll briefly, to resume as soon as commits answer
        first_wait = HELD_POLL_S if self.ownership.paused else IDLE_POLL_S
        got = self._consume(consumer, 1, first_wait)
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
            return self._one_at_a_time(batch, consumer, producer)
        self.journal.note(ids, self.book.unconfirmed)
        batch.items = self.processing.parse(batch.msgs)
        if not batch.items:
            self.journal.done(ids)
            return True
        self.metrics.batch_size.observe(len(batch.items))
        with tracing().batch(batch.items, self.settings.consumer_group) as trace:
            batch.trace = trace
            batch.results = self.processing.results(batch.items, plan.doomed, trace.stages)
            started = time.perf_counter()
            if not self._deliver_and_commit(batch, consumer, producer):
                self.journal.done(ids)  # given back (rewound), not a death
                return False
        self.journal.done(ids)
        self.metrics.observe_produce(time.perf_counter() - started, len(batch.items))
        for result in batch.results:
            self.metrics.observe_result(result)
        return True

    def _one_at_a_time(self, batch: Batch, consumer: Consumer, producer: Producer) -> bool:
        """A batch the worker died on, one message at a time; each message's commit is
        waited for, since the next message may kill the worker again (and an unfinished
        commit would re-deliver this one). Stops at the first message given back."""
        logger.warning(
            "running a batch one message at a time: the worker died on it before "
            "worker=%d messages=%d",
            self.index,
            len(batch.msgs),
        )

        def run_one(msg: Message) -> bool:
            alone = Batch([msg], dict(batch.epochs), suspect=True)
            return self.process_batch(alone, consumer, producer)

        ran = one_at_a_time(batch.msgs, run_one)
        if ran < len(batch.msgs):  # given back: the messages not run are read again
            self._rewind(batch.msgs[ran:], consumer)
            return False
        return True

    def _deliver_and_commit(self, batch: Batch, consumer: Consumer, producer: Producer) -> bool:
        if self._txns is not None:
            metadata = consumer.consumer_group_metadata()
            if self.delivery.in_transaction(batch, self._txns, metadata):
                return True
            self._rewind(batch.msgs, consumer)
            return False
        self.delivery.at_least_once(batch, producer)
        self.commits.commit_batch(consumer, batch.items, wait=batch.suspect)
        return True

    def _rewind(self, msgs: Sequence[Message], consumer: Consumer) -> None:
        where = ((message_key(m), m.offset() or 0) for m in msgs if m.error() is None)
        rewind(consumer, first_offsets(where), self.ownership.assigned)

    # --- rebalance callbacks ----------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.ownership.assign(keys_of(partitions))
        self.metrics.set_assigned(len(self.ownership.assigned))
        logger.info("partitions assigned worker=%d partitions=%s", self.index, fmt(partitions))
        ahead = self.journal.take_delivered(keys_of(partitions))
        if ahead and not self.exactly_once:
            age = None if self._note_written is None else time.time() - self._note_written
            self.commits.resume_delivered(consumer, ahead, age)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        logger.info("partitions revoked worker=%d partitions=%s", self.index, fmt(partitions))
        if not self.exactly_once:
            stopping = self._stop.is_set()
            self.commits.commit_revoked(consumer, keys_of(partitions), stopping=stopping)
        self._forget(keys_of(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        logger.warning("partitions lost worker=%d partitions=%s", self.index, fmt(partitions))
        self._forget(keys_of(partitions))

    def _forget(self, keys: list[Key]) -> None:
        self.ownership.release(keys)
        self.commits.forget(keys)
        for topic, partition in keys:
            self.metrics.drop_lag(topic, partition)
        self.metrics.set_assigned(len(self.ownership.assigned))
