"""Settings from QRSIGHT_* environment variables: parsing, errors that name the variable."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from core.runtime.errors import ConfigError
from core.runtime.settings import (
    KAFKA_PASSTHROUGH_PREFIX,
    Settings,
    env_name,
    load_settings,
    markdown_table,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_defaults_follow_the_design() -> None:
    settings = load_settings({})

    assert settings.kafka_bootstrap is None
    assert (
        settings.topic_images,
        settings.topic_detections,
        settings.topic_replies,
        settings.topic_dlq,
    ) == ("qr.images", "qr.detections", "qr.replies", "qr.images.dlq")
    assert settings.kafka_security_protocol == "PLAINTEXT"
    assert settings.kafka_extra == {}
    assert settings.processing_guarantee == "at_least_once"


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("QRSIGHT_KAFKA_BOOTSTRAP", "k1:9092,k2:9092", "kafka_bootstrap", "k1:9092,k2:9092"),
        ("QRSIGHT_TOPIC_IMAGES", "prod.images", "topic_images", "prod.images"),
        ("QRSIGHT_TOPIC_PARTITIONS", "12", "topic_partitions", 12),
        ("QRSIGHT_REPLIES_PARTITIONS", "32", "replies_partitions", 32),
        ("QRSIGHT_REPLICATION_FACTOR", "3", "replication_factor", 3),
        ("QRSIGHT_REPLIES_RETENTION_MS", "60000", "replies_retention_ms", 60000),
        ("QRSIGHT_MAX_IMAGE_BYTES", "2097152", "max_image_bytes", 2_097_152),
        ("QRSIGHT_KAFKA_SECURITY_PROTOCOL", "SASL_SSL", "kafka_security_protocol", "SASL_SSL"),
        ("QRSIGHT_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512", "kafka_sasl_mechanism", "SCRAM-SHA-512"),
        ("QRSIGHT_SCHEMA_REGISTRY_URL", "http://sr:8081", "schema_registry_url", "http://sr:8081"),
        ("QRSIGHT_DECODE_PAYLOADS", "false", "decode_payloads", False),
        ("QRSIGHT_CONF_THRESHOLD", "0.4", "conf_threshold", 0.4),
        (
            "QRSIGHT_ONNX_PROVIDERS",
            "CUDAExecutionProvider, CPUExecutionProvider",
            "onnx_providers",
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
        ),
        ("QRSIGHT_PROCESSING_GUARANTEE", "exactly_once", "processing_guarantee", "exactly_once"),
        ("qrsight_topic_dlq", "lower.case.name", "topic_dlq", "lower.case.name"),
    ],
)
def test_environment_variables_set_fields(
    variable: str, value: str, field: str, expected: Any
) -> None:
    settings = load_settings({variable: value})

    assert getattr(settings, field) == expected


def test_an_empty_variable_means_the_default() -> None:
    assert load_settings({"QRSIGHT_TOPIC_PARTITIONS": ""}).topic_partitions == 6


def test_overrides_win_over_the_environment() -> None:
    settings = load_settings({"QRSIGHT_TOPIC_IMAGES": "from.env"}, topic_images="from.code")

    assert settings.topic_images == "from.code"


@pytest.mark.parametrize(
    ("variable", "prop"),
    [
        ("QRSIGHT_KAFKA__SSL_CA_LOCATION", "ssl.ca.location"),
        ("QRSIGHT_KAFKA__SOCKET_KEEPALIVE_ENABLE", "socket.keepalive.enable"),
        ("QRSIGHT_KAFKA__CLIENT_RACK", "client.rack"),
        ("qrsight_kafka__linger_ms", "linger.ms"),
    ],
)
def test_any_librdkafka_property_passes_through(variable: str, prop: str) -> None:
    assert load_settings({variable: "v"}).kafka_extra == {prop: "v"}


def test_the_bare_passthrough_prefix_is_ignored() -> None:
    assert load_settings({KAFKA_PASSTHROUGH_PREFIX: "x"}).kafka_extra == {}


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("QRSIGHT_TOPIC_PARTITIONS", "0"),
        ("QRSIGHT_TOPIC_PARTITIONS", "many"),
        ("QRSIGHT_MAX_IMAGE_BYTES", "10MB"),
        ("QRSIGHT_MAX_IMAGE_BYTES", "12"),
        ("QRSIGHT_KAFKA_SECURITY_PROTOCOL", "TLS"),
        ("QRSIGHT_CONF_THRESHOLD", "1.5"),
        ("QRSIGHT_PROCESSING_GUARANTEE", "maybe_once"),
        ("QRSIGHT_DECODE_PAYLOADS", "perhaps"),
        ("QRSIGHT_REPLIES_RETENTION_MS", "10"),
        ("QRSIGHT_API_PORT", "http"),
    ],
)
def test_bad_values_raise_config_error_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(variable)) as caught:
        load_settings({variable: value})

    assert caught.value.code == "config_error"


@pytest.mark.parametrize(
    "environ",
    [
        {"QRSIGHT_PIPELINE_TIMEOUT_S": "300"},
        {"QRSIGHT_KAFKA__MAX_POLL_INTERVAL_MS": "60000"},
    ],
)
def test_a_hang_watchdog_slower_than_group_eviction_is_refused(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)

    message = caught.value.message
    assert "QRSIGHT_PIPELINE_TIMEOUT_S" in message
    assert "QRSIGHT_KAFKA__MAX_POLL_INTERVAL_MS" in message
    assert "Value error" not in message


def test_a_hang_watchdog_below_group_eviction_or_off_is_accepted() -> None:
    assert load_settings({"QRSIGHT_PIPELINE_TIMEOUT_S": "299"}).pipeline_timeout_s == 299
    relaxed = {"QRSIGHT_KAFKA__MAX_POLL_INTERVAL_MS": "600000", "QRSIGHT_PIPELINE_TIMEOUT_S": "500"}
    assert load_settings(relaxed).pipeline_timeout_s == 500
    off = {"QRSIGHT_KAFKA__MAX_POLL_INTERVAL_MS": "60000", "QRSIGHT_PIPELINE_TIMEOUT_S": "0"}
    assert load_settings(off).pipeline_timeout_s == 0


def test_unknown_qrsight_variables_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="core.runtime.settings"):
        load_settings({"QRSIGHT_TOPIC_IMAGE": "typo", "OTHER_THING": "x"})

    assert "QRSIGHT_TOPIC_IMAGE" in caplog.text
    assert "OTHER_THING" not in caplog.text


SECRETS = {
    "QRSIGHT_KAFKA_SASL_PASSWORD": "kafka-pw-5f1e",
    "QRSIGHT_AUTH_JWT_SECRET": "jwt-secret-9a7c",
    "QRSIGHT_SCHEMA_REGISTRY_BASIC_AUTH": "user:sr-pw-3b2d",
}


def test_secrets_stay_out_of_repr_str_and_dumps() -> None:
    settings = load_settings(SECRETS)
    shown = " ".join([repr(settings), str(settings), settings.model_dump_json()])

    for secret in SECRETS.values():
        assert secret not in shown
    assert settings.kafka_sasl_password is not None
    assert settings.kafka_sasl_password.get_secret_value() == SECRETS["QRSIGHT_KAFKA_SASL_PASSWORD"]


def test_settings_are_frozen() -> None:
    settings = load_settings({})

    with pytest.raises(ValidationError):
        settings.topic_images = "changed"  # type: ignore[misc]


def test_every_setting_is_described_and_in_the_table() -> None:
    table = markdown_table()

    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"
        if name != "kafka_extra":
            assert f"`{env_name(name)}`" in table
    assert f"`{KAFKA_PASSTHROUGH_PREFIX}<PROPERTY>`" in table


def test_readme_documents_every_setting() -> None:
    """README's settings table comes from `python3 -m core.runtime.settings`; keep them in step."""
    readme = REPO_ROOT / "README.md"
    assert readme.is_file(), "README.md is missing"
    text = readme.read_text(encoding="utf-8")

    missing = [
        env_name(name)
        for name in Settings.model_fields
        if name != "kafka_extra" and env_name(name) not in text
    ]
    assert missing == [], (
        f"README.md lacks {missing}: paste `python3 -m core.runtime.settings` output"
    )
    assert KAFKA_PASSTHROUGH_PREFIX in text


def test_a_secret_can_come_from_a_file_as_containers_mount_them(tmp_path: Path) -> None:
    secret = tmp_path / "kafka-password"
    secret.write_text("from-a-file\n")
    env = {"QRSIGHT_KAFKA_SASL_PASSWORD_FILE": str(secret)}
    settings = load_settings(env)
    assert settings.kafka_sasl_password is not None
    assert settings.kafka_sasl_password.get_secret_value() == "from-a-file"
    both = load_settings({**env, "QRSIGHT_KAFKA_SASL_PASSWORD": "direct"})
    assert both.kafka_sasl_password is not None
    assert both.kafka_sasl_password.get_secret_value() == "direct"
    with pytest.raises(ConfigError, match="QRSIGHT_AUTH_JWT_SECRET_FILE"):
        load_settings({"QRSIGHT_AUTH_JWT_SECRET_FILE": str(tmp_path / "missing")})
