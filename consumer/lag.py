"""Consumer lag per owned partition (high watermark minus position), every LAG_INTERVAL_S."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection

from confluent_kafka import Consumer, KafkaException, TopicPartition

from consumer.metrics import WorkerMetrics
from consumer.ownership import Key

logger = logging.getLogger(__name__)

LAG_INTERVAL_S = 5.0


class LagReporter:
    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics
        self._last = 0.0

    def maybe_update(self, consumer: Consumer, assigned: Collection[Key]) -> None:
        now = time.monotonic()
        if now - self._last < LAG_INTERVAL_S or not assigned:
            return
        self._last = now
        try:
            positions = consumer.position([TopicPartition(t, p) for t, p in assigned])
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
