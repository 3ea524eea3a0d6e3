"""/detect refuses bad input before anything is queued; every error has the one JSON shape."""

from __future__ import annotations

import io
import logging
import re
from typing import Any

import pytest
from flask import Flask

from tests.unit.test_api_helpers import (
    api_settings,
    jpeg,
    offline_app,
    png,
    png_claiming,
)

MAX_BYTES = 100_000


@pytest.fixture(scope="module")
def app() -> Flask:
    return offline_app(
        api_settings(max_image_bytes=MAX_BYTES, max_image_side=4096, max_image_pixels=4_000_000)
    )


def multipart(data: bytes, field: str = "image") -> dict[str, Any]:
    return {"data": {field: (io.BytesIO(data), "photo.png")}, "content_type": "multipart/form-data"}


def raw(data: bytes, content_type: str = "image/png") -> dict[str, Any]:
    return {"data": data, "content_type": content_type}


CASES = [
    # (name, request kwargs, query, status, code)
    ("multipart without the image field", multipart(png(), field="file"), "", 400, "bad_request"),
    ("multipart empty file", multipart(b""), "", 400, "empty_image"),
    ("raw empty body", raw(b""), "", 400, "empty_image"),
    ("corrupt PNG header", raw(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30), "", 400, "corrupt_image"),
    ("truncated JPEG header", raw(jpeg()[:12], "image/jpeg"), "", 400, "corrupt_image"),
    ("conf out of range", raw(png()), "?conf=2", 400, "bad_request"),
    ("conf not a number", raw(png()), "?conf=high", 400, "bad_request"),
    ("decode not a boolean", raw(png()), "?decode=maybe", 400, "bad_request"),
    ("timeout_ms negative", raw(png()), "?timeout_ms=-5", 400, "bad_request"),
    (
        "body over MAX_CONTENT_LENGTH",
        raw(b"\x89PNG" + b"\x00" * 300_000),
        "",
        413,
        "image_too_large",
    ),
    (
        "multipart over MAX_CONTENT_LENGTH",
        multipart(png() + b"\x00" * 300_000),
        "",
        413,
        "image_too_large",
    ),
    ("image over max_image_bytes", raw(png() + b"\x00" * MAX_BYTES), "", 413, "image_too_large"),
    ("pixel bomb from the header", raw(png_claiming(30_000, 30_000)), "", 413, "image_too_large"),
    ("side over the limit", raw(png_claiming(5000, 10)), "", 413, "image_too_large"),
    ("GIF", raw(b"GIF89a" + b"\x00" * 40, "image/gif"), "", 415, "unsupported_type"),
    ("text", raw(b"hello, this is not an image", "text/plain"), "", 415, "unsupported_type"),
    (
        "SVG in multipart",
        multipart(b"<svg xmlns='http://www.w3.org/2000/svg'/>"),
        "",
        415,
        "unsupported_type",
    ),
    # valid images pass validation and reach the (never started) reply client: 503, no hang
    ("valid PNG raw", raw(png()), "", 503, "kafka_unavailable"),
    (
        "valid JPEG multipart",
        multipart(jpeg()),
        "?conf=0.5&decode=false&timeout_ms=99999",
        503,
        "kafka_unavailable",
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "query", "status", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_detect_validation(
    app: Flask, kwargs: dict[str, Any], query: str, status: int, code: str
) -> None:
    response = app.test_client().post(f"/api/v1/detect{query}", **kwargs)
    assert response.status_code == status, response.get_json()
    body = response.get_json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "request_id"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert body["error"]["request_id"] == response.headers["X-Request-ID"]


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("get", "/api/v1/nope", 404, "not_found"),
        ("get", "/api/v1/detect", 405, "method_not_allowed"),
        ("post", "/api/v1/health", 405, "method_not_allowed"),
    ],
)
def test_http_errors_are_json(app: Flask, method: str, path: str, status: int, code: str) -> None:
    response = getattr(app.test_client(), method)(path)
    assert response.status_code == status
    assert response.get_json()["error"]["code"] == code


def test_the_callers_request_id_is_echoed_but_ours_is_the_request_id(app: Flask) -> None:
    client = app.test_client()
    first, second = (
        client.post("/api/v1/detect", data=b"", headers={"X-Request-ID": "abc-123"})
        for _ in range(2)
    )
    for response in (first, second):
        assert response.headers["X-Request-ID"] == "abc-123"
        assert re.fullmatch(r"[0-9a-f]{32}", response.get_json()["error"]["request_id"])
    assert first.get_json()["error"]["request_id"] != second.get_json()["error"]["request_id"]


def test_unsafe_request_id_is_replaced(app: Flask) -> None:
    response = app.test_client().post(
        "/api/v1/detect", data=b"", headers={"X-Request-ID": "bad id <script>"}
    )
    assert response.headers["X-Request-ID"] != "bad id <script>"
    assert len(response.headers["X-Request-ID"]) == 32


def test_health_is_alive_and_ready_says_why_not(app: Flask) -> None:
    client = app.test_client()
    assert client.get("/api/v1/health").get_json() == {"status": "alive"}
    response = client.get("/api/v1/ready")
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "not_ready"
    assert "not started" in response.get_json()["error"]["message"]


def test_not_ready_is_logged_as_a_warning_not_an_error(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    # the compose and k8s runs poll /ready while the API starts: each "not yet" was an ERROR
    with caplog.at_level(logging.INFO, logger="api.errors"):
        assert app.test_client().get("/api/v1/ready").status_code == 503
    assert {r.levelname for r in caplog.records if r.name == "api.errors"} == {"WARNING"}


def test_metrics_counts_requests(app: Flask) -> None:
    client = app.test_client()
    client.get("/api/v1/health")
    text = client.get("/api/v1/metrics").get_data(as_text=True)
    assert 'qrsight_api_requests_total{method="GET",route="/api/v1/health",status="200"}' in text
    assert "qrsight_api_reply_partition 0.0" in text
