"""Each role's ACLs (``qrsight-topics acls``): least privilege, following the settings."""

from __future__ import annotations

from confluent_kafka.admin import AclOperation, ResourcePatternType, ResourceType

from core.runtime.settings import load_settings
from producer_tools.topics import DEFAULT_USERS, role_acls

READ, WRITE, DESCRIBE = AclOperation.READ, AclOperation.WRITE, AclOperation.DESCRIBE
TOPIC, GROUP, TXN = ResourceType.TOPIC, ResourceType.GROUP, ResourceType.TRANSACTIONAL_ID
LITERAL, PREFIXED = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED


def grants(**overrides: object) -> set[tuple[str, AclOperation, ResourceType, str, object]]:
    settings = load_settings({}, **overrides)
    return {(g.role, g.operation, g.resource, g.name, g.pattern) for g in role_acls(settings)}


def test_each_role_gets_only_what_it_needs() -> None:
    assert grants() == {
        ("api", WRITE, TOPIC, "qr.images", LITERAL),
        ("api", READ, TOPIC, "qr.replies", LITERAL),
        ("api", DESCRIBE, GROUP, "qrsight-workers", LITERAL),
        ("worker", READ, TOPIC, "qr.images", LITERAL),
        ("worker", READ, GROUP, "qrsight-workers", LITERAL),
        ("worker", WRITE, TOPIC, "qr.detections", LITERAL),
        ("worker", WRITE, TOPIC, "qr.replies", LITERAL),
        ("worker", WRITE, TOPIC, "qr.images.dlq", LITERAL),
        ("worker", WRITE, TXN, "qrsight-workers-", PREFIXED),
        ("reader", READ, TOPIC, "qr.detections", LITERAL),
        ("reader", READ, GROUP, "qrsight-results", PREFIXED),
    }


def test_the_acls_follow_renamed_topics_and_group() -> None:
    renamed = grants(topic_images="in", topic_replies="back", consumer_group="g")
    assert ("api", WRITE, TOPIC, "in", LITERAL) in renamed
    assert ("api", READ, TOPIC, "back", LITERAL) in renamed
    assert ("api", DESCRIBE, GROUP, "g", LITERAL) in renamed  # api.routing
    assert (
        "worker",
        WRITE,
        TXN,
        "g-",
        PREFIXED,
    ) in renamed  # transactional.id = <group>-<host>-<i>


def test_no_role_may_write_where_another_role_reads_its_answers() -> None:
    table = grants()
    writers_of_replies = {
        role for role, op, _, name, _ in table if op == WRITE and name == "qr.replies"
    }
    assert writers_of_replies == {"worker"}
    assert not any(role == "reader" and op == WRITE for role, op, *_ in table)


def test_each_grant_reads_as_a_line_with_the_user() -> None:
    settings = load_settings({})
    lines = [g.line({**DEFAULT_USERS, "api": "svc-api"}) for g in role_acls(settings)]
    assert "User:svc-api (api) ALLOW WRITE topic qr.images" in lines
    assert "User:worker (worker) ALLOW WRITE transactional_id qrsight-workers-*" in lines
