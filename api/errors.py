"""One error handler: every error leaves the API as JSON ``{"error": {code, message, request_id}}``.

Routes never catch; they raise :class:`core.runtime.errors.QrsightError` subclasses (which carry
their HTTP status and stable code) and werkzeug raises its own HTTP errors (404, 405,
413 from ``MAX_CONTENT_LENGTH``, 429 from flask-limiter). Both are turned into the one
JSON shape here.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, g, jsonify
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge, TooManyRequests

from core.runtime.errors import QrsightError, UnauthorizedError

logger = logging.getLogger(__name__)

# Retry-After on every 503: when the caller may try again, in seconds.
UNAVAILABLE_RETRY_AFTER_S = 5

# Stable codes for werkzeug's own errors (the ones qrsight's errors don't cover).
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "image_too_large",
    415: "unsupported_type",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


def error_response(code: str, message: str, status: int) -> Response:
    body = {"error": {"code": code, "message": message, "request_id": g.get("request_id")}}
    response = jsonify(body)
    response.status_code = status
    return response


def handle_qrsight_error(error: QrsightError) -> Response:
    if error.request_id is None:
        error.request_id = g.get("request_id")
    status = error.http_status
    # a readiness probe's "not yet" (starting, Kafka away) and back-pressure's "retry soon"
    # are answers, not failed requests
    failed = status >= 500 and error.code not in ("not_ready", "overloaded")
    log = logger.error if failed else logger.warning
    log("request failed code=%s status=%s message=%s", error.code, status, error.message)
    response = jsonify({"error": error.to_dict()})
    response.status_code = status
    if isinstance(error, UnauthorizedError):
        response.headers["WWW-Authenticate"] = error.context.get(
            "challenge", 'Bearer realm="qrsight"'
        )
    if status == 503:
        retry_after = error.context.get("retry_after", UNAVAILABLE_RETRY_AFTER_S)
        response.headers["Retry-After"] = str(retry_after)
    return response


def handle_http_error(error: HTTPException) -> Response:
    status = error.code or 500
    message = error.description or error.name
    if isinstance(error, RequestEntityTooLarge):
        message = "request body is over the image size limit (QRSIGHT_MAX_IMAGE_BYTES)"
    response = error_response(HTTP_CODES.get(status, "http_error"), message, status)
    if isinstance(error, TooManyRequests):
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
    for name, value in error.get_headers():
        if name.lower() not in ("content-type", "content-length"):
            response.headers.setdefault(name, value)
    return response


def handle_unexpected(error: Exception) -> Response:
    logger.exception("unhandled error type=%s", type(error).__name__)
    return error_response("internal_error", "internal error", 500)


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(QrsightError, handle_qrsight_error)
    app.register_error_handler(HTTPException, handle_http_error)
    app.register_error_handler(Exception, handle_unexpected)
