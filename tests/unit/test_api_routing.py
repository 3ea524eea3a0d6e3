"""Least-loaded routing of requests (``api.routing``), without a broker."""

from __future__ import annotations

import logging
import random
import struct

import pytest
from confluent_kafka import KafkaError
from confluent_kafka.admin import GroupMember, GroupMetadata

from api.routing import Router, assigned_partitions, group_error, least_loaded, owners_from_groups
from core.runtime.settings import load_settings

TWO_WORKERS = {"a": (0, 1, 2), "b": (3,)}


def router(owners: dict[str, tuple[int, ...]], prefer: int = 0, **overrides: object) -> Router:
    settings = load_settings({}, kafka_bootstrap="127.0.0.1:1", **overrides)
    made = Router(settings, prefer, random.Random(7))
    made._set(owners, "")
    return made


def per_worker(made: Router, owners: dict[str, tuple[int, ...]]) -> dict[str, int]:
    in_flight = made.in_flight()
    return {member: sum(in_flight.get(p, 0) for p in parts) for member, parts in owners.items()}


def test_a_request_goes_to_the_worker_with_fewer_in_flight_not_the_one_with_more_partitions() -> (
    None
):
    rng = random.Random(1)
    assert least_loaded(TWO_WORKERS, {0: 1}, rng) == 3
    assert least_loaded(TWO_WORKERS, {3: 2, 0: 1}, rng) in (1, 2)  # a's emptiest partitions
    assert least_loaded({"a": (), "b": (5,)}, {}, rng) == 5  # a member without a partition
    assert least_loaded({}, {}, rng) is None
    assert least_loaded({"a": ()}, {}, rng) is None


def test_requests_in_flight_stay_even_across_workers_in_a_closed_loop() -> None:
    """Four callers, each sending again as soon as its answer comes, in a random order:
    after every send the two workers differ by at most one request (random partitions
    would put all four on one worker two fifths of the time)."""
    made = router(TWO_WORKERS)
    rng = random.Random(3)
    held = [made.acquire() for _ in range(4)]
    assert per_worker(made, TWO_WORKERS) == {"a": 2, "b": 2}
    for _ in range(2_000):
        done = held.pop(rng.randrange(len(held)))
        made.release(done)
        held.append(made.acquire())
        loads = per_worker(made, TWO_WORKERS).values()
        assert max(loads) - min(loads) <= 1
    for partition in held:
        made.release(partition)
    assert made.in_flight() == {}


def test_api_processes_break_ties_differently_so_their_lone_requests_do_not_meet() -> None:
    """Each process counts only its own requests: with one request each, two processes
    (reply partitions 0 and 1) use both workers, every time, whatever the member ids."""
    for owners in (TWO_WORKERS, {"z": (0, 1), "y": (2, 3)}):
        firsts = set()
        for prefer in (0, 1):
            made = router(owners, prefer=prefer)
            first = made.acquire()
            firsts |= {member for member, parts in owners.items() if first in parts}
        assert firsts == set(owners)
    # the same process sends its ties to the same worker (c = 1 stays on one worker)
    made = router(TWO_WORKERS, prefer=1)
    chosen = set()
    for _ in range(10):
        partition = made.acquire()
        chosen.add(partition)
        made.release(partition)
    assert chosen == {3}  # b is second in member-id order


def test_by_key_when_asked_or_while_no_assignment_is_known() -> None:
    assert router(TWO_WORKERS, api_partitioner="key").acquire() is None
    unknown = router({})
    assert unknown.acquire() is None
    unknown.release(None)  # nothing was counted
    assert unknown.in_flight() == {}


def test_the_assignment_is_read_from_the_consumer_protocols_bytes_for_the_images_topic_only() -> (
    None
):
    # as librdkafka's cooperative-sticky assignor wrote it for a member of a real group:
    # version 0, topic t1 partitions 1 and 2, then 24 bytes of user data
    real = (
        bytes.fromhex("0000000000010002")
        + b"t1"
        + bytes.fromhex("00000002000000010000000200000018")
        + bytes(24)
    )
    assert assigned_partitions(real, "t1") == (1, 2)
    assert assigned_partitions(real, "qr.images") == ()

    def assignment(*topics: tuple[str, list[int]]) -> bytes:
        out = struct.pack(">hi", 1, len(topics))
        for name, parts in topics:
            out += struct.pack(">h", len(name)) + name.encode()
            out += struct.pack(f">i{len(parts)}i", len(parts), *parts)
        return out + struct.pack(">i", -1)  # no user data

    def member(name: str, value: bytes | None) -> GroupMember:
        made = GroupMember()
        made.id, made.assignment = name, value
        return made

    def entry(group: str, error: KafkaError | None, *members: GroupMember) -> GroupMetadata:
        made = GroupMetadata()
        made.id, made.error, made.members = group, error, list(members)
        return made

    groups = [
        entry("qrsight-workers", KafkaError(KafkaError.NOT_COORDINATOR)),  # another broker
        entry(
            "qrsight-workers",
            None,
            member("m1", assignment(("qr.images", [2, 0]), ("other", [1]))),
            member("m2", assignment()),
            member("m3", b"\x00\x01\x00"),  # cut short: no partitions, no exception
        ),
        entry("someone-else", None, member("x", assignment(("qr.images", [5])))),
    ]
    assert owners_from_groups(groups, "qrsight-workers", "qr.images") == {
        "m1": (0, 2),
        "m2": (),
        "m3": (),
    }
    assert group_error(groups, "qrsight-workers") is None
    denied = [entry("g", KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED))]
    assert group_error(denied, "g").code() == KafkaError.GROUP_AUTHORIZATION_FAILED


def test_an_unreachable_cluster_means_by_key_said_once(caplog: pytest.LogCaptureFixture) -> None:
    made = router(TWO_WORKERS, api_assignment_refresh_ms=200)
    with caplog.at_level(logging.WARNING, logger="api.routing"):
        assert made.refresh(timeout_s=0.5) is False
        assert made.refresh(timeout_s=0.5) is False
    assert made.owners() == {} and made.acquire() is None
    said = [r.getMessage() for r in caplog.records if "requests go by key" in r.getMessage()]
    assert len(said) == 1, said
    assert "could not describe consumer group qrsight-workers" in said[0]


def test_a_release_never_leaves_a_negative_count() -> None:
    made = router(TWO_WORKERS)
    partition = made.acquire()
    made.release(partition)
    made.release(partition)  # e.g. a stale handle after a reassignment
    assert made.in_flight() == {}
