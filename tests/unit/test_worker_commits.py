"""At-least-once decisions (consumer.commits): what to commit when, and resuming after a death."""

from __future__ import annotations

from confluent_kafka import OFFSET_INVALID

from consumer.commits import CommitBook, resume_moves
from consumer.journal import DELIVERED_FRESH_S

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
