"""qrsight on a secured broker: TLS, SASL/SCRAM-SHA-512 and an authorizer that refuses
what no ACL allows (``KAFKA_SECURITY=sasl_ssl deploy/local/kafka.sh up``).

The broker is this module's own (a free port, a temporary home); each role runs with
the settings ``kafka.sh`` wrote for it to ``clients/<role>.env``, exactly as a user
sources them. Every process's output, ``/ready`` and the metrics are checked for the
passwords, which must never show.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from confluent_kafka import Consumer, KafkaError, Producer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from api.routing import Router
from core.runtime.kafka import consumer_config, producer_config
from core.runtime.settings import Settings, load_settings
from tests.integration.api_stack import free_port, model_path, qr_png, start

REPO = Path(__file__).resolve().parents[2]
KAFKA_SH = REPO / "deploy" / "local" / "kafka.sh"
ROLES = ("api", "worker", "reader", "admin")
START_TIMEOUT_S = 900  # a cold start fetches the jars first
EXIT_CONFIG = 78
REFUSAL_S = 30.0  # a refused client says so within this, never retries for ever
WRONG_PASSWORD = "wrong-password-that-must-not-leak-0123456789"


@dataclass
class SecuredBroker:
    home: Path
    port: int
    roles: dict[str, dict[str, str]]
    outputs: list[str] = field(default_factory=list)  # every text a test captured

    def settings(self, role: str, **overrides: object) -> Settings:
        return load_settings(self.roles[role], **overrides)

    def env(self, role: str, **extra: str) -> dict[str, str]:
        """A child's environment: the role's settings file and ``extra``, no other QRSIGHT_*."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("QRSIGHT_")}
        env.update(self.roles[role])
        env.update(extra)
        env["PYTHONPATH"] = str(REPO)
        return env

    def passwords(self) -> list[str]:
        found = [env["QRSIGHT_KAFKA_SASL_PASSWORD"] for env in self.roles.values()]
        keystore = (self.home / "security" / "keystore.password").read_text().strip()
        return [*found, keystore, WRONG_PASSWORD]

    def assert_no_secret(self, *texts: str) -> None:
        self.outputs.extend(texts)
        for text in texts:
            for secret in self.passwords():
                assert secret not in text, "a password appears in captured output"


def _sourced(path: Path) -> dict[str, str]:
    """The variables a shell gets from sourcing ``path`` (parsed as the shell would)."""
    values = {}
    for line in path.read_text().splitlines():
        name, _, value = line.partition("=")
        assert name.startswith("QRSIGHT_"), line
        values[name] = shlex.split(value)[0] if value else ""
    return values


# One broker for the module, stopped when it ends (the other suites never need it).
@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredBroker]:
    home = tmp_path_factory.mktemp("kafka-secured")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRSIGHT_")}
    env.update(
        KAFKA_HOME_DIR=str(home),
        QRSIGHT_KAFKA_PORT=str(port),
        KAFKA_SECURITY="sasl_ssl",
        KAFKA_START_TIMEOUT=os.environ.get("KAFKA_START_TIMEOUT", "180"),
        PYTHONPATH=str(REPO),
    )
    env.pop("KAFKA_CONTROLLER_PORT", None)
    up = subprocess.run(
        [str(KAFKA_SH), "up"],
        env=env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )
    if up.returncode != 0:
        subprocess.run(
            [str(KAFKA_SH), "down"], env=env, capture_output=True, timeout=60, check=False
        )
        pytest.fail(f"secured broker did not start:\n{up.stdout}\n{up.stderr}", pytrace=False)
    roles = {role: _sourced(home / "clients" / f"{role}.env") for role in ROLES}
    broker = SecuredBroker(home, port, roles)
    broker.assert_no_secret(up.stdout, up.stderr)
    try:
        yield broker
    finally:
        subprocess.run(
            [str(KAFKA_SH), "down"], env=env, capture_output=True, timeout=60, check=False
        )
        server_log = home / "logs" / "server.log"
        if server_log.exists():  # the broker's own log never shows a client's password either
            broker.assert_no_secret(server_log.read_text(errors="replace"))


