"""The replies topic's partition count, which bounds the reply partitions a request may name."""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaException, Producer

logger = logging.getLogger(__name__)

REPLY_METADATA_REFRESH_S = 10.0


class ReplyRoutes:
    """Partitions of the replies topic, from metadata; refreshed (at most every
    REPLY_METADATA_REFRESH_S) when a request names one beyond the known count."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.producer: Producer | None = None
        self._count: int | None = None
        self._checked = -REPLY_METADATA_REFRESH_S

    def partitions(self, asked: int) -> int:
        now = time.monotonic()
        stale = self._count is None or asked >= self._count
        if stale and now - self._checked >= REPLY_METADATA_REFRESH_S:
            self._checked = now
            self._refresh()
        if self._count is None:  # metadata unknown (broker away): let produce decide
            return asked + 1
        return self._count

    def _refresh(self) -> None:
        if self.producer is None:
            return
        try:
            meta = self.producer.list_topics(self.topic, timeout=5).topics.get(self.topic)
        except KafkaException as exc:
            logger.warning("replies topic metadata unavailable topic=%s error=%s", self.topic, exc)
            return
        if meta is None or meta.error is not None:
            self._count = 0
            logger.warning(
                "replies topic missing topic=%s error=%s", self.topic, meta and meta.error
            )
            return
        self._count = len(meta.partitions)
