"""The worker's Kafka client configurations (``core.runtime.kafka`` plus the worker's own keys)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from core.runtime.kafka import consumer_config, producer_config
from core.runtime.settings import Settings


def worker_consumer_config(
    settings: Settings,
    index: int,
    *,
    group_instance_id: str | None,
    on_commit: Callable[..., None],
    exactly_once: bool,
) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "partition.assignment.strategy": "cooperative-sticky",
        "on_commit": on_commit,
    }
    if group_instance_id:
        extra["group.instance.id"] = group_instance_id
    # Offsets are committed by the worker: per batch, on revoke and at close. No auto
    # commit: librdkafka's revoke-time auto commit after a session timeout goes out with
    # a reset member id, which fences a static member for good (librdkafka PR #5585).
    extra["enable.auto.commit"] = False
    if exactly_once:
        extra["isolation.level"] = "read_committed"
    return consumer_config(settings, settings.consumer_group, role=f"worker-{index}", **extra)


def worker_producer_config(
    settings: Settings, index: int, *, transactional_id: str | None
) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if transactional_id:
        extra["transactional.id"] = transactional_id
    return producer_config(settings, role=f"worker-{index}", **extra)
