"""Rate limiting per client on /detect: 429 with Retry-After; health and metrics exempt."""

from __future__ import annotations

import time

import jwt
import pytest

from core.runtime.settings import load_settings
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


# --- one client cannot pick its own key --------------------------------------------------
def rotating_headers(i: int) -> dict[str, str]:
    fake = f"203.0.113.{i % 250}"
    return {"X-Forwarded-For": fake, "Forwarded": f"for={fake};proto=https", "X-Real-IP": fake}


@pytest.mark.parametrize("hops", [0, 1])
def test_rotating_forwarded_headers_gets_no_more_than_the_limit(hops: int) -> None:
    """Without a trusted proxy the socket address is the key; with one, the entry that
    proxy appended (here the test client plays the proxy, appending the same address)."""
    settings = api_settings(rate_limit="5/minute", api_trusted_proxy_hops=hops)
    client = offline_app(settings).test_client()
    statuses = []
    for i in range(20):
        headers = rotating_headers(i)
        if hops:
            headers["X-Forwarded-For"] += ", 198.51.100.7"  # the proxy's view of the client
        statuses.append(client.post("/api/v1/detect", data=b"", headers=headers).status_code)
    assert statuses.count(429) == 15
    assert statuses[:5] == [400] * 5


def test_with_a_trusted_proxy_each_real_client_has_its_own_count() -> None:
    client = offline_app(
        api_settings(rate_limit="2/minute", api_trusted_proxy_hops=1)
    ).test_client()

    def post(address: str) -> int:
        headers = {"X-Forwarded-For": f"10.9.9.9, {address}"}
        return client.post("/api/v1/detect", data=b"", headers=headers).status_code

    assert [post("198.51.100.1") for _ in range(3)] == [400, 400, 429]
    assert [post("198.51.100.2") for _ in range(3)] == [400, 400, 429]


def test_401s_are_limited_too() -> None:
    settings = api_settings(rate_limit="3/minute", auth_enabled=True, auth_jwt_secret=SECRET)
    client = offline_app(settings).test_client()
    statuses = [
        client.post(
            "/api/v1/detect", data=png(), headers={"Authorization": f"Bearer guess-{i}"}
        ).status_code
        for i in range(6)
    ]
    assert statuses == [401, 401, 401, 429, 429, 429]
    # a valid token is its own client (its subject), so the flood does not lock it out
    good = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, SECRET)
    response = client.post(
        "/api/v1/detect",
        data=png(),
        content_type="image/png",
        headers={"Authorization": f"Bearer {good}"},
    )
    assert response.status_code == 503  # past auth and the limit: no broker here


def test_an_unreachable_shared_store_never_turns_into_a_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = api_settings(rate_limit="2/minute", rate_limit_storage_uri="redis://127.0.0.1:9/0")
    client = offline_app(settings).test_client()
    statuses = [client.post("/api/v1/detect", data=b"").status_code for _ in range(4)]
    assert 500 not in statuses
    assert statuses == [400, 400, 429, 429]  # counted in memory meanwhile
    assert "falling back to in-memory storage" in caplog.text
