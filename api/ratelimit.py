"""Per-client rate limiting on /detect with flask-limiter, floods without a token included.

The client is the token's subject when the request carries a valid token, else its
address. Every /detect request counts, including the ones refused with 401 (the
limiter runs after the token is checked but before a bad token is refused, see
:mod:`api.app`), so guessing tokens or flooding without one ends in 429 like any flood.
Only the ``detect`` blueprint is limited: health, readiness, metrics and the OpenAPI
document are exempt.

The address is the socket's peer unless ``QRSIGHT_API_TRUSTED_PROXY_HOPS`` says how many
reverse proxies (ingress, load balancer) stand in front: then werkzeug's ``ProxyFix``
takes the client address that many hops from the right of ``X-Forwarded-For``, the entry
the outermost trusted proxy wrote, so a client cannot pick its own key by sending the
header itself. ``Forwarded`` (RFC 7239) is never read.

Counts live in ``QRSIGHT_RATE_LIMIT_STORAGE_URI``. The default, ``memory://``, counts
per process: with W gunicorn workers and P pods a client gets up to W x P times the
limit. ``redis://host:6379/0`` (or ``redis+sentinel://``, ``redis+cluster://``,
``memcached://``) shares one count across processes and pods. When that storage is
unreachable the limiter falls back to per-process counts and says so in the log; it never
turns a request into a 500.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, g
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

from core.runtime.settings import Settings

# '' turns limiting off in settings built in code; an empty environment variable counts as
# unset, so the environment says "off" (or "none"/"0").
OFF = {"", "off", "none", "0"}
# A shared store that does not answer must not hold a request thread for long.
STORAGE_TIMEOUT_S = 0.5


def limit_of(settings: Settings) -> str | None:
    value = settings.rate_limit.strip()
    return None if value.lower() in OFF else value


def client_key() -> str:
    subject = g.get("auth_subject")
    return f"sub:{subject}" if subject else f"ip:{get_remote_address()}"


def storage_options(uri: str) -> dict[str, Any]:
    if uri.startswith(("redis://", "rediss://", "redis+unix://")):
        return {"socket_connect_timeout": STORAGE_TIMEOUT_S, "socket_timeout": STORAGE_TIMEOUT_S}
    return {}


def init_limiter(app: Flask, settings: Settings, limited: Blueprint) -> Limiter:
    """The limiter, with its check registered as the app's next ``before_request`` hook."""
    limit = limit_of(settings)
    uri = settings.rate_limit_storage_uri
    limiter = Limiter(
        key_func=client_key,
        storage_uri=uri,
        storage_options=storage_options(uri),
        headers_enabled=True,
        enabled=limit is not None,
        in_memory_fallback_enabled=True,
        swallow_errors=True,
    )
    if limit is not None:
        limiter.limit(limit)(limited)
    limiter.init_app(app)
    return limiter
