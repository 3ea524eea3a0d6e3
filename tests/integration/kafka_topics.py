"""Fresh topic names per test and their clean-up, shared by the fixtures and the tests
that build several sets of settings of their own."""

from __future__ import annotations

import contextlib
import os

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from core.runtime.kafka import admin_config
from core.runtime.settings import Settings, load_settings

# Kafka connection settings that go with an external QRSIGHT_KAFKA_BOOTSTRAP.
CONNECTION_ENV_PREFIXES = ("QRSIGHT_KAFKA_SECURITY_", "QRSIGHT_KAFKA_SASL_", "QRSIGHT_KAFKA__")


def _connection_env() -> dict[str, str]:
    """Security settings for an external broker; none for the one started here."""
    if not os.environ.get("QRSIGHT_KAFKA_BOOTSTRAP"):
        return {}
    return {k: v for k, v in os.environ.items() if k.upper().startswith(CONNECTION_ENV_PREFIXES)}


def fresh_settings(bootstrap: str, uid: str, **overrides: object) -> Settings:
    """Settings with topic names and a group id of their own (``uid``)."""
    values: dict[str, object] = {
        "kafka_bootstrap": bootstrap,
        "topic_images": f"qr.images.{uid}",
        "topic_detections": f"qr.detections.{uid}",
        "topic_replies": f"qr.replies.{uid}",
        "topic_dlq": f"qr.images.dlq.{uid}",
        "consumer_group": f"qrsight-test-{uid}",
        "topic_partitions": 3,
        "replies_partitions": 4,
    }
    values.update(overrides)
    return load_settings(_connection_env(), **values)


def delete_topics(settings: Settings) -> None:
    """Best effort: drop a test's topics so a shared broker does not fill up."""
    admin = AdminClient(admin_config(settings))
    names = [
        settings.topic_images,
        settings.topic_detections,
        settings.topic_replies,
        settings.topic_dlq,
    ]
    for future in admin.delete_topics(names, operation_timeout=10).values():
        with contextlib.suppress(KafkaException):
            future.result(timeout=15)
