"""Which fetched messages a worker still owns after rebalances (consumer.ownership)."""

from __future__ import annotations

from confluent_kafka import OFFSET_INVALID, Message

from consumer.ownership import Ownership, needs_reseek

TOPIC = "qr.images"


def msg(partition: int, offset: int) -> Message:
    return Message(topic=TOPIC, partition=partition, offset=offset, value=b"x")


def test_a_rebalance_mid_batch_drops_what_was_fetched_before_it_and_reseeks_there() -> None:
    owner = Ownership()
    owner.assign([(TOPIC, 0), (TOPIC, 1)])
    first = owner.stamp([msg(0, 10), msg(1, 20), msg(1, 21)])
    # the batch's top-up consume() runs a rebalance: partition 1 revoked, then assigned back
    owner.release([(TOPIC, 1)])
    owner.assign([(TOPIC, 1)])
    later = owner.stamp([msg(0, 11)])
    keep, dropped = owner.split([*first, *later])
    assert [(m.partition(), m.offset()) for m in keep] == [(0, 10), (0, 11)]
    assert dropped == {(TOPIC, 1): [20, 21]}
    # partition 1 is ours again but none of its messages were kept: resume at 20
    assert owner.reseek_targets(dropped, keep) == {(TOPIC, 1): 20}


def test_a_partition_revoked_for_good_is_not_reseeked() -> None:
    owner = Ownership()
    owner.assign([(TOPIC, 0), (TOPIC, 1)])
    fetched = owner.stamp([msg(1, 5)])
    owner.release([(TOPIC, 1)])
    keep, dropped = owner.split(fetched)
    assert keep == []
    assert owner.reseek_targets(dropped, keep) == {}
    assert not owner.holds((TOPIC, 1), fetched[0].epoch)


def test_a_partition_with_kept_messages_is_not_reseeked() -> None:
    owner = Ownership()
    owner.assign([(TOPIC, 0)])
    old = owner.stamp([msg(0, 1)])
    owner.release([(TOPIC, 0)])
    owner.assign([(TOPIC, 0)])
    new = owner.stamp([msg(0, 1)])  # read again under the new assignment
    keep, dropped = owner.split([*old, *new])
    assert [m.offset() for m in keep] == [1]
    assert owner.reseek_targets(dropped, keep) == {}


def test_reseek_only_when_the_position_ran_past_the_first_dropped_message() -> None:
    assert needs_reseek(25, 20)
    assert not needs_reseek(20, 20)
    assert not needs_reseek(OFFSET_INVALID, 20)


def test_a_partition_paused_when_it_was_lost_is_resumed_when_it_comes_back() -> None:
    # librdkafka keeps a partition's pause flag across revocation and re-assignment, so a
    # partition the worker had paused (holding back) and then lost comes back paused: the
    # worker must resume it, or it is never fetched again (a cluster run saw 3 partitions
    # stop for good after two brokers came back)
    key = ("qr.images", 0)
    own = Ownership()
    own.assign([key])
    own.paused.add(key)
    own.release([key])
    assert own.resumable() == set(), "not ours while it is away"
    own.assign([key])
    assert own.resumable() == {key}
    own.resumed({key})
    assert own.resumable() == set() and not own.paused
