"""JWT bearer auth: a table of good and bad tokens, and refusal to start without a key."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask

from api import create_app
from api.cli import main as cli_main
from core.errors import ConfigError
from tests.unit.test_api_helpers import api_settings, offline_app, png

SECRET = "unit-test-secret-that-is-long-enough-for-hs256"
AUD = "qrsight"
ISS = "https://issuer.example"


def rsa_pair() -> tuple[Any, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, public.decode()


RSA_KEY, RSA_PUBLIC = rsa_pair()
OTHER_RSA_KEY, _ = rsa_pair()


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "aud": AUD, "iss": ISS, "exp": int(time.time()) + 60}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def hs(**changes: Any) -> str:
    return jwt.encode(claims(**changes), SECRET, algorithm="HS256")


def rs(key: Any = RSA_KEY, **changes: Any) -> str:
    return jwt.encode(claims(**changes), key, algorithm="RS256")


@pytest.fixture(scope="module")
def app() -> Flask:
    return offline_app(
        api_settings(
            auth_enabled=True,
            auth_jwt_secret=SECRET,
            auth_jwt_public_key=RSA_PUBLIC,
            auth_jwt_audience=AUD,
            auth_jwt_issuer=ISS,
        )
    )


def post(app: Flask, header: str | None) -> Any:
    headers = {"Authorization": header} if header is not None else {}
    return app.test_client().post(
        "/api/v1/detect", data=png(), content_type="image/png", headers=headers
    )


BAD = [
    ("no header", None, 'Bearer realm="qrsight"'),
    ("not bearer", "Basic dXNlcjpwYXNz", 'Bearer realm="qrsight"'),
    ("empty bearer", "Bearer ", 'Bearer realm="qrsight"'),
    ("garbage", "Bearer not.a.jwt", "invalid_token"),
    (
        "bad signature",
        "Bearer " + jwt.encode(claims(), "another-secret-of-sufficient-length!", algorithm="HS256"),
        "invalid_token",
    ),
    ("expired", "Bearer " + hs(exp=int(time.time()) - 120), "invalid_token"),
    ("no exp", "Bearer " + hs(exp=None), "invalid_token"),
    ("wrong audience", "Bearer " + hs(aud="someone-else"), "invalid_token"),
    ("no audience", "Bearer " + hs(aud=None), "invalid_token"),
    ("wrong issuer", "Bearer " + hs(iss="https://evil.example"), "invalid_token"),
    ("RS256 signed by another key", "Bearer " + rs(OTHER_RSA_KEY), "invalid_token"),
    ("alg none", "Bearer " + jwt.encode(claims(), None, algorithm="none"), "invalid_token"),
]


@pytest.mark.parametrize(("header", "challenge"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_tokens_get_401(app: Flask, header: str | None, challenge: str) -> None:
    response = post(app, header)
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer ")
    assert challenge in response.headers["WWW-Authenticate"]


@pytest.mark.parametrize("token", [hs(), rs()], ids=["HS256", "RS256"])
def test_good_tokens_pass_auth(app: Flask, token: str) -> None:
    # Past auth the request is validated and reaches the (never started) reply client.
    response = post(app, f"Bearer {token}")
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "kafka_unavailable"


def test_hs256_token_refused_when_only_rs256_is_configured() -> None:
    app = offline_app(api_settings(auth_enabled=True, auth_jwt_public_key=RSA_PUBLIC))
    token = hs()
    assert post(app, f"Bearer {token}").status_code == 401
    assert post(app, f"Bearer {rs()}").status_code == 503


def test_public_key_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "jwt.pem"
    path.write_text(RSA_PUBLIC)
    app = offline_app(api_settings(auth_enabled=True, auth_jwt_public_key=str(path)))
    assert post(app, f"Bearer {rs()}").status_code == 503


def test_health_and_metrics_need_no_token(app: Flask) -> None:
    client = app.test_client()
    assert client.get("/api/v1/health").status_code == 200
    assert client.get("/api/v1/metrics").status_code == 200
    assert client.get("/api/v1/openapi.json").status_code == 200


def test_auth_without_a_key_refuses_to_start() -> None:
    with pytest.raises(ConfigError) as info:
        create_app(api_settings(auth_enabled=True))
    assert "QRSIGHT_AUTH_JWT_SECRET" in str(info.value)
    assert "QRSIGHT_AUTH_JWT_PUBLIC_KEY" in str(info.value)


def test_missing_public_key_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="QRSIGHT_AUTH_JWT_PUBLIC_KEY"):
        create_app(
            api_settings(auth_enabled=True, auth_jwt_public_key=str(tmp_path / "missing.pem"))
        )


def test_cli_refuses_to_start_without_a_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QRSIGHT_KAFKA_BOOTSTRAP", "127.0.0.1:9")
    monkeypatch.setenv("QRSIGHT_AUTH_ENABLED", "true")
    monkeypatch.delenv("QRSIGHT_AUTH_JWT_SECRET", raising=False)
    monkeypatch.delenv("QRSIGHT_AUTH_JWT_PUBLIC_KEY", raising=False)
    assert cli_main([]) == 2
    assert "QRSIGHT_AUTH_JWT_SECRET" in capsys.readouterr().err


def test_no_secret_or_token_in_logs(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = hs(exp=int(time.time()) - 120)
    post(app, f"Bearer {token}")
    post(app, f"Bearer {hs()}")
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert logged  # the requests were logged
    assert SECRET not in logged
    assert token not in logged