# --- helpers ------------------------------------------------------------------------------
def produce_error(settings: Settings, role: str, topic: str) -> KafkaError | None:
    """The delivery report's error of one record (None when the broker took it)."""
    reports: list[KafkaError | None] = []
    producer = Producer(producer_config(settings, role, **{"message.timeout.ms": 15_000}))
    producer.produce(topic, b"probe", on_delivery=lambda err, _msg: reports.append(err))
    producer.flush(20)
    assert reports, f"no delivery report for {topic} within 20 s"
    return reports[0]


def subscribe(settings: Settings, role: str, topic: str, group: str) -> KafkaError | str:
    """The first error a subscriber of ``topic`` gets within REFUSAL_S, or "assigned"."""
    consumer = Consumer(consumer_config(settings, group, role))
    consumer.subscribe([topic])
    deadline = time.monotonic() + REFUSAL_S
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is not None:
                return msg.error()
            if consumer.assignment():
                return "assigned"
        return "neither an error nor an assignment"
    finally:
        consumer.close()


def first_result(settings: Settings, group: str, timeout_s: float = 30) -> bytes:
    """The first record on qr.detections, read with the reader's settings."""
    consumer = Consumer(consumer_config(settings, group, "reader"))
    consumer.subscribe([settings.topic_detections])
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            return msg.value() or b""
        raise AssertionError("no result on qr.detections for the reader")
    finally:
        consumer.close()


