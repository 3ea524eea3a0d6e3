"""Rate limiting per client on /detect: 429 with Retry-After; health and metrics exempt."""

from __future__ import annotations

import time

import jwt
import pytest

from core.settings import load_settings
from tests.unit.test_api_helpers import api_settings, offline_app, png

SECRET = "unit-test-secret-that-is-long-enough-for-hs256"


def test_third_request_in_a_minute_gets_429_with_retry_after() -> None:
    client = offline_app(api_settings(rate_limit="2/minute")).test_client()
    statuses = [
        client.post("/api/v1/detect", data=png(), content_type="image/png").status_code
        for _ in range(3)
    ]
    assert statuses == [503, 503, 429]
    response = client.post("/api/v1/detect", data=png(), content_type="image/png")
    assert response.status_code == 429
    assert 0 < int(response.headers["Retry-After"]) <= 60
    body = response.get_json()
    assert body["error"]["code"] == "rate_limited"
    assert body["error"]["request_id"] == response.headers["X-Request-ID"]


def test_health_ready_metrics_are_exempt() -> None:
    client = offline_app(api_settings(rate_limit="1/minute")).test_client()
    for _ in range(5):
        assert client.get("/api/v1/health").status_code == 200
        assert client.get("/api/v1/ready").status_code == 503  # not ready, never 429
        assert client.get("/api/v1/metrics").status_code == 200


def test_limit_is_per_token_subject() -> None:
    settings = api_settings(rate_limit="1/minute", auth_enabled=True, auth_jwt_secret=SECRET)
    client = offline_app(settings).test_client()

    def post(subject: str) -> int:
        token = jwt.encode({"sub": subject, "exp": int(time.time()) + 60}, SECRET)
        headers = {"Authorization": f"Bearer {token}"}
        return client.post(
            "/api/v1/detect", data=png(), content_type="image/png", headers=headers
        ).status_code

    assert [post("alice"), post("alice"), post("bob")] == [503, 429, 503]


@pytest.mark.parametrize("value", ["", "off", "OFF", "none", "0"])
def test_limiting_can_be_turned_off(value: str) -> None:
    client = offline_app(api_settings(rate_limit=value)).test_client()
    statuses = {client.post("/api/v1/detect", data=b"").status_code for _ in range(20)}
    assert statuses == {400}


def test_off_from_the_environment() -> None:
    settings = load_settings(
        {"QRSIGHT_KAFKA_BOOTSTRAP": "127.0.0.1:9", "QRSIGHT_RATE_LIMIT": "off"}
    )
    client = offline_app(settings).test_client()
    statuses = {client.post("/api/v1/detect", data=b"").status_code for _ in range(150)}
    assert statuses == {400}
