"""librdkafka configuration built from settings: the one place every client gets its config.

The single size setting (``QRSIGHT_MAX_IMAGE_BYTES``) drives the topic's
``max.message.bytes``, the producer's ``message.max.bytes`` and the consumer's
``fetch.max.bytes``/``max.partition.fetch.bytes``, so an image over the limit gets a
clear error instead of hanging in a fetch that can never complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from core.runtime.errors import ConfigError, MessageTooLargeError
from core.runtime.settings import Settings, env_name
from schemas.codec import Codec

# Room for the Avro envelope, key and headers around one image.
ENVELOPE_BYTES = 64 * 1024
# Record-batch framing (batch header + one record's overhead) on top of a value.
BATCH_OVERHEAD_BYTES = 16 * 1024


@dataclass(frozen=True)
class MessageLimits:
    max_value_bytes: int  # largest record value a qrsight producer will send
    max_message_bytes: int  # producer message.max.bytes and topic max.message.bytes
    max_fetch_bytes: int  # consumer fetch limits: always at least one whole message


def message_limits(settings: Settings) -> MessageLimits:
    value = settings.max_image_bytes + ENVELOPE_BYTES
    message = value + BATCH_OVERHEAD_BYTES
    return MessageLimits(value, message, max(message, 52_428_800))


def check_value_size(settings: Settings, value: bytes | None, *, what: str = "message") -> None:
    """Refuse a value the broker would reject, naming the setting that bounds it."""
    limit = message_limits(settings).max_value_bytes
    if value is not None and len(value) > limit:
        raise MessageTooLargeError(
            f"{what} of {len(value)} bytes is over the limit of {limit} bytes "
            f"({env_name('max_image_bytes')}={settings.max_image_bytes} plus "
            f"{ENVELOPE_BYTES} bytes of envelope)",
            size=len(value),
            limit=limit,
        )


LIBRDKAFKA_LOGGER = logging.getLogger("librdkafka")


def base_config(settings: Settings, role: str) -> dict[str, Any]:
    """Connection and security properties shared by every client."""
    if not settings.kafka_bootstrap:
        raise ConfigError(
            f"no Kafka broker configured: set {env_name('kafka_bootstrap')} "
            "(for the local broker: `make kafka-up` prints it)"
        )
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "client.id": f"{settings.kafka_client_id}-{role}",
        "security.protocol": settings.kafka_security_protocol,
        # librdkafka's own log lines go through Python logging (core.runtime.logs' format), served
        # by the client's poll/consume calls, instead of straight to stderr
        "logger": LIBRDKAFKA_LOGGER,
    }
    if settings.kafka_sasl_mechanism:
        conf["sasl.mechanism"] = settings.kafka_sasl_mechanism
    if settings.kafka_sasl_username:
        conf["sasl.username"] = settings.kafka_sasl_username
    if settings.kafka_sasl_password is not None:
        conf["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    if settings.kafka_ssl_ca_location is not None:
        conf["ssl.ca.location"] = str(settings.kafka_ssl_ca_location)
    return conf


def producer_config(settings: Settings, role: str = "producer", **extra: Any) -> dict[str, Any]:
    conf = base_config(settings, role)
    conf.update(
        {
            "message.max.bytes": message_limits(settings).max_message_bytes,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "none",  # images are already compressed
        }
    )
    conf.update(extra)
    conf.update(settings.kafka_extra_values())
    return conf


def consumer_config(
    settings: Settings, group_id: str | None, role: str = "consumer", **extra: Any
) -> dict[str, Any]:
    limits = message_limits(settings)
    conf = base_config(settings, role)
    conf.update(
        {
            "fetch.max.bytes": limits.max_fetch_bytes,
            "max.partition.fetch.bytes": limits.max_message_bytes,
            "receive.message.max.bytes": limits.max_fetch_bytes + 1_000_000,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
        }
    )
    if group_id is not None:
        conf["group.id"] = group_id
    conf.update(extra)
    conf.update(settings.kafka_extra_values())
    return conf


def admin_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    conf = base_config(settings, "admin")
    conf.update(extra)
    conf.update(settings.kafka_extra_values())
    return conf


def avro_codec(settings: Settings, schema_name: str) -> Codec:
    """The Avro codec of ``schema_name``: Schema Registry wire format when
    ``QRSIGHT_SCHEMA_REGISTRY_URL`` is set, plain schemaless Avro otherwise."""
    auth = settings.schema_registry_basic_auth
    return Codec(
        schema_name,
        settings.schema_registry_url,
        auth.get_secret_value() if auth is not None else None,
    )


def topic_specs(settings: Settings) -> dict[str, dict[str, Any]]:
    """Name → partitions and configs of every topic qrsight uses."""
    max_bytes = str(message_limits(settings).max_message_bytes)
    keep = str(settings.detections_retention_ms)
    return {
        settings.topic_images: {
            "partitions": settings.topic_partitions,
            "config": {"max.message.bytes": max_bytes, "retention.ms": keep},
        },
        settings.topic_detections: {
            "partitions": settings.topic_partitions,
            "config": {"retention.ms": keep},
        },
        settings.topic_replies: {
            "partitions": settings.replies_partitions,
            "config": {"retention.ms": str(settings.replies_retention_ms)},
        },
        settings.topic_dlq: {
            "partitions": settings.topic_partitions,
            "config": {"max.message.bytes": max_bytes, "retention.ms": keep},
        },
    }
