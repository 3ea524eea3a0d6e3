"""Which partitions this worker owns, and whether a message it fetched is still its to process.

Rebalance callbacks run inside ``consume()``; a fetch made of several ``consume()`` calls
may therefore return messages of a partition that was revoked (or revoked and assigned
again) before the fetch ended. Every assign, revoke and loss bumps the partition's
*epoch*; a message is stamped with its partition's epoch when ``consume()`` returns it,
and it is processed only if the partition is still assigned under that same epoch.

The decisions (:class:`Ownership`, :func:`split_owned`, :meth:`Ownership.reseek_targets`)
are plain code; :func:`reseek` is the one place that talks to the consumer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaException, Message, TopicPartition

logger = logging.getLogger(__name__)

Key = tuple[str, int]  # topic, partition


def message_key(msg: Message) -> Key:
    return (msg.topic() or "", msg.partition() or 0)


@dataclass
class Fetched:
    """A message and the assignment epoch of its partition when ``consume()`` returned it."""

    msg: Message
    epoch: int


@dataclass
class Ownership:
    """The partitions assigned to this worker and their epochs (bumped on every change)."""

    assigned: set[Key] = field(default_factory=set)
    epochs: dict[Key, int] = field(default_factory=dict)
    paused: set[Key] = field(default_factory=set)  # fetching paused by the worker
    # Paused when revoked or lost: librdkafka keeps a partition's pause flag across
    # re-assignment, so such a partition comes back paused and must be resumed.
    stale_paused: set[Key] = field(default_factory=set)

    def epoch(self, key: Key) -> int:
        return self.epochs.get(key, 0)

    def stamp(self, msgs: Iterable[Message]) -> list[Fetched]:
        """Messages ``consume()`` just returned, with the epoch its callbacks left."""
        return [Fetched(m, self.epoch(message_key(m))) for m in msgs]

    def assign(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self._bump(key)
            self.assigned.add(key)

    def release(self, keys: Iterable[Key]) -> None:
        """Revoked or lost: whatever was fetched under the old epoch is no longer ours."""
        for key in keys:
            self._bump(key)
            self.assigned.discard(key)
            if key in self.paused:
                self.paused.discard(key)
                self.stale_paused.add(key)

    def resumable(self) -> set[Key]:
        """Partitions to resume once the worker no longer holds back: those it paused, and
        those that came back still paused from before they were revoked or lost."""
        return (self.paused | self.stale_paused) & self.assigned

    def resumed(self, keys: Iterable[Key]) -> None:
        done = set(keys)
        self.paused -= done
        self.stale_paused -= done

    def holds(self, key: Key, epoch: int) -> bool:
        """Still assigned under the epoch a batch saw when it was fetched."""
        return key in self.assigned and self.epoch(key) == epoch

    def split(self, fetched: Sequence[Fetched]) -> tuple[list[Message], dict[Key, list[int]]]:
        return split_owned(fetched, self.assigned, self.epochs)

    def reseek_targets(
        self, dropped: Mapping[Key, list[int]], keep: Sequence[Message]
    ) -> dict[Key, int]:
        """Partitions revoked and re-assigned during the fetch, none of whose messages were
        kept: each resumes from its first dropped offset (its committed offset, unless the
        consumer's position already ran past it)."""
        kept = {message_key(m) for m in keep}
        return {
            key: min(offsets)
            for key, offsets in dropped.items()
            if key in self.assigned and key not in kept
        }

    def _bump(self, key: Key) -> None:
        self.epochs[key] = self.epoch(key) + 1


def split_owned(
    fetched: Sequence[Fetched], assigned: set[Key], epochs: Mapping[Key, int]
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
        key = message_key(f.msg)
        if key in assigned and epochs.get(key, 0) == f.epoch:
            keep.append(f.msg)
        else:
            dropped.setdefault(key, []).append(f.msg.offset() or 0)
    return keep, dropped


def needs_reseek(position: int, first_dropped: int) -> bool:
    """Seek back only when the consumer's position already ran past a dropped message."""
    return position != OFFSET_INVALID and position > first_dropped


def reseek(consumer: Consumer, targets: Mapping[Key, int]) -> None:
    """Seek each partition back to its first dropped offset where its position is past it."""
    for (topic, partition), first in targets.items():
        try:
            (pos,) = consumer.position([TopicPartition(topic, partition)])
            if needs_reseek(pos.offset, first):
                consumer.seek(TopicPartition(topic, partition, first))
                logger.info("re-seek partition=%s[%d] offset=%d", topic, partition, first)
        except KafkaException as exc:
            logger.warning("re-seek failed partition=%s[%d] error=%s", topic, partition, exc)


def fmt(partitions: Iterable[TopicPartition]) -> str:
    return ",".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "-"


def keys_of(partitions: Iterable[TopicPartition]) -> list[Key]:
    return [(tp.topic, tp.partition) for tp in partitions]
