"""The gunicorn side of the API: its own errors are the API's JSON errors; malloc gives
upload buffers back."""

from __future__ import annotations

import json

import pytest

from api.memory import tune_malloc
from api.protocol_errors import install, json_error, write_json_error


@pytest.mark.parametrize(
    ("status", "reason", "code"),
    [
        (400, "Bad Request", "bad_request"),
        (414, "URI Too Long", "uri_too_long"),
        (431, "Request Header Fields Too Large", "headers_too_large"),
        (501, "Not Implemented", "not_implemented"),
    ],
)
def test_gunicorn_errors_are_json(status: int, reason: str, code: str) -> None:
    raw = json_error(status, reason, "Invalid header \r\nX-Evil: 1 <b>")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == f"HTTP/1.1 {status} {reason}"
    assert "Content-Type: application/json" in lines
    assert f"Content-Length: {len(body)}" in lines
    error = json.loads(body)["error"]
    assert error["code"] == code
    assert error["request_id"] is None
    assert "\n" not in error["message"] and "\r" not in error["message"]


def test_install_replaces_gunicorns_html_writer() -> None:
    from gunicorn import util

    original = util.write_error
    try:
        install()
        assert util.write_error is write_json_error
    finally:
        util.write_error = original


def test_malloc_is_tuned_on_glibc() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert tune_malloc() is True
