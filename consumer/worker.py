"""The micro-batching detection worker: ``qr.images`` in, one ``DetectionResult`` per image out.

One loop, one batch at a time::

    consume(max_batch, max_wait) → parse → Pipeline.run (decode pool, one ONNX run, NMS,
    payloads) → produce results (+ reply partition, + DLQ copies) → delivered? → store offsets

Offsets are stored only after every record of the batch is acknowledged (at-least-once);
in ``exactly_once`` mode the records and the offsets commit in one transaction. Because a
batch is finished before the next ``consume()`` call, a rebalance (served inside
``consume()``) never sees a half-done batch. Bad input becomes an ``ERROR`` result plus a
DLQ copy; a model or broker failure raises, so the process exits non-zero and its
supervisor restarts it from the last committed offsets.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from consumer.intake import Intake, parse_message
from consumer.metrics import WorkerMetrics
from consumer.outputs import DeliveryError, DeliveryTracker, OutRecord, produce_all, wait_delivered
from core.images import ImageLimits
from core.kafka import avro_codec, consumer_config, producer_config
from core.pipeline import Pipeline
from core.results import error_record, expired_record
from core.settings import Settings
from core.telemetry import BatchTrace, StageLog, header_traceparent, trace_id_of, tracing
from schemas import names

logger = logging.getLogger(__name__)

LAG_INTERVAL_S = 5.0
IDLE_POLL_S = 0.5  # also how quickly an idle worker notices stop()
DELIVERY_TIMEOUT_S = 120.0
TXN_TIMEOUT_S = 30.0
TXN_COMMIT_TRIES = 5


def load_pipeline(settings: Settings) -> tuple[Pipeline, dict[str, Any]]:
    """The detector and pipeline, plus the model facts the metrics publish."""
    from core.detector import Detector

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
    ) -> None:
        self.settings = settings
        self.index = index
        self.metrics = metrics or WorkerMetrics(index)
        self.exactly_once = settings.processing_guarantee == "exactly_once"
        self._pipeline = pipeline
        self._owns_pipeline = False
        self._stop = threading.Event()
        self._running = False
        self._assigned: set[tuple[str, int]] = set()
        self._stored: dict[tuple[str, int], int] = {}
        self._limits = ImageLimits.from_settings(settings)
        self._request_codec = avro_codec(settings, "ImageRequest")
        self._result_codec = avro_codec(settings, "DetectionResult")
        self._consumer: Consumer | None = None
        self._last_lag = 0.0

    # --- lifecycle --------------------------------------------------------------------
    def stop(self) -> None:
        """Stop fetching; the batch in hand is finished, delivered and committed."""
        self._stop.set()

    @property
    def live(self) -> bool:
        return not self._stop.is_set()

    @property
    def transactional_id(self) -> str:
        return f"{self.settings.consumer_group}-{socket.gethostname()}-{self.index}"

    def run(self) -> None:
        """Consume until stopped. Raises on a model, broker or delivery failure."""
        if self._pipeline is None:
            self._pipeline, facts = load_pipeline(self.settings)
            self._owns_pipeline = True
            self.metrics.set_model(facts)
        elif not self.metrics.model_loaded:
            self.metrics.set_model({"name": "injected"})
        consumer = Consumer(self._consumer_config())
        producer = Producer(self._producer_config())
        self._consumer = consumer
        try:
            if self.exactly_once:
                producer.init_transactions(TXN_TIMEOUT_S)
            consumer.subscribe(
                [self.settings.topic_images],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            logger.info(
                "worker started worker=%d group=%s topic=%s guarantee=%s max_batch=%d "
                "max_wait_ms=%d",
                self.index,
                self.settings.consumer_group,
                self.settings.topic_images,
                self.settings.processing_guarantee,
                self.settings.max_batch,
                self.settings.max_wait_ms,
            )
            self._loop(consumer, producer)
            self._final_commit(consumer)
        finally:
            self._close(consumer, producer)

    def _loop(self, consumer: Consumer, producer: Producer) -> None:
        while not self._stop.is_set():
            msgs = self._fetch(consumer)
            if msgs:
                self.process_batch(msgs, consumer, producer)
            self._maybe_update_lag(consumer)

    def _fetch(self, consumer: Consumer) -> list[Message]:
        """One micro-batch: wait (up to IDLE_POLL_S) for a first message, then give the rest
        of the batch at most ``max_wait_ms`` to arrive.

        Same bound as ``consume(max_batch, max_wait)``, but an idle worker sleeps in
        librdkafka instead of waking every ``max_wait_ms`` (or spinning when it is 0).
        """
        msgs = consumer.consume(num_messages=1, timeout=IDLE_POLL_S)
        if msgs and self.settings.max_batch > 1:
            msgs += consumer.consume(
                num_messages=self.settings.max_batch - 1,
                timeout=self.settings.max_wait_ms / 1000.0,
            )
        return msgs

    def _close(self, consumer: Consumer, producer: Producer) -> None:
        remaining = producer.flush(self.settings.shutdown_timeout_s / 2)
        if remaining:
            logger.warning("unflushed records at close count=%d", remaining)
        consumer.close()  # leaves the group; commits stored offsets (auto commit)
        self._consumer = None
        if self._owns_pipeline and self._pipeline is not None:
            self._pipeline.close()
        self.metrics.set_assigned(0)
        logger.info("worker stopped worker=%d", self.index)

    # --- one batch --------------------------------------------------------------------
    def process_batch(
        self, msgs: Sequence[Message], consumer: Consumer, producer: Producer
    ) -> None:
        items = self._parse(msgs)
        if not items:
            return
        self.metrics.batch_size.observe(len(items))
        with tracing().batch(items, self.settings.consumer_group) as trace:
            results = self._results(items, trace.stages)
            records = self._records(items, results, trace)
            started = time.perf_counter()
            if self.exactly_once:
                self._deliver_transaction(records, items, consumer, producer)
            else:
                self._deliver(records, producer)
                self._store_offsets(items, consumer)
        self.metrics.observe_produce(time.perf_counter() - started, len(items))
        for result in results:
            self.metrics.observe_result(result)

    def _parse(self, msgs: Sequence[Message]) -> list[Intake]:
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
                )
            )
        return items

    def _consume_error(self, err: KafkaError) -> None:
        if err.fatal():
            raise KafkaException(err)
        if err.code() != KafkaError._PARTITION_EOF:
            logger.warning("consume error code=%s error=%s", err.name(), err.str())

    def _results(self, items: list[Intake], stages: StageLog | None) -> list[dict[str, Any]]:
        """One DetectionResult per item, same order; the model runs once for the batch."""
        assert self._pipeline is not None
        jobs = [item.job for item in items if item.job is not None]
        ran = iter(self._pipeline.run(jobs, stages) if jobs else [])  # ModelError propagates
        results: list[dict[str, Any]] = []
        for item in items:
            if item.error is not None:
                results.append(error_record(item.request_id, item.source, item.error))
            elif item.expired:
                results.append(self._expired(item))
            else:
                results.append(next(ran))
        return results

    @staticmethod
    def _expired(item: Intake) -> dict[str, Any]:
        now = int(time.time() * 1000)
        queued = 0.0 if item.queue_start_ms is None else float(max(now - item.queue_start_ms, 0))
        return expired_record(
            item.request_id, item.source, deadline_ms=item.deadline_ms, queue_ms=queued
        )

    def _records(
        self, items: list[Intake], results: list[dict[str, Any]], trace: BatchTrace
    ) -> list[OutRecord]:
        records: list[OutRecord] = []
        for item, result in zip(items, results, strict=True):
            records.extend(self._result_records(item, result, trace))
            if result.get("status") == names.STATUS_ERROR:
                records.append(self._dlq_record(item, result))
                logger.warning(
                    "bad input request_id=%s %s code=%s message=%s",
                    item.request_id,
                    item.where,
                    (result.get("error") or {}).get("code"),
                    (result.get("error") or {}).get("message"),
                    extra=_ids(item),
                )
            elif result.get("status") == names.STATUS_EXPIRED:
                logger.info(
                    "expired request_id=%s %s", item.request_id, item.where, extra=_ids(item)
                )
        return records

    def _result_records(
        self, item: Intake, result: dict[str, Any], trace: BatchTrace
    ) -> list[OutRecord]:
        key = item.request_id.encode("utf-8")
        topics: list[tuple[str, int | None]] = [(self.settings.topic_detections, None)]
        if item.reply_topic:
            topics.append((item.reply_topic, item.reply_partition))
        return [
            OutRecord(
                topic,
                key,
                self._result_codec.encode(result, topic),
                [(names.H_CORRELATION_ID, key), *trace.headers(item, result, topic)],
                partition,
            )
            for topic, partition in topics
        ]

    def _dlq_record(self, item: Intake, result: dict[str, Any]) -> OutRecord:
        error = result.get("error") or {}
        headers = [
            *item.headers,
            (names.H_ERROR_CODE, str(error.get("code", "")).encode()),
            (names.H_ERROR_MESSAGE, str(error.get("message", "")).encode("utf-8", "replace")),
            (names.H_ERROR_OFFSET, str(item.offset).encode()),
            (names.H_ERROR_PARTITION, str(item.partition).encode()),
            (names.H_ERROR_TOPIC, item.topic.encode()),
        ]
        self.metrics.dlq.labels(str(error.get("code", ""))).inc()
        return OutRecord(self.settings.topic_dlq, item.key, item.value, headers)

    # --- delivery and offsets ---------------------------------------------------------
    def _deliver(self, records: list[OutRecord], producer: Producer) -> None:
        tracker = DeliveryTracker()
        produce_all(producer, records, tracker)
        wait_delivered(producer, tracker, DELIVERY_TIMEOUT_S)

    def _store_offsets(self, items: list[Intake], consumer: Consumer) -> None:
        nxt = next_offsets(items)
        offsets = [TopicPartition(t, p, o) for (t, p), o in nxt.items()]
        try:
            consumer.store_offsets(offsets=offsets)
        except KafkaException as exc:  # e.g. the partition was lost meanwhile
            logger.warning("store_offsets failed error=%s", exc)
            return
        self._stored.update(nxt)

    def _deliver_transaction(
        self,
        records: list[OutRecord],
        items: list[Intake],
        consumer: Consumer,
        producer: Producer,
    ) -> None:
        tracker = DeliveryTracker()
        producer.begin_transaction()
        try:
            produce_all(producer, records, tracker)
            parts = [TopicPartition(t, p) for (t, p) in next_offsets(items)]
            positions = consumer.position(parts)
            producer.send_offsets_to_transaction(
                positions, consumer.consumer_group_metadata(), TXN_TIMEOUT_S
            )
            _commit_transaction(producer)
            if tracker.failures:
                raise DeliveryError(f"result not delivered: {tracker.failures[0]}")
        except KafkaException as exc:
            logger.error("transaction failed, aborting error=%s", exc)
            try:
                producer.abort_transaction(TXN_TIMEOUT_S)
            except KafkaException as abort_exc:
                logger.error("abort_transaction failed error=%s", abort_exc)
            raise DeliveryError(f"transaction of {len(items)} result(s) failed: {exc}") from exc

    def _final_commit(self, consumer: Consumer) -> None:
        if self.exactly_once or not self._stored:
            return
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                logger.warning("final commit failed error=%s", exc)

    # --- rebalance callbacks ----------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned.update((tp.topic, tp.partition) for tp in partitions)
        self.metrics.set_assigned(len(self._assigned))
        logger.info("partitions assigned worker=%d partitions=%s", self.index, _fmt(partitions))

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
        for tp in partitions:
            self._assigned.discard((tp.topic, tp.partition))
            self._stored.pop((tp.topic, tp.partition), None)
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
        extra: dict[str, Any] = {"partition.assignment.strategy": "cooperative-sticky"}
        if self.exactly_once:
            extra.update({"enable.auto.commit": False, "isolation.level": "read_committed"})
        else:
            extra["enable.auto.commit"] = True  # commits what store_offsets() stored
        return consumer_config(
            self.settings, self.settings.consumer_group, role=f"worker-{self.index}", **extra
        )

    def _producer_config(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.exactly_once:
            extra["transactional.id"] = self.transactional_id
        return producer_config(self.settings, role=f"worker-{self.index}", **extra)


def next_offsets(items: Sequence[Intake]) -> dict[tuple[str, int], int]:
    """Per partition, the offset to commit after this batch: the highest seen + 1."""
    nxt: dict[tuple[str, int], int] = {}
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
    """A log line's request fields (``core.logs``)."""
    return {
        "request_id": item.request_id,
        "trace_id": trace_id_of(header_traceparent(item.headers)),
    }


def _fmt(partitions: list[TopicPartition]) -> str:
    return ",".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "-"
