"""At-least-once offsets: what to commit, when, and what a dead predecessor left to commit.

The worker commits a batch's offsets once every record of the batch is acknowledged,
asynchronously (one OffsetCommit per batch, never blocking the loop during an outage), so
a kill re-delivers about the batch in hand. :class:`CommitBook` keeps the offsets stored
(delivered) per partition and those committed but not yet confirmed by the broker; the
unconfirmed ones travel in the crash note (:mod:`consumer.journal`), so that a worker
restarted after a death can commit what its predecessor delivered
(:func:`resume_moves`) instead of running the finished batch again.

Plain code; :func:`committed_offsets` is the one read from the consumer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from consumer.intake import Intake
from consumer.journal import DELIVERED_FRESH_S
from consumer.ownership import Key

logger = logging.getLogger(__name__)


def next_offsets(items: Sequence[Intake]) -> dict[Key, int]:
    """Per partition, the offset to commit after this batch: the highest seen + 1."""
    nxt: dict[Key, int] = {}
    for item in items:
        key = (item.topic, item.partition)
        nxt[key] = max(nxt.get(key, 0), item.offset + 1)
    return nxt


def first_offsets(positions: Iterable[tuple[Key, int]]) -> dict[Key, int]:
    """Per partition, the lowest offset of a batch: where an aborted batch resumes."""
    first: dict[Key, int] = {}
    for key, offset in positions:
        first[key] = min(first.get(key, offset), offset)
    return first


def as_partitions(offsets: Mapping[Key, int]) -> list[TopicPartition]:
    return [TopicPartition(t, p, o) for (t, p), o in offsets.items()]


class CommitBook:
    """Offsets per partition: stored (results delivered) and committed-but-unconfirmed,
    and how much delivered work the unconfirmed commits leave in doubt.

    **Holding back.** While the group waits out a dead member's session, librdkafka
    answers none of the surviving members' commits (they fail with ILLEGAL_GENERATION
    or REBALANCE_IN_PROGRESS once the rebalance completes); a worker that kept going
    would do work that is done again if its partitions then move, or if it dies before
    the rebalance ends. So once more than ``max_uncommitted`` delivered messages await a
    confirmed commit, :meth:`holding` says to stop taking new work (the worker pauses its
    partitions and keeps polling, so callbacks and the rebalance go on) until commits are
    confirmed again or the partitions move; :meth:`recommit` re-sends what a failed
    commit left unconfirmed, since no new batch will."""

    def __init__(self, max_uncommitted: int = 0) -> None:
        self.max_uncommitted = max_uncommitted  # 0: never hold back
        self.stored: dict[Key, int] = {}
        self.unconfirmed: dict[Key, int] = {}  # committed asynchronously, not yet confirmed
        self.since: dict[Key, int] = {}  # first offset delivered since the last confirmation
        self.in_flight = 0  # asynchronous commits sent and not yet answered
        self.waiting_since: float | None = None  # when the oldest of them was sent
        self.failing = False  # the last answer was a failure

    def committed(
        self, offsets: Mapping[Key, int], *, confirmed: bool, first: Mapping[Key, int] | None = None
    ) -> None:
        """A batch's next offsets were stored and committed (``confirmed``: synchronously);
        ``first``: the batch's first offset per partition."""
        self.stored.update(offsets)
        if confirmed:
            self.confirm(offsets.items())
            return
        self.unconfirmed.update(offsets)  # noted with the next batch until confirmed
        for key, offset in (first or offsets).items():
            self.since.setdefault(key, offset)

    def sent(self, now: float) -> None:
        """An asynchronous commit went out."""
        if self.in_flight == 0:
            self.waiting_since = now
        self.in_flight += 1

    def answered(self, ok: bool) -> None:
        """librdkafka's commit callback: one asynchronous commit answered."""
        self.in_flight = max(self.in_flight - 1, 0)
        if self.in_flight == 0:
            self.waiting_since = None
        self.failing = not ok

    def confirm(self, offsets: Iterable[tuple[Key, int]]) -> None:
        """The broker confirmed these commits: what they cover is no longer in doubt."""
        for key, offset in offsets:
            if key not in self.unconfirmed:
                continue
            if offset >= self.unconfirmed[key]:
                del self.unconfirmed[key]
                self.since.pop(key, None)
            elif key in self.since:
                self.since[key] = max(self.since[key], offset)

    def uncommitted(self) -> int:
        """Delivered messages (offsets) whose commit is not confirmed."""
        return sum(
            max(offset - self.since.get(key, offset), 0) for key, offset in self.unconfirmed.items()
        )

    def holding(self) -> bool:
        return 0 < self.max_uncommitted < self.uncommitted()

    def stalled(self, now: float, after_s: float) -> bool:
        """Commits are not being answered (or the last one failed): a synchronous commit
        now could wait for a rebalance to complete."""
        waiting = self.waiting_since is not None and now - self.waiting_since > after_s
        return self.failing or waiting

    def recommit(self) -> dict[Key, int]:
        """While holding back with no commit in flight: what to commit again."""
        if not self.holding() or self.in_flight:
            return {}
        return self.pending()

    def pending(self) -> dict[Key, int]:
        """Stored offsets whose commit is not confirmed."""
        return {key: self.stored.get(key, offset) for key, offset in self.unconfirmed.items()}

    def for_revoke(self, keys: Iterable[Key]) -> dict[Key, int]:
        """What to commit for partitions leaving us, before the next owner starts: what was
        delivered and is not confirmed committed yet."""
        return {
            key: self.stored[key] for key in keys if key in self.stored and key in self.unconfirmed
        }

    def forget(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self.stored.pop(key, None)
            self.unconfirmed.pop(key, None)
            self.since.pop(key, None)


# --- resuming what a dead predecessor delivered --------------------------------------------
def resume_moves(
    ahead: Mapping[Key, int],
    committed: Mapping[Key, int],
    *,
    note_age_s: float | None,
    trust_s: float = DELIVERED_FRESH_S,
) -> dict[Key, int]:
    """The predecessor's delivered offsets to commit now that their partitions are back.

    Only where they move the group's committed offset forward (never backwards), so a
    finished batch is not run again; never where the group has no committed offset
    (negative: ``OFFSET_INVALID``, the topic re-created or the offsets deleted), since the
    note's offsets may then name messages never processed; and only while the note is
    younger than ``trust_s`` *now* (its partitions may come back hours after start-up,
    after an operator reset the group's offsets). An unknown age is not trusted."""
    if note_age_s is None or note_age_s > trust_s:
        return {}
    return {
        key: offset
        for key, offset in ahead.items()
        if key in committed and 0 <= committed[key] < offset
    }


def note_written_at(path: Path | None) -> float | None:
    """When a dead predecessor wrote its note (unix time), read before the journal
    recovers it, so the note's age can be checked when its offsets are used."""
    if path is None:
        return None
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["written"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def committed_offsets(consumer: Consumer, keys: Iterable[Key], timeout_s: float) -> dict[Key, int]:
    """The group's committed offsets of ``keys`` (partitions whose read failed are left out)."""
    committed = consumer.committed([TopicPartition(t, p) for t, p in keys], timeout=timeout_s)
    return {(tp.topic, tp.partition): tp.offset for tp in committed if tp.error is None}
