"""The base every part stands on, on a real broker: volume, size limits, topic creation."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from core.runtime.errors import MessageTooLargeError
from core.runtime.kafka import (
    admin_config,
    check_value_size,
    consumer_config,
    message_limits,
    producer_config,
)
from core.runtime.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
VOLUME_MESSAGES = 1000
VOLUME_VALUE_BYTES = 200 * 1024


def produce_all(settings: Settings, records: Iterable[tuple[bytes, bytes]]) -> list[str]:
    """Produce and flush; returns the delivery errors (empty when all were acknowledged)."""
    producer = Producer(producer_config(settings, "test"))
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(f"{msg.key()!r}: {err.str()}")

    for key, value in records:
        check_value_size(settings, value)
        while True:
            try:
                producer.produce(settings.topic_images, value, key, on_delivery=on_delivery)
                break
            except BufferError:  # local queue full: let deliveries drain
                producer.poll(0.1)
        producer.poll(0)
    remaining = producer.flush(60)
    assert remaining == 0, f"{remaining} messages still queued after 60 s"
    return errors


def consume_hashes(settings: Settings, expected: int, timeout_s: float = 60) -> dict[bytes, str]:
    """key → sha256 of value for every message read; fails on a duplicate key."""
    consumer = Consumer(consumer_config(settings, settings.consumer_group, "test"))
    seen: dict[bytes, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        consumer.subscribe([settings.topic_images])
        while len(seen) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=1.0):
                if msg.error():
                    raise KafkaException(msg.error())
                key = msg.key()
                assert key is not None and key not in seen, f"duplicate or missing key {key!r}"
                seen[key] = hashlib.sha256(msg.value() or b"").hexdigest()
    finally:
        consumer.close()
    return seen


def test_thousand_200kb_messages_arrive_intact(kafka_settings: Settings) -> None:
    rng = random.Random(20240601)
    pool = rng.randbytes(VOLUME_VALUE_BYTES + VOLUME_MESSAGES)
    records = [
        (f"req-{i:04d}".encode(), i.to_bytes(4, "big") + pool[i : i + VOLUME_VALUE_BYTES - 4])
        for i in range(VOLUME_MESSAGES)
    ]
    sent = {key: hashlib.sha256(value).hexdigest() for key, value in records}
    assert len(set(sent.values())) == VOLUME_MESSAGES  # every value distinct

    started = time.monotonic()
    assert produce_all(kafka_settings, records) == []
    received = consume_hashes(kafka_settings, VOLUME_MESSAGES)
    elapsed = time.monotonic() - started

    assert len(received) == VOLUME_MESSAGES, f"lost {VOLUME_MESSAGES - len(received)} messages"
    assert received == sent
    assert elapsed < 60, f"1,000 x 200 KB took {elapsed:.1f} s"


def test_value_at_the_limit_passes_and_one_byte_over_is_refused(kafka_settings: Settings) -> None:
    limits = message_limits(kafka_settings)
    at_limit = os.urandom(limits.max_value_bytes)

    assert produce_all(kafka_settings, [(b"at-limit", at_limit)]) == []
    received = consume_hashes(kafka_settings, 1)
    assert received == {b"at-limit": hashlib.sha256(at_limit).hexdigest()}

    with pytest.raises(MessageTooLargeError, match="QRSIGHT_MAX_IMAGE_BYTES") as caught:
        check_value_size(kafka_settings, at_limit + b"x")
    assert caught.value.code == "message_too_large"
    assert caught.value.http_status == 413


def test_topic_and_producer_limits_agree_with_settings(kafka_settings: Settings) -> None:
    limits = message_limits(kafka_settings)
    admin = AdminClient(admin_config(kafka_settings))
    resources = [
        ConfigResource(ResourceType.TOPIC, name)
        for name in (kafka_settings.topic_images, kafka_settings.topic_dlq)
    ]
    for resource, future in admin.describe_configs(resources).items():
        configs = future.result(timeout=15)
        assert int(configs["max.message.bytes"].value) == limits.max_message_bytes, resource.name
    assert producer_config(kafka_settings)["message.max.bytes"] == limits.max_message_bytes


def test_producer_refuses_an_oversized_message_at_once(kafka_settings: Settings) -> None:
    """Bypassing check_value_size still gets an immediate error, never a silent hang."""
    limits = message_limits(kafka_settings)
    producer = Producer(producer_config(kafka_settings, "test"))
    started = time.monotonic()
    with pytest.raises(KafkaException) as caught:
        producer.produce(kafka_settings.topic_images, b"x" * (limits.max_message_bytes + 1))
    assert caught.value.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
    assert time.monotonic() - started < 1
    assert producer.flush(10) == 0
    del producer  # the traceback pytest keeps must not keep a client alive past the broker


# --- the qrsight-topics CLI, as a user runs it -------------------------------------------------
def topics_cli(
    *args: str, env: dict[str, str], timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer_tools.topics", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def cli_env(bootstrap: str, uid: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRSIGHT_TOPIC")}
    env.update(
        QRSIGHT_KAFKA_BOOTSTRAP=bootstrap,
        QRSIGHT_TOPIC_IMAGES=f"qr.images.{uid}",
        QRSIGHT_TOPIC_DETECTIONS=f"qr.detections.{uid}",
        QRSIGHT_TOPIC_REPLIES=f"qr.replies.{uid}",
        QRSIGHT_TOPIC_DLQ=f"qr.images.dlq.{uid}",
        QRSIGHT_TOPIC_PARTITIONS="2",
        QRSIGHT_REPLIES_PARTITIONS="3",
    )
    env.update(extra)
    return env


def lines_by_topic(stdout: str) -> dict[str, str]:
    return {line.split()[0]: line for line in stdout.splitlines() if line.strip()}


@pytest.fixture
def cli_topics(kafka_bootstrap: str, uid: str) -> Iterator[list[str]]:
    """The topic names the CLI tests create (from ``cli_env``), deleted afterwards."""
    names = [f"qr.{kind}.{uid}" for kind in ("images", "detections", "replies", "images.dlq")]
    yield names
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.delete_topics(names, operation_timeout=10).values():
        with contextlib.suppress(KafkaException):
            future.result(timeout=15)


def test_topics_create_twice_is_harmless_and_describe_shows_them(
    kafka_bootstrap: str, uid: str, cli_topics: list[str]
) -> None:
    env = cli_env(kafka_bootstrap, uid)
    topics = cli_topics

    first = topics_cli("create", env=env)
    assert first.returncode == 0, first.stderr
    created = lines_by_topic(first.stdout)
    assert sorted(created) == sorted(topics)
    assert all(" created " in line for line in created.values()), first.stdout

    second = topics_cli("create", env=env)
    assert second.returncode == 0, second.stderr
    existing = lines_by_topic(second.stdout)
    assert sorted(existing) == sorted(topics)
    assert all(" exists " in line for line in existing.values()), second.stdout

    described = topics_cli("describe", env=env)
    assert described.returncode == 0, described.stderr
    shown = lines_by_topic(described.stdout)
    assert sorted(shown) == sorted(topics)
    assert "partitions=2" in shown[f"qr.images.{uid}"]
    assert "partitions=3" in shown[f"qr.replies.{uid}"]
    assert "retention.ms=300000" in shown[f"qr.replies.{uid}"]


def test_topics_create_warns_when_an_existing_topic_is_smaller(
    kafka_bootstrap: str, uid: str, cli_topics: list[str]
) -> None:
    assert topics_cli("create", env=cli_env(kafka_bootstrap, uid)).returncode == 0

    more = topics_cli("create", env=cli_env(kafka_bootstrap, uid, QRSIGHT_TOPIC_PARTITIONS="5"))

    assert more.returncode == 0, more.stderr
    assert "QRSIGHT_TOPIC_PARTITIONS" in more.stderr
    assert f"qr.images.{uid} has 2 partitions" in more.stderr


def test_topics_describe_reports_missing_topics(kafka_bootstrap: str, uid: str) -> None:
    described = topics_cli("describe", env=cli_env(kafka_bootstrap, uid))

    assert described.returncode == 1
    assert f"qr.images.{uid} missing" in described.stdout


@pytest.mark.parametrize(
    ("bootstrap", "exit_code", "hint"),
    [
        ("", 2, "set QRSIGHT_KAFKA_BOOTSTRAP"),
        ("127.0.0.1:1", 1, "check QRSIGHT_KAFKA_BOOTSTRAP"),
    ],
)
def test_topics_cli_names_the_setting_when_kafka_is_not_there(
    uid: str, bootstrap: str, exit_code: int, hint: str
) -> None:
    started = time.monotonic()
    result = topics_cli("create", "--timeout", "3", env=cli_env(bootstrap, uid))

    assert result.returncode == exit_code
    assert hint in result.stderr
    assert time.monotonic() - started < 15
