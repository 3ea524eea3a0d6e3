"""The app factory: ``create_app(settings)`` builds the Flask app (one blueprint per feature).

``/`` serves the web page (:mod:`api.web`); the API lives under ``/api/v1``.

Every request gets a request id made here (a random UUID): it is the correlation id of
the Kafka request, the ``request_id`` of every body and log line, and never comes from the
client, so two clients cannot collide or read each other's results. A client's own
``X-Request-ID`` (1-64 of ``[A-Za-z0-9._-]``) is only echoed back in that header and
logged next to ours.

The hooks run in this order for /detect: the request id; the token check (a bad token
is remembered, not refused yet); the rate limit (keyed by the token's subject, else the
client address, so floods without a valid token are limited too); the refusal of a bad
token (401); a body announced over the limit (413); admission (503 ``overloaded`` past
``QRSIGHT_API_MAX_IN_FLIGHT``). All of them run before the body is read; an admitted body
that does not keep to its pace (a whole-body deadline, a minimum rate, a longest pause:
``api/pace.py``, applied by the gunicorn worker class) is given up (400), which gives the
slot back.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix

from api import detect, health, metrics, openapi, web
from api.admission import Admission, in_flight_limit
from api.auth import JwtVerifier, authenticate
from api.errors import register_error_handlers
from api.logs import REQUEST_ID_ENVIRON, TRACE_ID_ENVIRON
from api.pace import BODY_IDLE_TIMEOUT_S
from api.ratelimit import init_limiter, limit_of
from api.replies import ReplyClient
from api.slots import reply_partition
from api.state import EXTENSION, ApiState, api_state
from api.waiters import new_request_id
from core.runtime import logs
from core.runtime.errors import QrsightError
from core.runtime.memory import container_memory_bytes
from core.runtime.settings import Settings
from core.runtime.telemetry import tracing
from core.vision.images import ImageLimits

logger = logging.getLogger(__name__)

# Room for the multipart framing around one image of the largest allowed size.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
REQUEST_ID_HEADER = "X-Request-ID"
CLIENT_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
PROTECTED_BLUEPRINTS = {"detect"}
ADMITTED_ENDPOINTS = {"detect.detect"}


def create_app(
    settings: Settings,
    reply_client: ReplyClient | None = None,
    *,
    on_reply_failure: Callable[[], None] | None = None,
) -> Flask:
    """Build the app. Without ``reply_client`` one is created for this process's reply
    partition and started (it assigns the partition in the background; ``/ready`` tells);
    ``on_reply_failure`` is what it does when its reply reader cannot be kept running
    (gunicorn's workers exit, so the master starts a fresh one).

    Raises ConfigError when the settings cannot work (e.g. auth on without a key).
    """
    verifier = JwtVerifier.from_settings(settings)
    admission = Admission(in_flight_limit(settings, container_memory_bytes()))
    if reply_client is None:
        reply_client = ReplyClient(
            settings, reply_partition(settings), on_give_up=on_reply_failure
        ).start()
    app = Flask(__name__)
    hops = settings.api_trusted_proxy_hops
    if hops:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]
    app.config["MAX_CONTENT_LENGTH"] = settings.max_image_bytes + MULTIPART_OVERHEAD_BYTES
    app.extensions[EXTENSION] = ApiState(
        settings, reply_client, ImageLimits.from_settings(settings), verifier, admission
    )
    app.before_request(begin_request)
    app.before_request(check_auth)
    app.extensions["limiter"] = init_limiter(app, settings, detect.bp)  # its hook comes next
    app.before_request(refuse_unauthenticated)
    app.before_request(admit)
    app.after_request(end_request)
    app.teardown_request(leave_request)
    for blueprint in (detect.bp, health.bp, metrics.bp, openapi.bp, web.bp):
        app.register_blueprint(blueprint)
    register_error_handlers(app)
    metrics.REPLY_PARTITION.set(reply_client.partition)
    logger.info(
        "app created reply_partition=%s auth=%s rate_limit=%s max_in_flight=%s proxy_hops=%s",
        reply_client.partition,
        verifier is not None,
        limit_of(settings) or "off",
        admission.limit,
        hops,
    )
    return app


def begin_request() -> None:
    g.request_id = new_request_id()
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    g.client_request_id = incoming if CLIENT_REQUEST_ID_RE.fullmatch(incoming) else None
    request.environ[REQUEST_ID_ENVIRON] = g.request_id  # for gunicorn's access log line
    g.started = time.perf_counter()
    metrics.IN_FLIGHT.inc()
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    g.span = tracing().server(f"{request.method} {route}", request.headers, _http(route))
    g.log_token = logs.bind(request_id=g.request_id, trace_id=g.span.trace_id)
    request.environ[TRACE_ID_ENVIRON] = g.span.trace_id  # for gunicorn's access log line


def check_auth() -> None:
    """Check the token of a protected route; a failure is raised by
    :func:`refuse_unauthenticated`, after the rate limiter has counted the request."""
    verifier = api_state().verifier
    if verifier is not None and request.blueprint in PROTECTED_BLUEPRINTS:
        try:
            authenticate(verifier)
        except QrsightError as exc:
            g.auth_error = exc


def refuse_unauthenticated() -> None:
    error = g.pop("auth_error", None)
    if error is not None:
        raise error


def admit() -> None:
    """Take an in-flight slot for /detect; a body announced over the limit is refused
    (413) first, without taking one."""
    if request.endpoint in ADMITTED_ENDPOINTS:
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        if request.content_length is not None and request.content_length > limit:
            raise RequestEntityTooLarge()
        state = api_state()
        state.admission.enter()
        g.admitted = True
        metrics.DETECT_IN_FLIGHT.inc()
        client = request.environ.get("gunicorn.socket")
        if client is not None:  # the longest pause, under any server (400, slot back)
            client.settimeout(BODY_IDLE_TIMEOUT_S)


def end_request(response: Response) -> Response:
    response.headers[REQUEST_ID_HEADER] = g.get("client_request_id") or g.get("request_id", "")
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    elapsed = time.perf_counter() - g.get("started", time.perf_counter())
    metrics.REQUESTS.labels(route, request.method, str(response.status_code)).inc()
    metrics.LATENCY.labels(route).observe(elapsed)
    if "span" in g:
        g.span.http_status(response.status_code)
    logger.info(
        "request method=%s route=%s status=%s ms=%.1f client_request_id=%s",
        request.method,
        route,
        response.status_code,
        elapsed * 1000,
        g.get("client_request_id") or "-",
    )
    return response


def leave_request(error: BaseException | None) -> None:
    if g.pop("admitted", False):
        api_state().admission.leave()
        metrics.DETECT_IN_FLIGHT.dec()
    if "started" in g:
        metrics.IN_FLIGHT.dec()
    if "span" in g:
        g.span.end(type(error).__name__ if error is not None else None)
        logs.unbind(g.log_token)


def _http(route: str) -> dict[str, str]:
    """The HTTP server span's attributes (OpenTelemetry semantic conventions)."""
    return {"http.request.method": request.method, "http.route": route, "url.path": request.path}
