"""Which partition of the images topic a request goes to: the least-loaded worker's.

Keyed by its random request id, a request lands on a random partition, and so on a random
worker. At low load that leaves cores idle: with two single-threaded workers and four
requests in flight, all four sit on one of them two fifths of the time (a closed loop's
states 4-0, 3-1, 2-2, 1-3 and 0-4 are about equally likely), so the pair works at about
0.8 of its capacity, 0.9 with eight in flight. A server that runs each request where a
core is free (the design this project replaces: gunicorn workers, each running its own
inference) has no such loss.

So the API sends each request to a partition of the worker with the fewest of *this
process's* requests in flight (the fewest in flight on that worker's partitions), and
within that worker to its partition with the fewest (ties at random). Ties between
workers go the same way in every API process, shifted by the process's reply partition
(unique per process): of the tied workers in member-id order, the one at that index. So
two processes with one request each put them on two workers, where independent coin
flips would share a worker half of the time.

It learns which worker owns which partition by describing the workers' consumer group
every ``QRSIGHT_API_ASSIGNMENT_REFRESH_MS``, so it needs Describe on that group
(``qrsight-topics acls`` grants it). It asks with librdkafka's ``rd_kafka_list_groups``
(``list_groups``, deprecated by confluent-kafka in favour of ``describe_consumer_groups``)
and reads each member's assignment from the consumer protocol's bytes itself: with
librdkafka 2.16 a ``describe_consumer_groups`` pending while two of three brokers were
down aborted the whole process (``rd_kafka_enq_once_del_source_return: Assertion
`eonce->refcnt > 0' failed``; ``tests/chaos/test_cluster.py``, two brokers down for 30 s,
reproduced it in both of two runs), where ``list_groups`` waits on a queue of its own and gives up
at its timeout. Until it knows an assignment (no worker yet, no permission, a broker that
does not answer) it routes by key as before, and says why once in the log. A stale
assignment after a rebalance costs balance for one refresh, never a request: every
partition is read by some worker.

Requests from elsewhere (cameras producing to the topic) are not counted: only the
requests this process is waiting for. With several API processes each balances its own
share.

``QRSIGHT_API_PARTITIONER=key`` keeps librdkafka's partitioner on the request id.
"""

from __future__ import annotations

import logging
import random
import struct
import threading
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from core.runtime.kafka import admin_config
from core.runtime.kafka_security import authorization_problem, is_authorization_error
from core.runtime.settings import Settings, env_name

logger = logging.getLogger(__name__)

# member id → the images topic's partitions it owns
Owners = Mapping[str, Sequence[int]]


def least_loaded(
    owners: Owners, in_flight: Mapping[int, int], rng: random.Random, prefer: int = 0
) -> int | None:
    """The partition to send the next request to: of the member with the fewest requests
    in flight on its partitions (of tied members in member-id order, the one at index
    ``prefer`` modulo their number), the partition with the fewest (ties at random); None
    when no member owns a partition."""
    loads = sorted(
        (sum(in_flight.get(p, 0) for p in parts), member, parts)
        for member, parts in owners.items()
        if parts
    )
    if not loads:
        return None
    tied = [entry for entry in loads if entry[0] == loads[0][0]]
    _, _, parts = tied[prefer % len(tied)]
    lowest = min(in_flight.get(p, 0) for p in parts)
    return rng.choice([p for p in parts if in_flight.get(p, 0) == lowest])


def assigned_partitions(assignment: bytes | None, topic: str) -> tuple[int, ...]:
    """The partitions of ``topic`` in a member's assignment, as the consumer protocol
    encodes it (``ConsumerProtocolAssignment``: int16 version, then an array of topic
    (int16-length string) with its int32 partitions; user data after it is not read)."""
    if not assignment:
        return ()
    try:
        (count,) = struct.unpack_from(">i", assignment, 2)
        offset, found = 6, list[int]()
        for _ in range(max(count, 0)):
            (length,) = struct.unpack_from(">h", assignment, offset)
            name = assignment[offset + 2 : offset + 2 + length].decode()
            offset += 2 + length
            (partitions,) = struct.unpack_from(">i", assignment, offset)
            offset += 4
            values = struct.unpack_from(f">{max(partitions, 0)}i", assignment, offset)
            offset += 4 * max(partitions, 0)
            if name == topic:
                found.extend(values)
    except (struct.error, UnicodeDecodeError):
        return ()
    return tuple(sorted(found))


def owners_from_groups(groups: Iterable[Any], group: str, topic: str) -> dict[str, tuple[int, ...]]:
    """``member id → partitions of topic`` from ``list_groups``' answer (its entry for
    ``group`` without an error; each broker that does not coordinate it may add one
    with)."""
    owners: dict[str, tuple[int, ...]] = {}
    for entry in groups:
        if entry.id != group or entry.error is not None:
            continue
        for member in entry.members:
            owners[member.id] = assigned_partitions(member.assignment, topic)
    return owners


