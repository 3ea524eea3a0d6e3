"""JWT bearer auth: a table of good and bad tokens, and refusal to start without a key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from flask import Flask

from api import create_app
from api.auth import JwtVerifier
from api.cli import main as cli_main
from core.runtime.errors import ConfigError
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


@pytest.mark.parametrize(
    ("values", "unset"),
    [
        ({}, ["QRSIGHT_AUTH_JWT_AUDIENCE", "QRSIGHT_AUTH_JWT_ISSUER"]),
        ({"auth_jwt_audience": AUD}, ["QRSIGHT_AUTH_JWT_ISSUER"]),
        ({"auth_jwt_audience": AUD, "auth_jwt_issuer": ISS}, []),
    ],
)
def test_start_warns_while_tokens_of_other_services_would_pass(
    values: dict[str, str], unset: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="api.auth")
    JwtVerifier.from_settings(api_settings(auth_enabled=True, auth_jwt_secret=SECRET, **values))
    warnings = [r.getMessage() for r in caplog.records if "audience/issuer" in r.getMessage()]
    assert bool(warnings) == bool(unset)
    for name in unset:
        assert name in warnings[0]


@pytest.mark.parametrize(
    "issuer",
    ["https://issuer", "issuer.example", "https://issuer.example.evil"],
)
def test_an_issuer_that_is_only_part_of_the_configured_one_is_refused(
    app: Flask, issuer: str
) -> None:
    # PyJWT 2.10.0 compared with `in` and let a part of the issuer through (CVE-2024-53861)
    response = post(app, "Bearer " + hs(iss=issuer))
    assert response.status_code == 401
    assert "invalid_token" in response.headers["WWW-Authenticate"]


# --- hostile headers and claims: always 401, never a 500 -------------------------------
def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: Any, payload: Any, key: bytes = SECRET.encode()) -> str:
    """A token whose header and payload are any JSON, HS256-signed with ``key``."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


FUTURE = int(time.time()) + 600
HOSTILE = [
    ("alg is a list", raw_token({"alg": ["HS256"], "typ": "JWT"}, claims())),
    ("alg is a number", raw_token({"alg": 256}, claims())),
    ("alg is an object", raw_token({"alg": {"HS256": True}}, claims())),
    ("alg is null", raw_token({"alg": None}, claims())),
    ("alg missing", raw_token({"typ": "JWT"}, claims())),
    ("alg with a space", raw_token({"alg": "HS256 "}, claims())),
    ("header is a list", raw_token(["HS256"], claims())),
    ("payload is a list", raw_token({"alg": "HS256"}, ["sub", "alice"])),
    ("payload is a string", raw_token({"alg": "HS256"}, "alice")),
    ("exp is a string", raw_token({"alg": "HS256"}, claims(exp="tomorrow"))),
    ("exp is NaN", raw_token({"alg": "HS256"}, claims(exp=float("nan")))),
    ("exp is Infinity", raw_token({"alg": "HS256"}, claims(exp=float("inf")))),
    ("no iss while one is required", "Bearer " + hs(iss=None)),
    ("nbf in the future", "Bearer " + hs(nbf=FUTURE)),
    ("iat in the future", "Bearer " + hs(iat=FUTURE)),
    ("sub is not a string", raw_token({"alg": "HS256"}, claims(sub={"id": 1}))),
    (
        "HS256 signed with the RSA public key's PEM (algorithm confusion)",
        raw_token({"alg": "HS256", "typ": "JWT"}, claims(), key=RSA_PUBLIC.encode()),
    ),
    ("ES256 header with an RSA signature", raw_token({"alg": "ES256"}, claims())),
    ("two dots only", "Bearer .."),
    ("four segments", "Bearer a.b.c.d"),
    ("not base64", "Bearer !!!.???.***"),
    ("bearer in lower case, bad token", "bearer x.y.z"),
]


@pytest.mark.parametrize("header", [h[1] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_tokens_get_401_not_500(app: Flask, header: str) -> None:
    if not header.lower().startswith("bearer "):
        header = f"Bearer {header}"
    response = post(app, header)
    assert response.status_code == 401, response.get_json()
    assert response.get_json()["error"]["code"] == "unauthorized"
    challenge_header = response.headers["WWW-Authenticate"]
    assert challenge_header.startswith('Bearer realm="qrsight", error="invalid_token"')
    assert "\n" not in challenge_header and "\r" not in challenge_header


def test_algorithm_confusion_is_refused_when_only_the_public_key_is_set() -> None:
    app = offline_app(api_settings(auth_enabled=True, auth_jwt_public_key=RSA_PUBLIC))
    forged = raw_token({"alg": "HS256"}, claims(aud=None, iss=None), key=RSA_PUBLIC.encode())
    assert post(app, f"Bearer {forged}").status_code == 401
    assert post(app, f"Bearer {rs(aud=None, iss=None)}").status_code == 503


def ec_and_ed_keys() -> list[tuple[str, Any, str]]:
    p256 = ec.generate_private_key(ec.SECP256R1())
    p384 = ec.generate_private_key(ec.SECP384R1())
    ed = ed25519.Ed25519PrivateKey.generate()
    return [("ES256", p256, pem(p256)), ("ES384", p384, pem(p384)), ("EdDSA", ed, pem(ed))]


def pem(private: Any) -> str:
    public: bytes = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public.decode()


@pytest.mark.parametrize(("alg", "key", "public"), ec_and_ed_keys(), ids=lambda v: str(v)[:6])
def test_each_key_type_accepts_its_one_algorithm(alg: str, key: Any, public: str) -> None:
    app = offline_app(api_settings(auth_enabled=True, auth_jwt_public_key=public))
    good = jwt.encode(claims(aud=None, iss=None), key, algorithm=alg)
    assert post(app, f"Bearer {good}").status_code == 503  # past auth
    for other in ("RS256", "HS256", "none"):
        forged = raw_token({"alg": other}, claims(aud=None, iss=None), key=public.encode())
        assert post(app, f"Bearer {forged}").status_code == 401


SMALL_RSA = rsa.generate_private_key(public_exponent=65537, key_size=1024)
BAD_KEYS = [
    ("HS256 secret too short", {"auth_jwt_secret": "short-secret"}, "QRSIGHT_AUTH_JWT_SECRET"),
    ("PEM in the secret", {"auth_jwt_secret": RSA_PUBLIC}, "QRSIGHT_AUTH_JWT_PUBLIC_KEY"),
    ("RSA under 2048 bits", {"auth_jwt_public_key": pem(SMALL_RSA)}, "2048"),
    (
        "not a public key",
        {"auth_jwt_public_key": "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"},
        "QRSIGHT_AUTH_JWT_PUBLIC_KEY",
    ),
]


@pytest.mark.parametrize(
    ("values", "named"), [b[1:] for b in BAD_KEYS], ids=[b[0] for b in BAD_KEYS]
)
def test_unsafe_keys_refuse_to_start(values: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        create_app(api_settings(auth_enabled=True, **values))
