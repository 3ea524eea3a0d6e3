"""WSGI entry point for gunicorn: ``gunicorn -c api/gunicorn.conf.py api.wsgi:app``.

Imported in each worker after the fork (never preloaded: librdkafka's threads do not
survive a fork), so every worker gets its own Kafka clients and reply partition.
"""

from __future__ import annotations

from api.app import create_app
from core.logs import configure_from_settings
from core.settings import load_settings
from core.telemetry import setup_tracing

settings = load_settings()
configure_from_settings(settings)
setup_tracing("qrsight-api")
app = create_app(settings)
