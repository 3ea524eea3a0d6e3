"""Why a secured Kafka refuses this client, in words an operator can act on.

librdkafka retries a refused login or a failed TLS handshake for ever, reporting it only
through its error callback and log, so a process with a wrong password or an expired
certificate would look like one waiting for a slow broker. :func:`connection_problem`
asks the broker once, within seconds, and names the cause and the setting to fix; the
workers refuse to start on it (:func:`check_connection`) and the API's ``/ready`` shows it.
:func:`authorization_problem` names the ACL a refused request lacks.

The texts carry neither a password nor the broker's address (they reach ``/ready``).
core stays free of the Kafka client: the caller passes its ``AdminClient`` class, and
errors are read by their librdkafka name (``KafkaError.name()``) and text.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from core.runtime.errors import ConfigError
from core.runtime.kafka import admin_config
from core.runtime.settings import Settings, env_name

CHECK_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 3.0
AUTH_ERRORS = frozenset({"_AUTHENTICATION", "SASL_AUTHENTICATION_FAILED"})
TLS_ERRORS = frozenset({"_SSL"})
AUTHORIZATION_ERRORS = {
    "TOPIC_AUTHORIZATION_FAILED": "topic",
    "GROUP_AUTHORIZATION_FAILED": "group",
    "TRANSACTIONAL_ID_AUTHORIZATION_FAILED": "transactional id",
    "CLUSTER_AUTHORIZATION_FAILED": "cluster",
}


class ClientError(Protocol):
    """What is read of a ``confluent_kafka.KafkaError``."""

    def name(self) -> str: ...

    def str(self) -> str: ...


class AdminLike(Protocol):
    def list_topics(self, *args: Any, **kwargs: Any) -> Any: ...

    def poll(self, timeout: float) -> Any: ...


# librdkafka prefixes a broker's errors with its address and ends them with timings; some
# name the broker inside ("... PID from broker sasl_ssl://host:9093/1: Broker: ...").
_BROKER_PREFIX = re.compile(r"^\S+://\S+: ")
_BROKER_INSIDE = re.compile(r" [a-z_]+://\S+?(?=: | |$)")
_TIMING_SUFFIX = re.compile(r" \(after \d+ms in state \w+\)$")


def connection_problem(
    settings: Settings,
    role: str,
    admin_client: Callable[[dict[str, Any]], AdminLike],
    timeout_s: float = CHECK_TIMEOUT_S,
) -> str | None:
    """What makes the broker refuse this client (credentials, TLS), or None when it
    answers, or does not answer at all within ``timeout_s`` (not a security problem).

    ``admin_client`` is ``confluent_kafka.admin.AdminClient``. Without TLS or SASL there
    is nothing to refuse: None at once."""
    if settings.kafka_security_protocol == "PLAINTEXT":
        return None
    errors: list[ClientError] = []
    conf = admin_config(settings, error_cb=errors.append)
    conf["client.id"] = f"{settings.kafka_client_id}-{role}-check"
    admin = admin_client(conf)
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            admin.list_topics(timeout=min(1.0, remaining))
            return None
        except Exception:  # KafkaException: no answer yet; error_cb says why
            admin.poll(0)
        problem = security_problem(settings, errors)
        if problem is not None:
            return problem
    return None


def check_connection(
    settings: Settings,
    role: str,
    admin_client: Callable[[dict[str, Any]], AdminLike],
    timeout_s: float = CHECK_TIMEOUT_S,
) -> None:
    """Raise :class:`ConfigError` when the broker refuses this client's credentials or TLS."""
    problem = connection_problem(settings, role, admin_client, timeout_s)
    if problem is not None:
        raise ConfigError(problem)


def security_problem(settings: Settings, errors: Sequence[ClientError]) -> str | None:
    """The first login or TLS failure among librdkafka's errors, described."""
    for err in errors:
        if err.name() in AUTH_ERRORS:
            return (
                f"Kafka refused the credentials of user {settings.kafka_sasl_username!r} "
                f"({reason(err)}): check {env_name('kafka_sasl_username')}, "
                f"{env_name('kafka_sasl_password')} and {env_name('kafka_sasl_mechanism')}"
            )
        if err.name() in TLS_ERRORS:
            return (
                f"TLS with Kafka failed ({tls_verify_problem(settings) or reason(err)}): check "
                f"{env_name('kafka_ssl_ca_location')} and the broker's certificate"
            )
        if "security.protocol" in err.str():  # e.g. PLAINTEXT against a TLS listener
            return (
                f"Kafka closed the connection ({reason(err)}): check "
                f"{env_name('kafka_security_protocol')} against the broker's listener"
            )
    return None


def reason(err: ClientError) -> str:
    """librdkafka's text without the broker's address and the state timings."""
    text = _TIMING_SUFFIX.sub("", _BROKER_PREFIX.sub("", err.str()))
    return _BROKER_INSIDE.sub("", text).strip()


def tls_verify_problem(settings: Settings) -> str | None:
    """Why the first bootstrap broker's certificate fails verification against the
    configured CA (e.g. "certificate has expired"), which librdkafka's error leaves out."""
    host, _, port = (settings.kafka_bootstrap or "").split(",")[0].strip().rpartition(":")
    ca = settings.kafka_ssl_ca_location
    context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    try:
        with (
            socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S) as sock,
            context.wrap_socket(sock, server_hostname=host),
        ):
            return None
    except ssl.SSLCertVerificationError as exc:
        return f"the broker's certificate could not be verified: {exc.verify_message}"
    except (OSError, ValueError):
        return None


def authorization_problem(settings: Settings, err: ClientError, operation: str, name: str) -> str:
    """A refused request, naming the user, the operation and the resource it lacks."""
    resource = AUTHORIZATION_ERRORS.get(err.name(), "resource")
    user = settings.kafka_sasl_username or "this client"
    return (
        f"Kafka user {user!r} is not allowed to {operation} {resource} {name} "
        f"({reason(err)}): grant it with `qrsight-topics acls` "
        '(README, "Running on a secured Kafka")'
    )


def is_authorization_error(err: ClientError) -> bool:
    return err.name() in AUTHORIZATION_ERRORS
