"""gunicorn's own error answers in the API's JSON error shape.

Some requests never reach Flask: gunicorn refuses them itself, a request line over
``limit_request_line`` (414), a header over ``limit_request_field_size`` or too many of
them (431), a malformed request line, header or chunk (400), an unknown ``Expect`` (417),
an unsupported transfer coding (501). It writes those through ``gunicorn.util.write_error``
as HTML pages. The ``post_fork`` hook in ``api/gunicorn.conf.py`` puts
:func:`write_json_error` in its place, so every error of the API, whoever answers it, is
``{"error": {"code", "message", "request_id"}}`` (``request_id`` null: no request was
made), as the OpenAPI document says.
"""

from __future__ import annotations

import json
import socket
import string

CODES = {
    400: "bad_request",
    403: "forbidden",
    408: "request_timeout",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
}
MESSAGE_CHARS = set(string.printable) - set("\r\n\t\x0b\x0c")
MAX_MESSAGE = 200


def json_error(status: int, reason: str, message: str) -> bytes:
    """The whole HTTP/1.1 response for one of gunicorn's errors."""
    text = "".join(c for c in message if c in MESSAGE_CHARS)[:MAX_MESSAGE] or reason
    body = json.dumps(
        {"error": {"code": CODES.get(status, "http_error"), "message": text, "request_id": None}}
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """Drop-in for ``gunicorn.util.write_error``."""
    from gunicorn import util

    util.write_nonblock(sock, json_error(status_int, reason, mesg))


def install() -> None:
    """Make gunicorn write its errors as JSON in this process."""
    from gunicorn import util

    util.write_error = write_json_error
