"""Client and topic settings for a replicated cluster: replication that follows the number
of brokers, producers that ride out a leader election, rack-aware fetching (KIP-392)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from core.runtime.kafka import (
    admin_config,
    consumer_config,
    producer_config,
    replication_for,
)
from core.runtime.settings import Settings, load_settings

BUILDERS: dict[str, Callable[[Settings], dict[str, Any]]] = {
    "producer": producer_config,
    "consumer": lambda s: consumer_config(s, "group"),
    "admin": admin_config,
}


def settings_from(**env: str) -> Settings:
    return load_settings({"QRSIGHT_KAFKA_BOOTSTRAP": "k1:9092", **env})


@pytest.mark.parametrize(
    ("env", "brokers", "expected"),
    [
        ({}, 1, (1, 1)),  # the local single broker, as before
        ({}, 2, (1, 1)),  # too few for three copies
        ({}, 3, (3, 2)),  # a cluster: three copies, two acknowledge a write
        ({}, 6, (3, 2)),
        ({"QRSIGHT_REPLICATION_FACTOR": "2"}, 3, (2, 1)),  # one copy may be down
        ({"QRSIGHT_REPLICATION_FACTOR": "5"}, 5, (5, 2)),
        ({"QRSIGHT_MIN_INSYNC_REPLICAS": "3"}, 3, (3, 3)),  # explicit: kept
        ({"QRSIGHT_REPLICATION_FACTOR": "1", "QRSIGHT_MIN_INSYNC_REPLICAS": "1"}, 3, (1, 1)),
    ],
)
def test_replication_follows_the_cluster_unless_set(
    env: dict[str, str], brokers: int, expected: tuple[int, int]
) -> None:
    assert replication_for(settings_from(**env), brokers) == expected


@pytest.mark.parametrize("role", BUILDERS)
def test_client_rack_reaches_every_client_only_when_set(role: str) -> None:
    assert (
        BUILDERS[role](settings_from(QRSIGHT_KAFKA_CLIENT_RACK="eu-west-1a"))["client.rack"]
        == "eu-west-1a"
    )
    assert "client.rack" not in BUILDERS[role](settings_from())


@pytest.mark.parametrize("role", BUILDERS)
def test_metadata_is_refreshed_often_enough_to_see_new_partitions(role: str) -> None:
    conf = BUILDERS[role](settings_from())

    assert conf["topic.metadata.refresh.interval.ms"] <= 60_000
    assert conf["metadata.max.age.ms"] >= conf["topic.metadata.refresh.interval.ms"]


def test_passthrough_wins_over_the_cluster_defaults() -> None:
    conf = producer_config(
        settings_from(
            QRSIGHT_KAFKA__TOPIC_METADATA_REFRESH_INTERVAL_MS="5000",
            QRSIGHT_KAFKA__CLIENT_RACK="b",
            QRSIGHT_KAFKA_CLIENT_RACK="a",
        )
    )

    assert conf["topic.metadata.refresh.interval.ms"] == "5000"
    assert conf["client.rack"] == "b"


def test_producers_are_idempotent_and_wait_out_a_broker_outage() -> None:
    """A worker's result that cannot be acknowledged during an election or while too few
    replicas are in sync is retried (without duplicates) for minutes, not dropped."""
    conf = producer_config(settings_from())

    assert conf["enable.idempotence"] is True
    assert conf["acks"] == "all"
    assert conf["message.timeout.ms"] >= 120_000


def test_a_caller_with_its_own_delivery_timeout_keeps_it() -> None:
    """The API passes its produce timeout (seconds) so a caller gets 503, not a wait."""
    settings = settings_from()
    conf = producer_config(
        settings, "api", **{"message.timeout.ms": settings.api_produce_timeout_ms}
    )

    assert conf["message.timeout.ms"] == settings.api_produce_timeout_ms
    assert conf["enable.idempotence"] is True


def test_a_transactional_producer_times_out_with_its_transaction() -> None:
    """librdkafka refuses message.timeout.ms > transaction.timeout.ms (60 s by default) and
    sets it from transaction.timeout.ms when left unset."""
    conf = producer_config(settings_from(), "worker-0", **{"transactional.id": "qrsight-0"})

    assert "message.timeout.ms" not in conf
    assert conf["enable.idempotence"] is True
