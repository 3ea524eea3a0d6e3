"""Secrets stay secret: Kafka pass-through properties that name a key, password, secret,
token or credential are SecretStr; neither they nor the broker address reach a response
or a log line (librdkafka's own configuration still gets the real values)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import SecretStr

from core.runtime.kafka import admin_config, consumer_config, producer_config
from core.runtime.settings import Settings, is_secret_property, load_settings
from tests.unit.test_api_helpers import offline_app, png

SECRETS = {
    "QRSIGHT_KAFKA__SSL_KEY_PASSWORD": "pw-ssl-key-4711",
    "QRSIGHT_KAFKA__SSL_KEYSTORE_PASSWORD": "pw-keystore-4712",
    "QRSIGHT_KAFKA__SSL_KEY_PEM": "-----BEGIN PRIVATE KEY-----pem-4713",
    "QRSIGHT_KAFKA__SASL_OAUTHBEARER_CLIENT_SECRET": "oauth-secret-4714",
    "QRSIGHT_KAFKA_SASL_PASSWORD": "sasl-password-4715",
    "QRSIGHT_AUTH_JWT_SECRET": "jwt-secret-4716-long-enough-for-hs256!!",
    "QRSIGHT_SCHEMA_REGISTRY_BASIC_AUTH": "user:registry-4717",
}
BOOTSTRAP = "broker-7.kafka.internal:9093"
ENV = {
    **SECRETS,
    "QRSIGHT_KAFKA_BOOTSTRAP": BOOTSTRAP,
    "QRSIGHT_KAFKA__LINGER_MS": "7",
    "QRSIGHT_KAFKA__SSL_CA_LOCATION": "/etc/ca.pem",
    "QRSIGHT_AUTH_ENABLED": "true",
    "QRSIGHT_RATE_LIMIT": "off",
}


@pytest.mark.parametrize(
    ("prop", "secret"),
    [
        ("ssl.key.password", True),
        ("ssl.keystore.password", True),
        ("ssl.key.pem", True),
        ("sasl.oauthbearer.client.secret", True),
        ("sasl.password", True),
        ("sasl.oauthbearer.token.endpoint.url", True),  # says token: hidden, harmless
        ("ssl.ca.location", False),
        ("linger.ms", False),
        ("client.rack", False),
    ],
)
def test_secret_property_names(prop: str, secret: bool) -> None:
    assert is_secret_property(prop) is secret


def test_settings_never_show_a_secret() -> None:
    settings = load_settings(ENV)
    shown = "\n".join([repr(settings), str(settings), settings.model_dump_json()])
    for value in SECRETS.values():
        assert value not in shown
    assert settings.kafka_extra["linger.ms"] == "7"  # plain properties stay plain


@pytest.mark.parametrize(
    "build",
    [
        producer_config,
        lambda s: consumer_config(s, "group"),
        admin_config,
    ],
    ids=["producer", "consumer", "admin"],
)
def test_every_kafka_client_gets_the_real_values(
    build: Callable[[Settings], dict[str, Any]],
) -> None:
    conf = build(load_settings(ENV))
    assert conf["ssl.key.password"] == SECRETS["QRSIGHT_KAFKA__SSL_KEY_PASSWORD"]
    assert conf["sasl.oauthbearer.client.secret"] == "oauth-secret-4714"
    assert conf["sasl.password"] == SECRETS["QRSIGHT_KAFKA_SASL_PASSWORD"]
    assert conf["linger.ms"] == "7"
    assert not any(isinstance(v, SecretStr) for v in conf.values())


def test_no_secret_or_broker_address_in_responses_or_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    app = offline_app(load_settings(ENV))
    client = app.test_client()
    bodies = [
        client.get("/api/v1/ready"),
        client.get("/api/v1/health"),
        client.post("/api/v1/detect", data=png(), content_type="image/png"),
        client.post(
            "/api/v1/detect",
            data=png(),
            content_type="image/png",
            headers={"Authorization": "Bearer x.y.z"},
        ),
        client.get("/api/v1/openapi.json"),
    ]
    text = "\n".join(r.get_data(as_text=True) + str(r.headers) for r in bodies)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert logged
    for value in [*SECRETS.values(), BOOTSTRAP, BOOTSTRAP.split(":", maxsplit=1)[0]]:
        assert value not in text
        assert value not in logged
