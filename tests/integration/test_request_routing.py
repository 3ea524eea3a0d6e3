"""The API sends requests in flight evenly to the workers of the group, on a real broker."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from confluent_kafka import Consumer

from api.replies import ReplyClient
from core.runtime.errors import ReplyTimeoutError
from core.runtime.kafka import consumer_config
from core.runtime.settings import Settings

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def members(settings: Settings, count: int) -> Iterator[list[Consumer]]:
    """``count`` consumers of the workers' group on the images topic, each with partitions
    (they stand in for workers that take requests and never answer)."""
    consumers = [
        Consumer(consumer_config(settings, settings.consumer_group, "worker")) for _ in range(count)
    ]
    for consumer in consumers:
        consumer.subscribe([settings.topic_images])
    deadline = time.monotonic() + 60
    while not all(c.assignment() for c in consumers):
        assert time.monotonic() < deadline, "the group never gave every member a partition"
        for consumer in consumers:
            assert consumer.poll(0.2) is None
    try:
        yield consumers
    finally:
        for consumer in consumers:
            consumer.close()


@pytest.fixture
def settings(kafka_settings_factory: Callable[..., Settings]) -> Settings:
    # three partitions for two workers: one owns two, the other one
    return kafka_settings_factory(topic_partitions=3, api_assignment_refresh_ms=200)


class Unanswered:
    """``count`` requests sent at once from threads, each waiting out its timeout."""

    def __init__(self, client: ReplyClient, count: int) -> None:
        self.outcomes: list[str] = []
        self.threads = [threading.Thread(target=self._send, args=(client, i)) for i in range(count)]
        for thread in self.threads:
            thread.start()

    def _send(self, client: ReplyClient, i: int) -> None:
        try:
            client.request(b"not answered %d" % i, timeout_s=6)
            self.outcomes.append("answered")
        except ReplyTimeoutError:
            self.outcomes.append("timed out")

    def join(self) -> list[str]:
        for thread in self.threads:
            thread.join(30)
        return self.outcomes


def taken(consumers: list[Consumer], count: int, timeout_s: float = 30) -> Counter[int]:
    """How many of ``count`` requests each consumer received."""
    got: Counter[int] = Counter()
    deadline = time.monotonic() + timeout_s
    while got.total() < count and time.monotonic() < deadline:
        for index, consumer in enumerate(consumers):
            message = consumer.poll(0.1)
            if message is not None and message.error() is None:
                got[index] += 1
    return got


def test_eight_requests_in_flight_go_four_to_each_of_two_workers(settings: Settings) -> None:
    with members(settings, 2) as consumers:
        client = ReplyClient(settings).start()
        try:
            assert client.wait_ready(30)
            deadline = time.monotonic() + 30
            while sorted(client.router.owners().values()) != sorted(
                tuple(sorted(tp.partition for tp in c.assignment())) for c in consumers
            ):
                assert time.monotonic() < deadline, client.router.owners()
                time.sleep(0.1)
            sent = Unanswered(client, 8)
            got = taken(consumers, 8)
            assert sent.join() == ["timed out"] * 8
            assert sorted(got.values()) == [4, 4], got
            assert client.router.in_flight() == {}  # every timed-out request released
        finally:
            client.close()


def test_by_key_no_assignment_is_asked_for_nothing_is_counted_and_every_request_arrives(
    kafka_settings_factory: Callable[..., Settings],
) -> None:
    """``QRSIGHT_API_PARTITIONER=key``: librdkafka's partitioner on the request id, as
    before routing."""
    settings = kafka_settings_factory(topic_partitions=3, api_partitioner="key")
    with members(settings, 2) as consumers:
        client = ReplyClient(settings).start()
        try:
            assert client.wait_ready(30)
            sent = Unanswered(client, 8)
            got = taken(consumers, 8)
            assert sent.join() == ["timed out"] * 8
            assert got.total() == 8
            assert client.router.owners() == {} and client.router.in_flight() == {}
        finally:
            client.close()
