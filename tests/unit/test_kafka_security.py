"""The words a refused Kafka client reports: the cause and the setting to fix, never a
password or the broker's address (they reach /ready and the logs)."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from core.runtime.kafka_security import authorization_problem, reason, security_problem
from core.runtime.settings import load_settings

PASSWORD = "s3cret-password-never-shown"
SETTINGS = load_settings(
    {},
    kafka_bootstrap="broker.example:9093",
    kafka_security_protocol="SASL_SSL",
    kafka_sasl_mechanism="SCRAM-SHA-512",
    kafka_sasl_username="api",
    kafka_sasl_password=PASSWORD,
)
AUTH = KafkaError(
    KafkaError._AUTHENTICATION,
    "sasl_ssl://broker.example:9093/bootstrap: SASL authentication error: Authentication "
    "failed during authentication due to invalid credentials with SASL mechanism "
    "SCRAM-SHA-512 (after 339ms in state AUTH_REQ)",
)
TLS = KafkaError(
    KafkaError._SSL,
    "sasl_ssl://broker.example:9093/bootstrap: SSL handshake failed: certificate verify "
    "failed (after 15ms in state SSL_HANDSHAKE)",
)
PROTOCOL = KafkaError(
    KafkaError._TRANSPORT,
    "plaintext://broker.example:9093/bootstrap: Disconnected while requesting ApiVersion: "
    "might be caused by incorrect security.protocol configuration (connecting to a SSL "
    "listener?) or broker version is < 0.10 (after 3ms in state APIVERSION_QUERY)",
)
DOWN = KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down")


@pytest.mark.parametrize(
    ("errors", "names"),
    [
        ([DOWN, AUTH], ["credentials of user 'api'", "QRSIGHT_KAFKA_SASL_PASSWORD"]),
        ([TLS], ["TLS with Kafka failed", "QRSIGHT_KAFKA_SSL_CA_LOCATION"]),
        ([PROTOCOL], ["QRSIGHT_KAFKA_SECURITY_PROTOCOL"]),
    ],
)
def test_a_refused_login_or_handshake_names_the_setting(
    errors: list[KafkaError], names: list[str]
) -> None:
    problem = security_problem(SETTINGS, errors)
    assert problem is not None
    for name in names:
        assert name in problem
    assert PASSWORD not in problem
    assert "broker.example" not in problem


def test_an_unreachable_broker_is_not_a_security_problem() -> None:
    assert security_problem(SETTINGS, [DOWN]) is None


def test_reason_drops_the_broker_address_and_timings() -> None:
    assert reason(AUTH).startswith("SASL authentication error: Authentication failed")
    assert "after 339ms" not in reason(AUTH)
    fatal = KafkaError(
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        "Failed to acquire idempotence PID from broker sasl_ssl://broker.example:9093/1: "
        "Broker: Cluster authorization failed",
    )
    assert reason(fatal) == (
        "Failed to acquire idempotence PID from broker: Broker: Cluster authorization failed"
    )


def test_a_refused_request_names_the_user_operation_and_resource() -> None:
    err = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "Broker: Topic authorization failed")
    problem = authorization_problem(SETTINGS, err, "read", "qr.replies")
    assert "user 'api' is not allowed to read topic qr.replies" in problem
    assert "qrsight-topics acls" in problem
