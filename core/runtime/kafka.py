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

# Proactive metadata refresh (librdkafka's default is 5 min, its cache 3 times that). A
# lost leader already triggers an immediate refresh (`topic.metadata.refresh.fast.interval.ms`)
# and Kafka 3.7+ brokers name the new leader in the error itself (KIP-951); the periodic
# refresh is what finds partitions added to a topic and brokers added to the cluster, so
# a running worker group picks them up within this interval instead of five minutes.
METADATA_REFRESH_MS = 30_000
# librdkafka's rule of thumb: the metadata cache lives three refresh intervals.
METADATA_MAX_AGE_MS = 3 * METADATA_REFRESH_MS
# How long a produced message may wait for its acknowledgement before it fails (librdkafka
# `message.timeout.ms`, alias `delivery.timeout.ms`; Kafka's default). It must outlast a
# broker outage the workers ride out (a leader election takes seconds; too few in-sync
# replicas lasts until a broker returns), since a result that times out is a batch to
# redo. The API overrides it with its own, much shorter, produce timeout
# (`QRSIGHT_API_PRODUCE_TIMEOUT_MS`): a caller waits seconds, not minutes.
DELIVERY_TIMEOUT_MS = 300_000

# Replication of qrsight's topics when QRSIGHT_REPLICATION_FACTOR is unset: three copies
# on a cluster of at least three brokers (survives one broker lost, and one more down for
# maintenance only without writes), one on a single broker.
CLUSTER_REPLICATION = 3


def replication_for(settings: Settings, brokers: int) -> tuple[int, int]:
    """(replication factor, ``min.insync.replicas``) of new topics on ``brokers`` brokers.

    Unset settings follow the cluster: 3 and 2 on three or more brokers (an acknowledged
    write is on two brokers, and one broker may fail without stopping writes), else 1
    and 1. An explicit ``min.insync.replicas`` is kept; the default never asks for more
    in-sync replicas than the replication factor less one, so one replica may be down.
    """
    factor = settings.replication_factor
    if factor is None:
        factor = CLUSTER_REPLICATION if brokers >= CLUSTER_REPLICATION else 1
    min_isr = settings.min_insync_replicas
    if min_isr is None:
        min_isr = max(1, min(2, factor - 1))
    return factor, min_isr


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
        "topic.metadata.refresh.interval.ms": METADATA_REFRESH_MS,
        "metadata.max.age.ms": METADATA_MAX_AGE_MS,
        # librdkafka's own log lines go through Python logging (core.runtime.logs' format), served
        # by the client's poll/consume calls, instead of straight to stderr
        "logger": LIBRDKAFKA_LOGGER,
    }
    if settings.kafka_client_rack:
        # KIP-392: a consumer fetches from a replica in its own rack when the brokers set
        # broker.rack and replica.selector.class=...RackAwareReplicaSelector
        conf["client.rack"] = settings.kafka_client_rack
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
            # Idempotence: a retry after a lost acknowledgement (a leader that died after
            # writing) never writes the batch twice, and order per partition is kept
            # across leader changes; it implies acks=all and bounded in-flight requests.
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "none",  # images are already compressed
        }
    )
    if "transactional.id" not in extra:
        # A transactional producer's messages time out with their transaction: librdkafka
        # then sets message.timeout.ms to transaction.timeout.ms and refuses a larger one.
        conf["message.timeout.ms"] = DELIVERY_TIMEOUT_MS
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
