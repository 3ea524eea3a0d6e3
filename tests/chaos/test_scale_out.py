"""Scale-out beyond one host: worker groups join and leave a running stream while
partitions are added to ``qr.images``.

Each *host* is what a separate machine runs: one ``qrsight-consumer --workers 2``
supervisor with its own ``QRSIGHT_GROUP_INSTANCE_ID`` and state dir. Host A streams
alone; host B joins; ``qr.images`` grows from 6 to 9 partitions (Admin
``create_partitions``, as an operator does); host A leaves (SIGTERM, the way a host is
drained). Nothing restarts: the publisher's producer and the workers find the new
partitions at their next metadata refresh (``topic.metadata.refresh.interval.ms``, 30 s
in production, 10 s here to keep the scenario short) and the group rebalances onto them.

Promises checked: 0 missing; at-least-once duplicates at most workers x
``QRSIGHT_MAX_BATCH`` per membership change (a join, the partitions' addition, a leave);
images published to the new partitions get their results; no worker restarts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from confluent_kafka.admin import AdminClient, NewPartitions

from core.runtime.kafka import admin_config
from core.runtime.settings import Settings
from tests.chaos.harness import IMAGES, Pod, Publisher, Tracker, log
from tests.chaos.test_chaos import finish, logdir, make, model_path, pods  # noqa: F401

WORKERS_PER_HOST = 2
PARTITIONS_BEFORE, PARTITIONS_AFTER = 6, 9
REFRESH_MS = 10_000  # metadata refresh for every client of the scenario (production: 30 s)
STREAM_S = 60.0  # the whole stream; the rate follows from CHAOS_IMAGES
JOIN_AT_S = 6.0  # host B joins
GROW_AT_S = 14.0  # qr.images grows
PICKUP_LIMIT_S = 2 * REFRESH_MS / 1000 + 15.0  # refresh, then a rebalance on a loaded machine
CHANGES = 3  # membership changes the duplicate bound allows for
WORKERS = 2 * WORKERS_PER_HOST


def grow(settings: Settings, partitions: int) -> None:
    """Add partitions to ``qr.images`` (existing keys may move: ordering per key is
    per partition, as Kafka documents for ``create_partitions``)."""
    admin = AdminClient(admin_config(settings))
    futures = admin.create_partitions([NewPartitions(settings.topic_images, partitions)])
    for future in futures.values():
        future.result(30)


def new_partition_results(
    publisher: Publisher, tracker: Tracker, since: float
) -> tuple[int, float | None]:
    """(images published to the added partitions, seconds from ``since`` to the first
    result of one of them)."""
    added = {rid for rid, p in publisher.partition.items() if p >= PARTITIONS_BEFORE}
    with tracker._lock:
        firsts = [min(tracker.arrivals[rid]) for rid in added if tracker.arrivals.get(rid)]
    return len(added), (min(firsts) - since if firsts else None)


def assigned_new(pod: Pod) -> bool:
    """Whether one of the pod's workers was assigned an added partition."""
    topic_part = [f"[{p}]" for p in range(PARTITIONS_BEFORE, PARTITIONS_AFTER)]
    for line in pod.log.read_text(errors="replace").splitlines():
        if "partitions assigned" in line and any(t in line for t in topic_part):
            return True
    return False


def sleep_until(started: float, at_s: float) -> None:
    time.sleep(max(0.0, started + at_s - time.monotonic()))


def test_hosts_join_and_leave_while_partitions_are_added_and_nothing_is_lost(
    make: Callable[..., Settings],  # noqa: F811
    pods: list[Pod],  # noqa: F811
    logdir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    settings = make()
    refresh = {
        "topic.metadata.refresh.interval.ms": str(REFRESH_MS),
        "metadata.max.age.ms": str(3 * REFRESH_MS),
    }
    settings = settings.model_copy(update={"kafka_extra": {**settings.kafka_extra, **refresh}})
    assert settings.topic_partitions == PARTITIONS_BEFORE
    tracker = Tracker(settings)  # reads qr.detections, which keeps its partitions
    tracker.start()

    def host(name: str) -> Pod:
        state = tmp_path / name  # a host's own disk: notes, identity lock
        pod = Pod(settings, name, WORKERS_PER_HOST, logdir, QRSIGHT_STATE_DIR=str(state))
        pods.append(pod)
        return pod

    host_a = host("host-a")
    host_a.wait_ready(WORKERS_PER_HOST, timeout_s=120)
    publisher = Publisher(settings, IMAGES, IMAGES / STREAM_S, "scale")
    started = time.monotonic()
    publisher.start()

    sleep_until(started, JOIN_AT_S)
    host_b = host("host-b")
    host_b.wait_ready(1, timeout_s=120)
    log("host-b joined")

    sleep_until(started, GROW_AT_S)
    grown_at = time.monotonic()
    grow(settings, PARTITIONS_AFTER)
    log(f"qr.images grown to {PARTITIONS_AFTER} partitions")
    deadline = grown_at + PICKUP_LIMIT_S
    while time.monotonic() < deadline:
        published, pickup = new_partition_results(publisher, tracker, grown_at)
        if pickup is not None:
            break
        time.sleep(0.5)
    published, pickup = new_partition_results(publisher, tracker, grown_at)
    assert pickup is not None, (
        f"no result from an added partition within {PICKUP_LIMIT_S:.0f} s "
        f"({published} images published to them)"
    )
    log(f"first result from an added partition {pickup:.1f} s after create_partitions")

    left_at = time.monotonic()
    bound = CHANGES * WORKERS * settings.max_batch
    assert host_a.stop() == 0, host_a.log.read_text()[-2000:]
    log("host-a left")

    row = finish(
        "hosts join and leave, qr.images grows 6 → 9 partitions",
        settings,
        publisher=publisher,
        tracker=tracker,
        pods=pods,
        started=started,
        kills=0,
        bound=bound,
        recovery=f"added partitions served {pickup:.1f} s after create_partitions; "
        f"host-a left at {left_at - started:.0f} s",
    )
    tracker.stop()
    published, _ = new_partition_results(publisher, tracker, grown_at)
    assert host_b.stop() == 0, host_b.log.read_text()[-2000:]
    assert row.missing == 0
    assert row.duplicates <= bound
    assert row.restarts == 0, "picked up without a restart"
    assert published > 0, "the publisher's producer must see the added partitions too"
    assert assigned_new(host_b), "host-b must own added partitions after host-a left"
