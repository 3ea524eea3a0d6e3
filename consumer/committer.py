"""At-least-once offsets on the consumer: :class:`~consumer.commits.CommitBook`'s decisions
carried out with confluent-kafka calls (commit, pause, resume, committed offsets).

The decisions (what to commit, when to hold back, what a dead predecessor left) are plain
code in :mod:`consumer.commits`; this module is the edge that talks to the consumer, as
quix-streams' ``Checkpoint`` does for its offsets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from consumer.commits import (
    CommitBook,
    as_partitions,
    committed_offsets,
    first_offsets,
    next_offsets,
    resume_moves,
)
from consumer.intake import Intake
from consumer.metrics import WorkerMetrics
from consumer.ownership import Key, Ownership

logger = logging.getLogger(__name__)

COMMIT_STALLED_S = 2.0  # an unanswered commit this old: no synchronous commit on revoke
COMMITTED_TIMEOUT_S = 10.0  # reading the group's committed offsets on assignment


def attempt(call: Callable[[], object], what: str) -> bool:
    """A consumer call that may fail because a partition moved meanwhile: logged, not raised."""
    try:
        call()
    except KafkaException as exc:
        logger.warning("%s failed error=%s", what, exc)
        return False
    return True


class Committer:
    """Stores and commits a worker's offsets; holds it back while commits go unanswered."""

    def __init__(
        self, book: CommitBook, ownership: Ownership, metrics: WorkerMetrics, index: int
    ) -> None:
        self.book = book
        self.ownership = ownership
        self.metrics = metrics
        self.index = index

    # --- per batch ----------------------------------------------------------------------
    def commit_batch(self, consumer: Consumer, items: Sequence[Intake], *, wait: bool) -> None:
        """Store the batch's offsets and commit them at once, asynchronously unless
        ``wait`` (a suspect's batch): a kill then re-delivers about the batch in hand (not
        5 s of auto-commit interval), and a broker outage never blocks the worker in a
        commit (the next commit, or the one on revoke or at close, covers a failed one)."""
        nxt = next_offsets(items)
        offsets = as_partitions(nxt)
        if not attempt(lambda: consumer.store_offsets(offsets=offsets), "storing offsets"):
            return  # e.g. the partition was lost meanwhile: its next owner redoes the batch
        if wait:
            confirmed = attempt(
                lambda: consumer.commit(offsets=offsets, asynchronous=False), "commit"
            )
        else:
            confirmed = False
            attempt(lambda: self._commit_async(consumer, nxt), "commit")
        # stored either way: a commit that failed here is covered by the next one, the
        # one on revoke or the final one
        first = first_offsets(((i.topic, i.partition), i.offset) for i in items)
        self.book.committed(nxt, confirmed=confirmed, first=first)
        self._gauge()

    def on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's ``on_commit``: a commit answered."""
        failed = err is not None and err.code() != KafkaError._NO_OFFSET
        self.book.answered(not failed)
        if err is not None and failed:
            self.metrics.commit_failures.inc()
            logger.warning("commit failed (the next commit covers it) error=%s", err.str())
        else:
            self.book.confirm(
                ((tp.topic, tp.partition), tp.offset) for tp in partitions if tp.error is None
            )
        self._gauge()

    def hold_back(self, consumer: Consumer) -> None:
        """Pause fetching while too much delivered work awaits a confirmed commit (the
        group is waiting out a dead member, say), re-sending a failed commit meanwhile;
        resume once commits are confirmed again or the partitions have moved."""
        own = self.ownership
        if self.book.holding():
            newly = own.assigned - own.paused
            if newly and not own.paused:
                self.metrics.commit_holds.inc()
                logger.warning(
                    "offset commits unconfirmed, pausing fetch worker=%d uncommitted=%d bound=%d",
                    self.index,
                    self.book.uncommitted(),
                    self.book.max_uncommitted,
                )
            self.pause(consumer, newly)
            again = self.book.recommit()
            if again:
                attempt(lambda: self._commit_async(consumer, again), "re-commit")
        else:
            back = own.resumable()
            if back:
                held = bool(own.paused)
                resume = as_partitions(dict.fromkeys(back, 0))
                if attempt(lambda: consumer.resume(resume), "resume"):
                    own.resumed(back)
                if held:
                    logger.info("offset commits confirmed, fetching again worker=%d", self.index)
        self.metrics.fetch_paused.set(1 if own.paused else 0)

    def pause(self, consumer: Consumer, keys: Collection[Key]) -> None:
        if keys and attempt(lambda: consumer.pause(as_partitions(dict.fromkeys(keys, 0))), "pause"):
            self.ownership.paused |= set(keys)

    # --- rebalances and the end ---------------------------------------------------------
    def commit_revoked(self, consumer: Consumer, keys: Sequence[Key], *, stopping: bool) -> None:
        """Commit what was delivered for the partitions leaving us, before the next owner
        starts: synchronously while commits are answered; when stopping, or while commits
        stall, a synchronous commit would wait for the rebalance to complete, so it is
        sent and not waited for."""
        offsets = self.book.for_revoke(keys)
        if not offsets:
            return
        if stopping or self.book.stalled(time.monotonic(), COMMIT_STALLED_S):
            attempt(lambda: self._commit_async(consumer, offsets), "commit on revoke")
            return
        attempt(
            lambda: consumer.commit(offsets=as_partitions(offsets), asynchronous=False),
            "commit on revoke",
        )

    def final_commit(self, consumer: Consumer, wait_s: float) -> None:
        """Commit what is delivered and not confirmed, and wait for the answer, but at most
        ``wait_s``: while the group waits out a dead member no commit is answered before
        the rebalance completes, and a graceful stop must not depend on that (what stays
        unconfirmed is re-delivered: a duplicate, not a loss)."""
        pending = self.book.pending()
        if not pending or not attempt(
            lambda: self._commit_async(consumer, pending), "final commit"
        ):
            return
        self.pause(consumer, self.ownership.assigned - self.ownership.paused)  # no new messages
        deadline = time.monotonic() + wait_s
        while self.book.unconfirmed and time.monotonic() < deadline:
            consumer.consume(num_messages=1, timeout=0.1)  # serves the commit callback
        if self.book.unconfirmed:
            logger.warning(
                "final commit unconfirmed, leaving anyway worker=%d uncommitted=%d",
                self.index,
                self.book.uncommitted(),
            )

    def resume_delivered(
        self, consumer: Consumer, ahead: Mapping[Key, int], note_age_s: float | None
    ) -> None:
        """Partitions a dead predecessor (this identity) had delivered results for, with the
        commit still in flight when it died: commit those offsets now (by
        :func:`~consumer.commits.resume_moves`' rule), so the finished batch is not run and
        published a second time."""
        if not ahead:
            return
        try:
            committed = committed_offsets(consumer, ahead, COMMITTED_TIMEOUT_S)
            moves = resume_moves(ahead, committed, note_age_s=note_age_s)
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

    def forget(self, keys: Sequence[Key]) -> None:
        self.book.forget(keys)
        self._gauge()

    def _commit_async(self, consumer: Consumer, offsets: Mapping[Key, int]) -> None:
        consumer.commit(offsets=as_partitions(offsets), asynchronous=True)
        self.book.sent(time.monotonic())

    def _gauge(self) -> None:
        self.metrics.uncommitted.set(self.book.uncommitted())
