"""At-least-once decisions (consumer.commits): what to commit when, and resuming after a death."""

from __future__ import annotations

from consumer.commits import CommitBook, resume_moves

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
    assert resume_moves(ahead, {P0: 7, P1: 9}) == {P0: 10}
    assert resume_moves(ahead, {P0: 10}) == {}
