"""Per-client rate limiting on /detect with flask-limiter.

The client is the token's subject when auth is on, else the remote address (behind a
proxy, wrap the app in werkzeug's ``ProxyFix`` so that is the caller's address). Only
the ``detect`` blueprint is limited: health, readiness, metrics and the OpenAPI document
are exempt. With the default ``memory://`` storage each gunicorn worker counts on its
own; set ``QRSIGHT_RATE_LIMIT_STORAGE_URI=redis://…`` to share one count.
"""

from __future__ import annotations

from flask import Blueprint, Flask, g
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

from core.settings import Settings

# '' turns limiting off in settings built in code; an empty environment variable counts as
# unset, so the environment says "off" (or "none"/"0").
OFF = {"", "off", "none", "0"}


def limit_of(settings: Settings) -> str | None:
    value = settings.rate_limit.strip()
    return None if value.lower() in OFF else value


def client_key() -> str:
    subject = g.get("auth_subject")
    return f"sub:{subject}" if subject else f"ip:{get_remote_address()}"


def init_limiter(app: Flask, settings: Settings, limited: Blueprint) -> Limiter:
    limit = limit_of(settings)
    limiter = Limiter(
        key_func=client_key,
        storage_uri=settings.rate_limit_storage_uri,
        headers_enabled=True,
        enabled=limit is not None,
    )
    if limit is not None:
        limiter.limit(limit)(limited)
    limiter.init_app(app)
    return limiter
