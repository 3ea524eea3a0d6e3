"""WSGI entry point for gunicorn: ``gunicorn -c api/gunicorn.conf.py api.wsgi:app``.

Imported in each worker after the fork (never preloaded: librdkafka's threads do not
survive a fork), so every worker gets its own Kafka clients and reply partition. When the
worker's reply reader cannot be kept running, the worker stops itself (SIGTERM: a
graceful exit) and the gunicorn master starts a fresh one in its slot.
"""

from __future__ import annotations

import logging
import os
import signal

from api.app import create_app
from core.runtime.logs import configure_from_settings
from core.runtime.settings import load_settings
from core.runtime.telemetry import setup_tracing

logger = logging.getLogger(__name__)


def stop_this_worker() -> None:
    logger.critical("stopping this gunicorn worker pid=%s: the master replaces it", os.getpid())
    os.kill(os.getpid(), signal.SIGTERM)


settings = load_settings()
configure_from_settings(settings)
setup_tracing("qrsight-api")
app = create_app(settings, on_reply_failure=stop_this_worker)
