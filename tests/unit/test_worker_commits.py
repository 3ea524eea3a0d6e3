"""At-least-once decisions (consumer.commits): what to commit when, and resuming after a death."""

from __future__ import annotations

import pytest
from confluent_kafka import OFFSET_INVALID

from consumer.commits import CommitBook, resume_moves
from consumer.journal import DELIVERED_FRESH_S
from consumer.worker import uncommitted_limit
from core.runtime.settings import load_settings

TOPIC = "qr.images"
P0, P1 = (TOPIC, 0), (TOPIC, 1)


def test_an_async_commit_stays_unconfirmed_until_the_broker_confirms_it() -> None:
    book = CommitBook()
    book.committed({P0: 10, P1: 5}, confirmed=False)
    assert book.unconfirmed == {P0: 10, P1: 5}
    book.confirm([(P0, 8)])  # an older commit's confirmation covers less
    book.confirm([(P1, 5)])
    assert book.unconfirmed == {P0: 10}
    book.confirm([(P0, 10)])
    assert book.unconfirmed == {}
    assert book.stored == {P0: 10, P1: 5}


def test_revocation_during_delivery_commits_what_was_delivered_and_forgets_it() -> None:
    book = CommitBook()
    book.committed({P0: 10, P1: 5}, confirmed=False)  # delivered, its commit in flight
    # partition 1 is revoked before the commit is confirmed: the revoke-time commit
    # covers what was delivered, then the partition is forgotten
    assert book.for_revoke([P1]) == {P1: 5}
    book.forget([P1])
    assert book.unconfirmed == {P0: 10}
    # a late confirmation of the revoked partition does not bring it back
    book.confirm([(P1, 5)])
    assert P1 not in book.unconfirmed
    assert P1 not in book.stored
    assert book.for_revoke([P1]) == {}


def test_a_predecessors_offsets_move_the_committed_offset_forward_only() -> None:
    ahead = {P0: 10, P1: 5}
    assert resume_moves(ahead, {P0: 7, P1: 9}, note_age_s=1.0) == {P0: 10}
    assert resume_moves(ahead, {P0: 10}, note_age_s=1.0) == {}


def test_a_missing_committed_offset_does_not_let_the_note_skip_unprocessed_offsets() -> None:
    # committed() gives -1001 (OFFSET_INVALID): topic re-created or offsets deleted; the
    # note's offsets then name messages never processed, so it must not win
    ahead = {P0: 500, P1: 40}
    assert resume_moves(ahead, {P0: OFFSET_INVALID, P1: 12}, note_age_s=1.0) == {P1: 40}


def test_a_note_older_than_its_trust_window_when_its_partitions_come_back_is_not_applied() -> None:
    # fresh at start-up, but the partitions came back to this worker hours later
    ahead = {P0: 10}
    assert resume_moves(ahead, {P0: 3}, note_age_s=DELIVERED_FRESH_S - 1) == {P0: 10}
    assert resume_moves(ahead, {P0: 3}, note_age_s=DELIVERED_FRESH_S + 3 * 3600) == {}
    assert resume_moves(ahead, {P0: 3}, note_age_s=None) == {}, "age unknown: not trusted"


def deliver(book: CommitBook, key: tuple[str, int], first: int, count: int, now: float) -> None:
    book.committed({key: first + count}, confirmed=False, first={key: first})
    book.sent(now)


def test_unanswered_commits_hold_the_worker_back_instead_of_letting_it_run_ahead() -> None:
    # the group waits out a dead member: no commit is answered, batch after batch
    book = CommitBook(max_uncommitted=16)
    deliver(book, P0, 0, 8, now=0.0)
    deliver(book, P1, 100, 8, now=0.1)
    assert book.uncommitted() == 16 and not book.holding()
    deliver(book, P0, 8, 8, now=0.2)
    assert book.uncommitted() == 24 and book.holding()
    assert book.recommit() == {}, "commits still in flight: nothing to re-send yet"
    # the rebalance completes: every pending commit fails (ILLEGAL_GENERATION) ...
    for _ in range(3):
        book.answered(ok=False)
    assert book.stalled(now=0.3, after_s=2.0)
    # ... and no new batch will come while held: the worker re-sends what is pending
    assert book.recommit() == {P0: 16, P1: 108}
    book.sent(now=1.0)
    book.answered(ok=True)
    book.confirm([(P0, 16), (P1, 108)])
    assert book.uncommitted() == 0 and not book.holding() and not book.stalled(1.1, 2.0)


def test_partitions_that_move_while_held_release_the_hold() -> None:
    book = CommitBook(max_uncommitted=8)
    deliver(book, P0, 0, 8, now=0.0)
    deliver(book, P1, 0, 8, now=0.0)
    assert book.holding()
    book.forget([P1])  # revoked: its next owner redoes what was not confirmed
    assert book.uncommitted() == 8 and not book.holding()


def test_a_commit_unanswered_for_long_counts_as_stalled() -> None:
    book = CommitBook(max_uncommitted=0)  # 0: never hold back
    deliver(book, P0, 0, 100, now=10.0)
    assert not book.holding()
    assert not book.stalled(now=11.0, after_s=2.0)
    assert book.stalled(now=12.5, after_s=2.0), "a synchronous commit now could hang"


def test_a_partial_confirmation_shrinks_the_work_in_doubt() -> None:
    book = CommitBook(max_uncommitted=100)
    deliver(book, P0, 0, 8, now=0.0)
    deliver(book, P0, 8, 8, now=0.0)
    assert book.uncommitted() == 16
    book.confirm([(P0, 8)])  # the first batch's commit answered
    assert book.uncommitted() == 8
    assert book.pending() == {P0: 16}


@pytest.mark.parametrize(
    ("environ", "limit"),
    [
        ({}, 16),  # two batches of QRSIGHT_MAX_BATCH (8)
        ({"QRSIGHT_MAX_BATCH": "32"}, 64),
        ({"QRSIGHT_MAX_UNCOMMITTED": "100"}, 100),
        ({"QRSIGHT_MAX_UNCOMMITTED": "0"}, 0),  # never hold back
    ],
)
def test_the_pause_threshold_is_qrsight_max_uncommitted_else_two_batches(
    environ: dict[str, str], limit: int
) -> None:
    settings = load_settings(environ)
    assert uncommitted_limit(settings) == limit
    book = CommitBook(max_uncommitted=uncommitted_limit(settings))
    book.committed({P0: limit + 1}, confirmed=False, first={P0: 0})
    assert book.holding() is (limit > 0)
