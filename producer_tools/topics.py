"""``qrsight-topics create|describe|acls``: the four topics of the contract, from settings,
and the ACLs that give each role (API, workers, downstream readers) only what it needs.

Partitions, retention and ``max.message.bytes`` come from
:func:`core.runtime.kafka.topic_specs`, so the topics always agree with the clients' size
limits; replication and ``min.insync.replicas`` from
:func:`core.runtime.kafka.replication_for` and the number of brokers (3 and 2 on a cluster
of three or more, 1 and 1 on one broker, unless set). ``create`` is idempotent: a topic
that already exists is left alone, with a warning when it has fewer partitions or a
smaller ``max.message.bytes`` than the settings ask for (Kafka cannot shrink partitions,
and growing them re-maps keys, so that is the operator's call).

``acls`` (run as a super user, e.g. with ``.kafka/clients/admin.env``) creates the ACLs of
:func:`role_acls`; creating one that exists is a no-op, so it too can run any number of times.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ConfigResource,
    NewTopic,
    ResourcePatternType,
    ResourceType,
)

from core.runtime.errors import ConfigError, KafkaUnavailableError, QrsightError
from core.runtime.kafka import admin_config, replication_for, topic_specs
from core.runtime.logs import configure_from_settings
from core.runtime.settings import Settings, env_name, load_settings

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_USERS = {"api": "api", "worker": "worker", "reader": "reader"}
# Downstream readers' consumer groups start with this (qrsight-results uses it).
DEFAULT_READER_GROUP_PREFIX = "qrsight-results"


@dataclass(frozen=True)
class TopicState:
    """One topic as found on (or just created in) the cluster."""

    name: str
    status: str  # "created" | "exists" | "missing"
    partitions: int = 0
    replication: int = 0
    config: dict[str, str] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    def line(self) -> str:
        if self.status == "missing":
            return f"{self.name} missing (run `qrsight-topics create`)"
        shown = " ".join(f"{k}={v}" for k, v in sorted(self.config.items()))
        return (
            f"{self.name} {self.status} partitions={self.partitions} "
            f"replication={self.replication} {shown}"
        ).rstrip()


def connect(settings: Settings, timeout_s: float = DEFAULT_TIMEOUT_S) -> AdminClient:
    """An admin client whose broker answered a metadata request within ``timeout_s``."""
    admin = AdminClient(admin_config(settings, logger=logging.getLogger("librdkafka")))
    try:
        admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise KafkaUnavailableError(
            f"Kafka at {settings.kafka_bootstrap} did not answer within {timeout_s:g} s "
            f"({exc.args[0].str() if exc.args else exc}); check {env_name('kafka_bootstrap')} "
            f"and {env_name('kafka_security_protocol')} (local broker: `make kafka-up`)"
        ) from exc
    return admin


def create_topics(settings: Settings, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """Create the topics that do not exist yet; return the names it created.

    Safe to call any number of times. Returns once every topic has a leader for each
    partition, so a producer started right after it does not race the metadata.
    """
    return [t.name for t in ensure_topics(settings, timeout_s=timeout_s) if t.status == "created"]


def ensure_topics(settings: Settings, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[TopicState]:
    admin = connect(settings, timeout_s)
    specs = topic_specs(settings)
    metadata = admin.list_topics(timeout=timeout_s)
    existing = set(metadata.topics)
    factor, min_isr = replication_for(settings, len(metadata.brokers))
    new = [
        NewTopic(
            name,
            num_partitions=spec["partitions"],
            replication_factor=factor,
            config={**spec["config"], "min.insync.replicas": str(min_isr)},
        )
        for name, spec in specs.items()
        if name not in existing
    ]
    if new:
        logger.info(
            "creating topics brokers=%d replication=%d min_insync_replicas=%d",
            len(metadata.brokers),
            factor,
            min_isr,
        )
    created = _create(admin, new, timeout_s) if new else set()
    _wait_for_leaders(admin, specs, timeout_s)
    states = _describe(admin, settings, specs, timeout_s)
    return [
        TopicState(s.name, "created", s.partitions, s.replication, s.config, s.problems)
        if s.name in created
        else s
        for s in states
    ]


def describe_topics(
    settings: Settings, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> list[TopicState]:
    """The topics as they are on the cluster (``missing`` for those not created)."""
    admin = connect(settings, timeout_s)
    return _describe(admin, settings, topic_specs(settings), timeout_s)


def _create(admin: AdminClient, new: list[NewTopic], timeout_s: float) -> set[str]:
    created: set[str] = set()
    futures = admin.create_topics(new, operation_timeout=timeout_s, request_timeout=timeout_s)
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s + 5)
            created.add(name)
            logger.info("created topic topic=%s", name)
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:  # created meanwhile: fine
                continue
            raise _create_error(name, err) from exc
    return created


def _create_error(name: str, err: KafkaError) -> QrsightError:
    hint = ""
    if err.code() == KafkaError.INVALID_REPLICATION_FACTOR:
        hint = f"; lower {env_name('replication_factor')} to at most the number of brokers"
    elif err.code() in (KafkaError.INVALID_PARTITIONS, KafkaError.INVALID_CONFIG):
        hint = f"; check {env_name('topic_partitions')} and {env_name('replies_partitions')}"
    elif err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
        hint = "; the Kafka user needs CREATE permission on the cluster or topic"
    return KafkaUnavailableError(f"could not create topic {name}: {err.str()}{hint}")


def _wait_for_leaders(
    admin: AdminClient, specs: dict[str, dict[str, Any]], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        topics = admin.list_topics(timeout=timeout_s).topics
        pending = [
            name
            for name in specs
            if name not in topics
            or topics[name].error is not None
            or any(p.leader < 0 for p in topics[name].partitions.values())
        ]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise KafkaUnavailableError(
                f"topics {', '.join(pending)} have no leader after {timeout_s:g} s"
            )
        time.sleep(0.1)


def _describe(
    admin: AdminClient, settings: Settings, specs: dict[str, dict[str, Any]], timeout_s: float
) -> list[TopicState]:
    topics = admin.list_topics(timeout=timeout_s).topics
    present = [name for name in specs if name in topics and topics[name].error is None]
    configs = _topic_configs(admin, present, timeout_s)
    states = []
    for name, spec in specs.items():
        if name not in present:
            states.append(TopicState(name, "missing"))
            continue
        parts = topics[name].partitions
        replication = min((len(p.replicas) for p in parts.values()), default=0)
        shown = {
            k: configs[name].get(k, "?")
            for k in ("max.message.bytes", "retention.ms", "min.insync.replicas")
        }
        problems = _problems(settings, name, spec, len(parts), configs[name])
        for problem in problems:
            logger.warning("topic differs from settings topic=%s problem=%r", name, problem)
        states.append(TopicState(name, "exists", len(parts), replication, shown, problems))
    return states


def _topic_configs(
    admin: AdminClient, names: Sequence[str], timeout_s: float
) -> dict[str, dict[str, str]]:
    if not names:
        return {}
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in names]
    futures = admin.describe_configs(resources, request_timeout=timeout_s)
    return {
        res.name: {k: str(entry.value) for k, entry in fut.result(timeout=timeout_s + 5).items()}
        for res, fut in futures.items()
    }


def _problems(
    settings: Settings, name: str, spec: dict[str, Any], partitions: int, config: dict[str, str]
) -> tuple[str, ...]:
    problems = []
    if partitions < spec["partitions"]:
        setting = "replies_partitions" if name == settings.topic_replies else "topic_partitions"
        problems.append(
            f"{name} has {partitions} partitions, {env_name(setting)} asks for "
            f"{spec['partitions']} (grow it with kafka-topics --alter --partitions)"
        )
    wanted = spec["config"].get("max.message.bytes")
    have = config.get("max.message.bytes", "")
    if wanted is not None and have.isdigit() and int(have) < int(wanted):
        problems.append(
            f"{name} has max.message.bytes={have}, {env_name('max_image_bytes')} needs "
            f"{wanted}: images near the limit will be rejected by the broker"
        )
    return tuple(problems)


@dataclass(frozen=True)
class Grant:
    """One ACL of one role: ``operation`` on a topic, group or transactional id."""

    role: str
    operation: AclOperation
    resource: ResourceType
    name: str
    pattern: ResourcePatternType = ResourcePatternType.LITERAL

    def binding(self, users: dict[str, str]) -> AclBinding:
        return AclBinding(
            self.resource,
            self.name,
            self.pattern,
            f"User:{users[self.role]}",
            "*",
            self.operation,
            AclPermissionType.ALLOW,
        )

    def line(self, users: dict[str, str]) -> str:
        prefixed = "*" if self.pattern == ResourcePatternType.PREFIXED else ""
        return (
            f"User:{users[self.role]} ({self.role}) ALLOW {self.operation.name} "
            f"{self.resource.name.lower()} {self.name}{prefixed}"
        )


def role_acls(
    settings: Settings, reader_group_prefix: str = DEFAULT_READER_GROUP_PREFIX
) -> list[Grant]:
    """Least privilege per role (README, "Running on a secured Kafka").

    The API writes requests, reads its own reply partition by assignment (no group) and
    describes the workers' group to send each request to the least-loaded worker
    (``api.routing``; Describe lets it see members and offsets, not join or commit);
    workers read requests in their group, write results, replies and dead letters, and
    use transactional ids that start with their group's name (``consumer.worker``:
    ``<group>-<host>-<index>``); downstream readers read result events only. Read and
    Write imply Describe; Write on a topic also lets a producer be idempotent (KIP-679).
    """
    read, write, describe = AclOperation.READ, AclOperation.WRITE, AclOperation.DESCRIBE
    topic, group = ResourceType.TOPIC, ResourceType.GROUP
    prefixed = ResourcePatternType.PREFIXED
    return [
        Grant("api", write, topic, settings.topic_images),
        Grant("api", read, topic, settings.topic_replies),
        Grant("api", describe, group, settings.consumer_group),
        Grant("worker", read, topic, settings.topic_images),
        Grant("worker", read, group, settings.consumer_group),
        Grant("worker", write, topic, settings.topic_detections),
        Grant("worker", write, topic, settings.topic_replies),
        Grant("worker", write, topic, settings.topic_dlq),
        Grant(
            "worker", write, ResourceType.TRANSACTIONAL_ID, f"{settings.consumer_group}-", prefixed
        ),
        Grant("reader", read, topic, settings.topic_detections),
        Grant("reader", read, group, reader_group_prefix, prefixed),
    ]


def create_acls(
    settings: Settings,
    users: dict[str, str] | None = None,
    *,
    reader_group_prefix: str = DEFAULT_READER_GROUP_PREFIX,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[str]:
    """Create every role's ACLs (idempotent); return them as readable lines."""
    users = {**DEFAULT_USERS, **(users or {})}
    grants = role_acls(settings, reader_group_prefix)
    admin = connect(settings, timeout_s)
    futures = admin.create_acls([g.binding(users) for g in grants], request_timeout=timeout_s)
    for binding, future in futures.items():
        try:
            future.result(timeout=timeout_s + 5)
        except KafkaException as exc:
            raise _acl_error(settings, binding, exc.args[0]) from exc
    return [g.line(users) for g in grants]


