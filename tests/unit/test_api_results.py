"""A worker's result becomes the HTTP answer: OK → 200 body, ERROR → its code's status,
EXPIRED → 504, always with the request id."""

from __future__ import annotations

from typing import Any

import pytest

from api.detect import check_result, reply_body
from core.runtime.errors import QrsightError


def result(status: str, code: str | None = None) -> dict[str, Any]:
    return {
        "request_id": "r-1",
        "source": None,
        "status": status,
        "error": None if code is None else {"code": code, "message": f"{code} happened"},
        "image": {"width": 640, "height": 480},
        "model": {"name": "m", "version": "1", "input_size": 640},
        "detections": [],
        "timings": {
            "queue_ms": 1.0,
            "decode_ms": 1.0,
            "infer_ms": 1.0,
            "post_ms": 1.0,
            "total_ms": 4.0,
        },
        "created_at": 0,
    }


@pytest.mark.parametrize(
    ("status", "code", "http", "out_code"),
    [
        ("ERROR", "corrupt_image", 400, "corrupt_image"),
        ("ERROR", "empty_image", 400, "empty_image"),
        ("ERROR", "bad_message", 400, "bad_message"),
        ("ERROR", "image_too_large", 413, "image_too_large"),
        ("ERROR", "unsupported_type", 415, "unsupported_type"),
        # never a 500: the model failing is retried (503), an unknown code is bad input (400)
        ("ERROR", "model_error", 503, "model_error"),
        ("ERROR", "something_new", 400, "something_new"),
        # a result too large for the replies topic comes back as a small ERROR result: its
        # code reaches the caller at once, never a 504 after the timeout
        ("ERROR", "result_undeliverable", 400, "result_undeliverable"),
        ("ERROR", "message_too_large", 413, "message_too_large"),
        ("ERROR", "reply_too_large", 400, "reply_too_large"),
        ("EXPIRED", None, 504, "timeout"),
    ],
)
def test_failed_results_raise_the_error_of_their_code(
    status: str, code: str | None, http: int, out_code: str
) -> None:
    with pytest.raises(QrsightError) as info:
        check_result(result(status, code))
    assert info.value.http_status == http
    assert info.value.code == out_code
    assert info.value.request_id == "r-1"


def test_ok_result_becomes_the_documented_body() -> None:
    ok = result("OK")
    ok["detections"] = [
        {
            "x1": 1.0,
            "y1": 2.0,
            "x2": 3.0,
            "y2": 4.0,
            "confidence": 0.9,
            "class_id": 0,
            "label": "qr",
            "text": "hi",
            "corners": None,
        }
    ]
    check_result(ok)
    body = reply_body(ok)
    assert set(body) == {"request_id", "image", "results", "timings", "model"}
    assert body["results"][0]["text"] == "hi"
    assert body["image"] == {"width": 640, "height": 480}
