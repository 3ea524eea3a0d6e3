"""core.runtime.logs: one format for every process, request fields on every line, secrets masked.

The processes themselves (gunicorn and its loggers, the workers) are checked end to end in
tests/integration/test_tracing.py."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from collections.abc import Iterator

import pytest

from core.runtime import logs
from core.runtime.errors import ConfigError
from core.runtime.settings import load_settings

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TEXT_LINE = re.compile(
    r"^ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=(\w+) logger=(\S+) pid=\d+ (.*)$"
)


@pytest.fixture
def root() -> Iterator[logging.Logger]:
    """The root logger, restored afterwards (pytest's own capture handlers included)."""
    logger = logging.getLogger()
    saved, level = logger.handlers[:], logger.level
    yield logger
    logger.handlers[:] = saved
    logger.setLevel(level)


def capture(fmt: str, secrets: tuple[str, ...] = (), level: str = "DEBUG") -> io.StringIO:
    out = io.StringIO()
    logs.configure_logging(level, fmt, secrets=secrets, stream=out)
    return out


def test_text_lines_are_key_value_with_the_request_fields(root: logging.Logger) -> None:
    out = capture("text")
    log = logging.getLogger("qrsight.test")
    log.info("before")
    with logs.log_fields(request_id="r-1", trace_id=TRACE):
        log.info("detect request bytes=%d", 42)
        log.info("bad input request_id=%s code=x", "r-1")
    log.info("after")
    lines = out.getvalue().splitlines()
    parsed = [TEXT_LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [m.group(3) for m in parsed if m] == [
        "before",
        f"detect request bytes=42 request_id=r-1 trace_id={TRACE}",
        f"bad input request_id=r-1 code=x trace_id={TRACE}",  # no second request_id
        "after",
    ]
    assert {(m.group(1), m.group(2)) for m in parsed if m} == {("INFO", "qrsight.test")}


def test_json_lines_carry_fields_extras_and_tracebacks(root: logging.Logger) -> None:
    out = capture("json")
    log = logging.getLogger("qrsight.test")
    with logs.log_fields(request_id="r-2", trace_id=TRACE):
        log.warning("reply late ms=%d", 12, extra={"partition": 3})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    log.info("idle", extra={"request_id": "from-extra"})
    first, second, third = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "reply late ms=12"
    assert (first["level"], first["logger"], first["partition"]) == ("WARNING", "qrsight.test", 3)
    assert (first["request_id"], first["trace_id"]) == ("r-2", TRACE)
    assert first["ts"].endswith("Z") and isinstance(first["pid"], int)
    assert "ValueError: boom" in second["exception"] and second["request_id"] == "r-2"
    assert third["request_id"] == "from-extra" and "trace_id" not in third


def test_fields_stay_in_their_own_thread(root: logging.Logger) -> None:
    out = capture("json")
    log = logging.getLogger("qrsight.test")
    entered, done = threading.Event(), threading.Event()

    def other() -> None:
        entered.wait(5)
        log.info("other thread")
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with logs.log_fields(request_id="mine"):
        entered.set()
        done.wait(5)
        log.info("this thread")
    thread.join()
    by_message = {d["message"]: d for d in map(json.loads, out.getvalue().splitlines())}
    assert "request_id" not in by_message["other thread"]
    assert by_message["this thread"]["request_id"] == "mine"


SECRETS = {
    "QRSIGHT_AUTH_JWT_SECRET": "jwt-secret-value-0123456789",
    "QRSIGHT_KAFKA_SASL_PASSWORD": "sasl-pass-value-9876",
    "QRSIGHT_SCHEMA_REGISTRY_BASIC_AUTH": "registry-user:registry-pass-4242",
    "QRSIGHT_KAFKA__SSL_KEY_PASSWORD": "ssl-key-pass-5555",
}


def test_secret_settings_never_reach_a_line(root: logging.Logger) -> None:
    settings = load_settings({**SECRETS, "QRSIGHT_LOG_FORMAT": "json"})
    assert settings.log_format == "json"
    out = io.StringIO()
    logs.configure_from_settings(settings, stream=out)
    log = logging.getLogger("qrsight.test")
    log.error("config %s", {k: v for k, v in SECRETS.items()})
    log.info("url https://registry-user:registry-pass-4242@registry/ and %r", settings)
    text = out.getvalue()
    for value in [*SECRETS.values(), "registry-pass-4242"]:
        assert value not in text
    assert text.count(logs.MASK) >= len(SECRETS)


def test_short_secrets_are_not_masked_everywhere() -> None:
    formatter = logs.TextFormatter(secrets=["abc", "long-enough"])
    assert formatter.mask("abc long-enough") == f"abc {logs.MASK}"


def test_log_format_is_checked_by_the_settings() -> None:
    with pytest.raises(ConfigError, match="QRSIGHT_LOG_FORMAT"):
        load_settings({"QRSIGHT_LOG_FORMAT": "xml"})
    assert load_settings({}).log_format == "text"