def _acl_error(settings: Settings, binding: AclBinding, err: KafkaError) -> QrsightError:
    hint = ""
    if err.code() == KafkaError.SECURITY_DISABLED:
        hint = "; the broker has no authorizer (authorizer.class.name)"
    elif err.code() == KafkaError.CLUSTER_AUTHORIZATION_FAILED:
        hint = (
            f"; {settings.kafka_sasl_username or 'this user'} is not allowed to create ACLs: "
            "run it as a super user (e.g. with .kafka/clients/admin.env)"
        )
    return KafkaUnavailableError(f"could not create ACL {binding}: {err.str()}{hint}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qrsight-topics",
        description="Create or describe qrsight's Kafka topics, or create each role's ACLs "
        "(settings from QRSIGHT_* env).",
    )
    parser.add_argument("command", choices=["create", "describe", "acls"])
    for role, user in DEFAULT_USERS.items():
        parser.add_argument(
            f"--{role}-user", default=user, help=f"acls: the {role}'s Kafka user (default {user})"
        )
    parser.add_argument(
        "--reader-group-prefix",
        default=DEFAULT_READER_GROUP_PREFIX,
        help="acls: downstream readers' consumer groups start with this "
        f"(default {DEFAULT_READER_GROUP_PREFIX})",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for Kafka"
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        configure_from_settings(settings)
        if args.command == "acls":
            users = {role: getattr(args, f"{role}_user") for role in DEFAULT_USERS}
            lines = create_acls(
                settings,
                users,
                reader_group_prefix=args.reader_group_prefix,
                timeout_s=args.timeout,
            )
            print("\n".join(lines), flush=True)
            return 0
        if args.command == "create":
            states = ensure_topics(settings, timeout_s=args.timeout)
        else:
            states = describe_topics(settings, timeout_s=args.timeout)
    except ConfigError as exc:
        print(f"qrsight-topics: {exc.message}", file=sys.stderr)
        return 2
    except QrsightError as exc:
        print(f"qrsight-topics: {exc.message}", file=sys.stderr)
        return 1
    for state in states:
        print(state.line(), flush=True)
    return 1 if any(s.status == "missing" for s in states) else 0


if __name__ == "__main__":
    sys.exit(main())
