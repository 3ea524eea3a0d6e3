"""``qrsight-api``: run the API under gunicorn with ``api/gunicorn.conf.py``.

Settings come from ``QRSIGHT_*`` variables; extra arguments go to gunicorn as they are
(e.g. ``qrsight-api --reload``). The settings are checked here first, so a bad one
(e.g. auth on without a key) stops the start with a message naming it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from api.auth import JwtVerifier
from api.slots import base_partition
from core.runtime.errors import ConfigError
from core.runtime.logs import configure_from_settings
from core.runtime.settings import env_name, load_settings
from core.runtime.telemetry import setup_tracing

CONFIG = Path(__file__).with_name("gunicorn.conf.py")
logger = logging.getLogger(__name__)


def gunicorn_argv(extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-c", str(CONFIG), *extra, "api.wsgi:app"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        settings = load_settings()
        configure_from_settings(settings)  # start-up warnings in the log's own format
        JwtVerifier.from_settings(settings)
        base_partition(settings)  # on Kubernetes: a distinct reply partition per pod, or stop
        setup_tracing("qrsight-api")  # checks the OTEL_* settings; each worker sets up its own
        if not settings.kafka_bootstrap:
            raise ConfigError(f"no Kafka broker configured: set {env_name('kafka_bootstrap')}")
    except ConfigError as exc:
        sys.stderr.write(f"qrsight-api: {exc.message}\n")
        return 2
    command = gunicorn_argv(args)
    os.execv(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
