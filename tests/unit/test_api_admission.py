"""Back-pressure: the in-flight cap on /detect, its default, and what it leaves free."""

from __future__ import annotations

import pytest

from api.admission import Admission, OverloadedError, in_flight_limit
from tests.unit.test_api_helpers import api_settings, offline_app, png

MIB = 1024 * 1024


def test_the_gate_admits_up_to_its_limit_and_frees_slots() -> None:
    gate = Admission(2)
    gate.enter()
    gate.enter()
    with pytest.raises(OverloadedError) as info:
        gate.enter()
    assert info.value.http_status == 503
    assert info.value.context["retry_after"] == 1
    assert "QRSIGHT_API_MAX_IN_FLIGHT" in info.value.message
    gate.leave()
    gate.enter()
    assert gate.in_flight == 2


@pytest.mark.parametrize(
    ("threads", "workers", "memory", "expected"),
    [
        (32, 2, None, 24),  # a quarter of the threads kept for /health, /ready, /metrics
        (8, 1, None, 6),
        (4, 1, None, 2),  # at least two kept
        (1, 1, None, 1),
        (32, 1, 1024 * MIB, 17),  # 1 GiB pod: half of it over 3 copies of a 10 MiB image
        (32, 2, 1024 * MIB, 8),  # two workers share the pod's memory
        (32, 1, 8192 * MIB, 24),  # plenty of memory: the threads decide
        (32, 1, 16 * MIB, 1),
    ],
)
def test_default_cap_comes_from_threads_and_memory(
    threads: int, workers: int, memory: int | None, expected: int
) -> None:
    settings = api_settings(api_threads=threads, api_workers=workers)
    assert in_flight_limit(settings, memory) == expected


def test_an_explicit_cap_wins() -> None:
    assert in_flight_limit(api_settings(api_max_in_flight=64), 16 * MIB) == 64


def test_past_the_cap_detect_is_503_overloaded_at_once_and_health_is_served() -> None:
    app = offline_app(api_settings(api_max_in_flight=2))
    gate = app.extensions["qrsight"].admission
    gate.enter()
    gate.enter()  # two requests in flight
    client = app.test_client()
    response = client.post("/api/v1/detect", data=png(), content_type="image/png")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    body = response.get_json()["error"]
    assert body["code"] == "overloaded"
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert client.get("/api/v1/health").status_code == 200
    gate.leave()
    response = client.post("/api/v1/detect", data=png(), content_type="image/png")
    assert response.get_json()["error"]["code"] == "kafka_unavailable"  # admitted, then refused
    assert gate.in_flight == 1  # the finished request gave its slot back


def test_refused_requests_give_no_slot_back_they_never_took() -> None:
    app = offline_app(api_settings(api_max_in_flight=1))
    client = app.test_client()
    for _ in range(5):
        client.post("/api/v1/detect", data=b"", content_type="image/png")  # 400 after admission
        client.post("/api/v1/detect", data=png(), content_type="image/gif")
    assert app.extensions["qrsight"].admission.in_flight == 0


def test_every_503_says_when_to_retry() -> None:
    response = (
        offline_app(api_settings())
        .test_client()
        .post("/api/v1/detect", data=png(), content_type="image/png")
    )
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) > 0


def test_a_body_announced_over_the_limit_is_413_without_taking_a_slot() -> None:
    app = offline_app(api_settings(api_max_in_flight=1, max_image_bytes=10_000))
    gate = app.extensions["qrsight"].admission
    gate.enter()  # full: an admitted request would be refused with 503
    response = app.test_client().post(
        "/api/v1/detect", data=b"\x89PNG" + b"\x00" * 200_000, content_type="image/png"
    )
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "image_too_large"
