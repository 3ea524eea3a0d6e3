"""core.runtime.kafka: one size setting drives every limit; connection settings reach every
client."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from core.runtime.errors import ConfigError, MessageTooLargeError
from core.runtime.kafka import (
    admin_config,
    check_value_size,
    consumer_config,
    message_limits,
    producer_config,
    topic_specs,
)
from core.runtime.settings import Settings, load_settings

ConfigBuilder = Callable[[Settings], dict[str, Any]]
BUILDERS: dict[str, ConfigBuilder] = {
    "producer": producer_config,
    "consumer": lambda s: consumer_config(s, "group"),
    "admin": admin_config,
}


def settings_with(**values: Any) -> Settings:
    return load_settings({}, kafka_bootstrap="k1:9092", **values)


@pytest.mark.parametrize("max_image_bytes", [1024, 1_000_000, 10 * 1024 * 1024, 200 * 1024 * 1024])
def test_every_size_limit_agrees(max_image_bytes: int) -> None:
    settings = settings_with(max_image_bytes=max_image_bytes)
    limits = message_limits(settings)
    specs = topic_specs(settings)
    producer = producer_config(settings)
    consumer = consumer_config(settings, "group")

    assert limits.max_value_bytes >= max_image_bytes
    assert limits.max_message_bytes > limits.max_value_bytes
    assert producer["message.max.bytes"] == limits.max_message_bytes
    for topic in (settings.topic_images, settings.topic_dlq):
        assert int(specs[topic]["config"]["max.message.bytes"]) == limits.max_message_bytes
    assert consumer["max.partition.fetch.bytes"] >= limits.max_message_bytes
    assert consumer["fetch.max.bytes"] >= consumer["max.partition.fetch.bytes"]
    assert consumer["receive.message.max.bytes"] > consumer["fetch.max.bytes"]


@pytest.mark.parametrize(
    ("extra", "raises"),
    [(-1, False), (0, False), (1, True), (1_000_000, True)],
)
def test_check_value_size_around_the_limit(extra: int, raises: bool) -> None:
    settings = settings_with(max_image_bytes=4096)
    value = b"v" * (message_limits(settings).max_value_bytes + extra)

    if raises:
        with pytest.raises(MessageTooLargeError, match="QRSIGHT_MAX_IMAGE_BYTES=4096") as caught:
            check_value_size(settings, value)
        assert (caught.value.code, caught.value.http_status) == ("message_too_large", 413)
    else:
        check_value_size(settings, value)


def test_check_value_size_accepts_a_tombstone() -> None:
    check_value_size(settings_with(), None)


@pytest.mark.parametrize("role", BUILDERS)
def test_security_settings_reach_every_client(role: str) -> None:
    settings = settings_with(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="svc-qrsight",
        kafka_sasl_password="pw-71c3",
    )

    conf = BUILDERS[role](settings)

    assert conf["bootstrap.servers"] == "k1:9092"
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "svc-qrsight"
    assert conf["sasl.password"] == "pw-71c3"
    assert "pw-71c3" not in repr(settings)


@pytest.mark.parametrize("role", BUILDERS)
def test_plaintext_sends_no_sasl_properties(role: str) -> None:
    conf = BUILDERS[role](settings_with())

    assert conf["security.protocol"] == "PLAINTEXT"
    assert not any(key.startswith("sasl.") for key in conf)


@pytest.mark.parametrize("role", BUILDERS)
def test_passthrough_properties_reach_every_client_and_win(role: str) -> None:
    settings = load_settings(
        {
            "QRSIGHT_KAFKA_BOOTSTRAP": "k1:9092",
            "QRSIGHT_KAFKA__SSL_CA_LOCATION": "/etc/ca.pem",
            "QRSIGHT_KAFKA__CLIENT_ID": "custom-id",
        }
    )

    conf = BUILDERS[role](settings)

    assert conf["ssl.ca.location"] == "/etc/ca.pem"
    assert conf["client.id"] == "custom-id"


@pytest.mark.parametrize("role", BUILDERS)
def test_no_bootstrap_names_the_setting(role: str) -> None:
    with pytest.raises(ConfigError, match="QRSIGHT_KAFKA_BOOTSTRAP"):
        BUILDERS[role](load_settings({}))


def test_consumer_stores_offsets_only_when_told() -> None:
    conf = consumer_config(settings_with(), "workers")

    assert conf["group.id"] == "workers"
    assert conf["enable.auto.offset.store"] is False


def test_topic_specs_come_from_settings() -> None:
    settings = settings_with(
        topic_images="a.images",
        topic_detections="a.detections",
        topic_replies="a.replies",
        topic_dlq="a.dlq",
        topic_partitions=7,
        replies_partitions=9,
        replies_retention_ms=120_000,
    )

    specs = topic_specs(settings)

    assert {name: spec["partitions"] for name, spec in specs.items()} == {
        "a.images": 7,
        "a.detections": 7,
        "a.replies": 9,
        "a.dlq": 7,
    }
    assert specs["a.replies"]["config"]["retention.ms"] == "120000"