def expired_copy_of_ca(home: Path, out: Path) -> Path:
    """The broker's CA, same name and key, but expired yesterday: a client trusting it
    sees the broker's certificate chain fail with "certificate has expired"."""
    security = home / "security"
    key = serialization.load_pem_private_key((security / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((security / "ca.pem").read_bytes())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(ca.subject)
        .issuer_name(ca.subject)
        .public_key(ca.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
    )
    for ext in ca.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    cert = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out


def run_until_exit(cmd: list[str], env: dict[str, str], log: Path, timeout_s: float) -> int:
    proc = start(cmd, env, log)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"still running after {timeout_s:g} s:\n{log.read_text()}") from None


def api_process(
    secured: SecuredBroker, tmp: Path, **extra: str
) -> tuple[str, subprocess.Popen[bytes], Path]:
    port = free_port()
    env = secured.env(
        "api",
        QRSIGHT_API_HOST="127.0.0.1",
        QRSIGHT_API_PORT=str(port),
        QRSIGHT_API_WORKERS="1",
        QRSIGHT_API_THREADS="8",
        PROMETHEUS_MULTIPROC_DIR=str(tmp / f"metrics-{port}"),
        **extra,
    )
    log = tmp / f"api-{port}.log"
    return f"http://127.0.0.1:{port}", start([sys.executable, "-m", "api.cli"], env, log), log


def ready_answer(url: str, timeout_s: float, until: str) -> tuple[int, str]:
    """Poll /ready until its body contains ``until`` (or the timeout); the last answer."""
    deadline = time.monotonic() + timeout_s
    last = (0, "")
    while time.monotonic() < deadline:
        try:
            response = requests.get(f"{url}/api/v1/ready", timeout=5)
            last = (response.status_code, response.text)
            if until in response.text:
                return last
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    return last


def detect_until_ok(url: str, text: str, worker_log: Path) -> tuple[requests.Response, list]:
    """POST a QR code reading ``text`` until it is answered 200 (504s while the worker
    starts), at most 120 s; the response and its results."""
    image, _box = qr_png(text)
    deadline = time.monotonic() + 120
    while True:
        response = requests.post(
            f"{url}/api/v1/detect?timeout_ms=20000",
            data=image,
            headers={"Content-Type": "image/png"},
            timeout=40,
        )
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        assert response.status_code == 504, response.text  # the worker is still starting
    assert response.status_code == 200, f"{response.text}\n{worker_log.read_text()[-3000:]}"
    results = response.json()["results"]
    assert results, response.text
    return response, results


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- end to end -------------------------------------------------------------------------
def test_api_and_worker_with_their_own_credentials_return_a_result(
    secured: SecuredBroker, tmp_path: Path
) -> None:
    model, real = model_path(tmp_path)
    worker_env = secured.env(
        "worker",
        QRSIGHT_MODEL_PATH=str(model),
        QRSIGHT_METRICS_PORT=str(free_port()),
        QRSIGHT_ORT_INTRA_THREADS="1",
        # transactions: the worker's transactional id must match its ACL's prefix too
        QRSIGHT_PROCESSING_GUARANTEE="exactly_once",
    )
    worker_log = tmp_path / "worker.log"
    worker = start([sys.executable, "-m", "consumer.cli", "--workers", "1"], worker_env, worker_log)
    url, api, api_log = api_process(secured, tmp_path)
    try:
        status, body = ready_answer(url, 120, until='"ready"')
        assert status == 200, f"{body}\n{api_log.read_text()[-3000:]}"
        response, results = detect_until_ok(url, "secured-hello", worker_log)
        if real:
            assert "secured-hello" in {r["text"] for r in results}
        reader = secured.settings("reader")
        assert first_result(reader, "qrsight-results-e2e")  # downstream readers get it too
        # the API may describe the workers' group: it routes to the least-loaded worker
        api_router = Router(secured.settings("api"))
        assert api_router.refresh(timeout_s=10), api_router.owners()
        (owned,) = api_router.owners().values()  # the one worker owns every partition
        assert len(owned) == secured.settings("api").topic_partitions
        metrics = requests.get(f"{url}/api/v1/metrics", timeout=10).text
        secured.assert_no_secret(body, response.text, metrics)
    finally:
        stop(api)
        stop(worker)
    secured.assert_no_secret(api_log.read_text(), worker_log.read_text())


# --- each role refused where it must be ----------------------------------------------------
@pytest.mark.parametrize(
    ("role", "topic"),
    [("api", "qr.detections"), ("api", "qr.replies"), ("reader", "qr.images")],
)
def test_a_role_cannot_write_a_topic_it_does_not_own(
    secured: SecuredBroker, role: str, topic: str
) -> None:
    started = time.monotonic()
    err = produce_error(secured.settings(role), role, topic)
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err
    assert time.monotonic() - started < REFUSAL_S


def test_the_reader_cannot_read_replies_but_reads_detections(secured: SecuredBroker) -> None:
    reader = secured.settings("reader")
    err = subscribe(reader, "reader", "qr.replies", "qrsight-results-replies")
    assert isinstance(err, KafkaError), err
    assert err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err
    assert "qr.replies" in err.str()
    assert subscribe(reader, "reader", "qr.detections", "qrsight-results-ok") == "assigned"


def test_routing_without_describe_on_the_group_goes_by_key_saying_which_acl(
    secured: SecuredBroker, caplog: pytest.LogCaptureFixture
) -> None:
    router = Router(secured.settings("api", consumer_group="not-granted-to-the-api"))
    with caplog.at_level("WARNING", logger="api.routing"):
        assert router.refresh(timeout_s=10) is False
    assert router.acquire() is None
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "described no consumer group not-granted-to-the-api" in said, said
    assert "not allowed to describe it (grant Describe on it: qrsight-topics acls" in said


def test_a_worker_without_read_access_exits_naming_the_permission(
    secured: SecuredBroker, tmp_path: Path
) -> None:
    """The reader's credentials in a worker: no crash loop, one exit naming what is missing."""
    env = secured.env("reader", QRSIGHT_METRICS_PORT="0", QRSIGHT_ORT_INTRA_THREADS="1")
    log = tmp_path / "worker.log"
    code = run_until_exit([sys.executable, "-m", "consumer.cli", "--workers", "1"], env, log, 120)
    text = log.read_text()
    assert code == EXIT_CONFIG, text
    assert "Kafka user 'reader' is not allowed to read" in text
    assert text.count("worker started worker=0 pid=") == 1, "restarted instead of giving up"
    secured.assert_no_secret(text)


def test_a_worker_that_may_read_but_not_write_exits_naming_the_permission(
    secured: SecuredBroker, tmp_path: Path
) -> None:
    """A user who may read its input but write nowhere gets no producer id: the worker's
    first answer fails for good, and it exits once, naming the grant, instead of
    restarting. (The reader may read results in a group of its prefix: fed those as
    input, the worker has records to answer and nowhere it may answer them.)"""
    fed = Producer(producer_config(secured.settings("worker")))
    fed.produce("qr.detections", key=b"not-an-image", value=b"not an image either")
    assert fed.flush(30) == 0
    env = secured.env(
        "reader",
        QRSIGHT_METRICS_PORT="0",
        QRSIGHT_ORT_INTRA_THREADS="1",
        QRSIGHT_TOPIC_IMAGES="qr.detections",
        QRSIGHT_CONSUMER_GROUP="qrsight-results-fed-to-a-worker",
    )
    log = tmp_path / "worker.log"
    code = run_until_exit([sys.executable, "-m", "consumer.cli", "--workers", "1"], env, log, 120)
    text = log.read_text()
    assert code == EXIT_CONFIG, text
    assert "Kafka user 'reader' is not allowed to write to cluster kafka-cluster" in text, text
    assert text.count("worker started worker=0 pid=") == 1, "restarted instead of giving up"
    secured.assert_no_secret(text)


# --- start-up errors ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong_password", "Kafka refused the credentials of user 'worker'"),
        ("expired_ca", "certificate has expired"),
    ],
)
def test_a_refused_worker_exits_within_seconds_saying_why(
    secured: SecuredBroker, tmp_path: Path, case: str, expected: str
) -> None:
    extra = {"QRSIGHT_METRICS_PORT": "0"}
    if case == "wrong_password":
        extra["QRSIGHT_KAFKA_SASL_PASSWORD"] = WRONG_PASSWORD
    else:
        ca = expired_copy_of_ca(secured.home, tmp_path / "expired-ca.pem")
        extra["QRSIGHT_KAFKA_SSL_CA_LOCATION"] = str(ca)
    log = tmp_path / "worker.log"
    started = time.monotonic()
    code = run_until_exit(
        [sys.executable, "-m", "consumer.cli", "--workers", "1"],
        secured.env("worker", **extra),
        log,
        90,
    )
    text = log.read_text()
    assert code == EXIT_CONFIG, text
    assert expected in text
    assert time.monotonic() - started < 60, "took too long to give up"
    secured.assert_no_secret(text)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong_password", "Kafka refused the credentials of user 'api'"),
        ("expired_ca", "certificate has expired"),
    ],
)
def test_a_refused_api_says_why_in_ready(
    secured: SecuredBroker, tmp_path: Path, case: str, expected: str
) -> None:
    if case == "wrong_password":
        extra = {"QRSIGHT_KAFKA_SASL_PASSWORD": WRONG_PASSWORD}
    else:
        ca = expired_copy_of_ca(secured.home, tmp_path / "expired-ca.pem")
        extra = {"QRSIGHT_KAFKA_SSL_CA_LOCATION": str(ca)}
    url, api, log = api_process(secured, tmp_path, **extra)
    try:
        status, body = ready_answer(url, 60, until=expected)
        assert status == 503, body
        assert expected in body, f"{body}\n{log.read_text()[-3000:]}"
        assert f"127.0.0.1:{secured.port}" not in body  # no broker address in /ready
        metrics = requests.get(f"{url}/api/v1/metrics", timeout=10).text
        secured.assert_no_secret(body, metrics)
    finally:
        stop(api)
    secured.assert_no_secret(log.read_text())