def group_error(groups: Iterable[Any], group: str) -> KafkaError | None:
    """The error of ``group``'s entry when no entry came without one."""
    entries = [entry for entry in groups if entry.id == group]
    if any(entry.error is None for entry in entries):
        return None
    return next((entry.error for entry in entries if isinstance(entry.error, KafkaError)), None)


class Router:
    """This process's requests in flight per partition, and the group's assignment."""

    def __init__(
        self, settings: Settings, prefer: int = 0, rng: random.Random | None = None
    ) -> None:
        self.settings = settings
        self.prefer = prefer  # this process's reply partition: where its ties go
        self.enabled = settings.api_partitioner == "least-loaded"
        self.refresh_s = settings.api_assignment_refresh_ms / 1000
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._owners: dict[str, tuple[int, ...]] = {}
        self._in_flight: Counter[int] = Counter()
        self._admin: AdminClient | None = None
        self._problem = ""

    # --- the request path -----------------------------------------------------------------
    def acquire(self) -> int | None:
        """A partition for the next request, counted in flight until :meth:`release`;
        None: let the producer choose by key."""
        if not self.enabled:
            return None
        with self._lock:
            partition = least_loaded(self._owners, self._in_flight, self._rng, self.prefer)
            if partition is not None:
                self._in_flight[partition] += 1
            return partition

    def release(self, partition: int | None) -> None:
        if partition is None:
            return
        with self._lock:
            self._in_flight[partition] -= 1
            if self._in_flight[partition] <= 0:
                del self._in_flight[partition]

    def in_flight(self) -> dict[int, int]:
        with self._lock:
            return dict(self._in_flight)

    def owners(self) -> dict[str, tuple[int, ...]]:
        with self._lock:
            return dict(self._owners)

    # --- the assignment -------------------------------------------------------------------
    def serve(self, stop: threading.Event) -> None:
        """Refresh the assignment until ``stop`` (the routing thread)."""
        while not stop.is_set():
            self.refresh()
            stop.wait(self.refresh_s)

    def refresh(self, timeout_s: float | None = None) -> bool:
        """Ask the cluster who owns which partition; True when known. On failure the last
        known assignment is dropped (requests go by key) and the reason is logged once."""
        timeout_s = timeout_s if timeout_s is not None else max(self.refresh_s, 1.0)
        group, topic = self.settings.consumer_group, self.settings.topic_images
        try:
            if self._admin is None:
                self._admin = AdminClient(admin_config(self.settings, **{"client.id": self._id()}))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # list_groups: see above
                groups = self._admin.list_groups(group, timeout=timeout_s)
        except KafkaException as exc:
            return self._set({}, self._failed(exc.args[0] if exc.args else exc))
        except Exception as exc:  # a routing hint never fails a request
            return self._set({}, self._failed(exc))
        if not any(entry.id == group for entry in groups):
            # what a refused Describe looks like through list_groups: no entry at all
            return self._set(
                {},
                f"Kafka described no consumer group {group}: no worker has joined it, or "
                f"this user is not allowed to describe it (grant Describe on it: "
                f"qrsight-topics acls, or set {env_name('api_partitioner')}=key)",
            )
        error = group_error(groups, group)
        if error is not None:
            return self._set({}, self._failed(error))
        owners = owners_from_groups(groups, group, topic)
        if not any(owners.values()):
            # not a fault: the workers have not joined yet (or all left)
            why = f"no worker of group {group} owns a partition of {topic} yet"
            return self._set({}, why, logging.INFO)
        return self._set(owners, "")

    def _set(
        self, owners: dict[str, tuple[int, ...]], problem: str, level: int = logging.WARNING
    ) -> bool:
        with self._lock:
            changed = owners != self._owners
            self._owners = owners
        if problem and problem != self._problem:
            logger.log(level, "requests go by key: %s", problem)
        elif owners and changed:
            logger.info(
                "requests go to the least-loaded of %d worker(s): %s",
                sum(1 for parts in owners.values() if parts),
                "; ".join(f"{len(parts)} partition(s)" for parts in owners.values()),
            )
        self._problem = problem
        return bool(owners)

    def _failed(self, error: object) -> str:
        """Why the group could not be described: a refusal names the grant
        (``authorization_problem``), anything else says what Kafka answered."""
        group = self.settings.consumer_group
        if isinstance(error, KafkaError) and is_authorization_error(error):
            return authorization_problem(self.settings, error, "describe", group)
        return f"could not describe consumer group {group}: {error}"

    def _id(self) -> str:
        return f"{self.settings.kafka_client_id}-api-routing"
