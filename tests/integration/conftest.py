"""A real Kafka broker for the integration tests: never a fake.

``kafka_bootstrap`` (session) is ``QRSIGHT_KAFKA_BOOTSTRAP`` when set, else a broker
that ``deploy/local/kafka.sh`` starts on a free port with its own data dir under
pytest's temp dir, stopped when the session ends. ``kafka_settings`` gives each test
fresh topic names and a fresh group id, with the topics already created.
Every test in this folder is marked ``integration``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core.runtime.settings import Settings
from producer_tools.topics import create_topics
from tests.integration.kafka_topics import delete_topics, fresh_settings

HERE = Path(__file__).resolve().parent
KAFKA_SH = HERE.parent.parent / "deploy" / "local" / "kafka.sh"
START_TIMEOUT_S = 900  # a cold start fetches the jars first


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kafka_sh(
    command: str, env: dict[str, str], timeout_s: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KAFKA_SH), command],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("QRSIGHT_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    port = _free_port()
    env = {
        **os.environ,
        "KAFKA_HOME_DIR": str(tmp_path_factory.mktemp("kafka")),
        "QRSIGHT_KAFKA_PORT": str(port),
        # CI machines can be busy; a slow start is not a failure of the code under test.
        "KAFKA_START_TIMEOUT": os.environ.get("KAFKA_START_TIMEOUT", "180"),
    }
    env.pop("KAFKA_CONTROLLER_PORT", None)
    started = _kafka_sh("up", env, START_TIMEOUT_S)
    if started.returncode != 0:
        _kafka_sh("down", env, 60)
        pytest.fail(
            f"could not start the test broker with {KAFKA_SH} up "
            f"(exit {started.returncode}):\n{started.stdout}\n{started.stderr}",
            pytrace=False,
        )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        _kafka_sh("down", env, 60)


@pytest.fixture
def kafka_settings(kafka_bootstrap: str, uid: str) -> Iterator[Settings]:
    """Settings with fresh topics (created) and a fresh group id."""
    settings = fresh_settings(kafka_bootstrap, uid)
    create_topics(settings)
    yield settings
    delete_topics(settings)


@pytest.fixture
def kafka_settings_factory(kafka_bootstrap: str) -> Iterator[Callable[..., Settings]]:
    """``make(**overrides)``: more settings with fresh topics, e.g. ``max_image_bytes=...``."""
    made: list[Settings] = []

    def make(**overrides: object) -> Settings:
        settings = fresh_settings(kafka_bootstrap, uuid.uuid4().hex[:12], **overrides)
        create_topics(settings)
        made.append(settings)
        return settings

    yield make
    for settings in made:
        delete_topics(settings)
