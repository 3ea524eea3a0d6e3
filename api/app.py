"""The app factory: ``create_app(settings)`` builds the Flask app (one blueprint per feature).

``/`` serves the web page (:mod:`api.web`); the API lives under ``/api/v1``.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, Response, g, request

from api import detect, health, metrics, openapi, web
from api.auth import JwtVerifier, authenticate
from api.errors import register_error_handlers
from api.logs import TRACE_ID_ENVIRON
from api.ratelimit import init_limiter
from api.replies import ReplyClient
from api.slots import reply_partition
from api.state import EXTENSION, ApiState, api_state
from core import logs
from core.images import ImageLimits
from core.settings import Settings
from core.telemetry import tracing

logger = logging.getLogger(__name__)

# Room for the multipart framing around one image of the largest allowed size.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
PROTECTED_BLUEPRINTS = {"detect"}


def create_app(settings: Settings, reply_client: ReplyClient | None = None) -> Flask:
    """Build the app. Without ``reply_client`` one is created for this process's reply
    partition and started (it assigns the partition in the background; ``/ready`` tells).

    Raises ConfigError when the settings cannot work (e.g. auth on without a key).
    """
    verifier = JwtVerifier.from_settings(settings)
    if reply_client is None:
        reply_client = ReplyClient(settings, reply_partition(settings)).start()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_image_bytes + MULTIPART_OVERHEAD_BYTES
    app.extensions[EXTENSION] = ApiState(
        settings, reply_client, ImageLimits.from_settings(settings), verifier
    )
    app.before_request(begin_request)
    app.before_request(check_auth)  # before the limiter's hook: the limit key is the subject
    app.extensions["limiter"] = init_limiter(app, settings, detect.bp)
    app.after_request(end_request)
    app.teardown_request(leave_request)
    for blueprint in (detect.bp, health.bp, metrics.bp, openapi.bp, web.bp):
        app.register_blueprint(blueprint)
    register_error_handlers(app)
    metrics.REPLY_PARTITION.set(reply_client.partition)
    logger.info(
        "app created reply_partition=%s auth=%s rate_limit=%s",
        reply_client.partition,
        verifier is not None,
        settings.rate_limit or "off",
    )
    return app


def begin_request() -> None:
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    g.request_id = incoming if REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
    g.started = time.perf_counter()
    metrics.IN_FLIGHT.inc()
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    g.span = tracing().server(f"{request.method} {route}", request.headers, _http(route))
    g.log_token = logs.bind(request_id=g.request_id, trace_id=g.span.trace_id)
    request.environ[TRACE_ID_ENVIRON] = g.span.trace_id  # for gunicorn's access log line


def check_auth() -> None:
    verifier = api_state().verifier
    if verifier is not None and request.blueprint in PROTECTED_BLUEPRINTS:
        authenticate(verifier)


def end_request(response: Response) -> Response:
    response.headers[REQUEST_ID_HEADER] = g.get("request_id", "")
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    elapsed = time.perf_counter() - g.get("started", time.perf_counter())
    metrics.REQUESTS.labels(route, request.method, str(response.status_code)).inc()
    metrics.LATENCY.labels(route).observe(elapsed)
    if "span" in g:
        g.span.http_status(response.status_code)
    logger.info(
        "request method=%s route=%s status=%s ms=%.1f",
        request.method,
        route,
        response.status_code,
        elapsed * 1000,
    )
    return response


def leave_request(error: BaseException | None) -> None:
    if "started" in g:
        metrics.IN_FLIGHT.dec()
    if "span" in g:
        g.span.end(type(error).__name__ if error is not None else None)
        logs.unbind(g.log_token)


def _http(route: str) -> dict[str, str]:
    """The HTTP server span's attributes (OpenTelemetry semantic conventions)."""
    return {"http.request.method": request.method, "http.route": route, "url.path": request.path}
