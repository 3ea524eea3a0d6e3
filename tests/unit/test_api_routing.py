"""Least-loaded routing of requests (``api.routing``), without a broker."""

from __future__ import annotations

import logging
import random

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import ConsumerGroupDescription, MemberAssignment, MemberDescription

from api.routing import Router, least_loaded, owners_from_description
from core.runtime.settings import load_settings

TWO_WORKERS = {"a": (0, 1, 2), "b": (3,)}


def router(owners: dict[str, tuple[int, ...]], **overrides: object) -> Router:
    settings = load_settings({}, kafka_bootstrap="127.0.0.1:1", **overrides)
    made = Router(settings, random.Random(7))
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
    would put all four on one worker about a fifth of the time)."""
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


def test_by_key_when_asked_or_while_no_assignment_is_known() -> None:
    assert router(TWO_WORKERS, api_partitioner="key").acquire() is None
    unknown = router({})
    assert unknown.acquire() is None
    unknown.release(None)  # nothing was counted
    assert unknown.in_flight() == {}


def test_the_assignment_is_read_from_the_groups_description_for_the_images_topic_only() -> None:
    def member(name: str, *tps: tuple[str, int]) -> MemberDescription:
        assignment = MemberAssignment([TopicPartition(t, p) for t, p in tps])
        return MemberDescription(name, f"client-{name}", "/127.0.0.1", assignment)

    description = ConsumerGroupDescription(
        "qrsight-workers",
        False,
        [member("m1", ("qr.images", 2), ("qr.images", 0), ("other", 1)), member("m2")],
        "cooperative-sticky",
        None,
        None,
    )
    assert owners_from_description(description, "qr.images") == {"m1": (0, 2), "m2": ()}


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
