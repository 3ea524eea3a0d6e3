"""WSGI entry point for gunicorn: ``gunicorn -c api/gunicorn.conf.py api.wsgi:app``.

Imported in each worker after the fork (never preloaded: librdkafka's threads do not
survive a fork), so every worker gets its own Kafka clients and reply partition.
"""

from __future__ import annotations

from api.app import create_app
from api.logs import configure_logging
from core.settings import load_settings

settings = load_settings()
configure_logging(settings.log_level)
app = create_app(settings)
