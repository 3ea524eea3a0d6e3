"""Schemathesis against the served API: generated requests, real gunicorn, a real broker,
a real detection worker; auth off and on.

Two API processes under gunicorn share one set of topics and one detection worker: one
with auth off, one with auth on (each reads its own reply partition). Schemathesis reads
the OpenAPI document each one serves (``/api/v1/openapi.json``) and generates requests
for every operation, valid and invalid ones (positive and negative modes), and three
mutators are drawn on top of them:

- ``Authorization``: no header, other schemes, a valid token, and tokens whose JWT header
  (``alg`` of every JSON type, ``none``, ``kid``, ``crit``, ``jku``...) or claims (``exp``,
  ``nbf``, ``iat``, ``aud``, ``iss``, ``sub`` of every type and time) are mutated, signed
  with the right secret, a wrong one, or the RSA public key's PEM (algorithm confusion);
- the image: real PNG/JPEG codes, truncated and bit-flipped ones, decompression-bomb
  headers, other formats, nothing;
- ``X-Request-ID``: the same few ids over and over, and junk.

Every response must have a documented status with a body, content type and headers as
documented, and no 5xx but 504 (a worker answer that cannot come in ``timeout_ms``):
with a healthy broker and one client, a 500 or a 503 is a bug. 200 needs the detection
worker, which runs here; every other status does not.

Cases: ``API_FUZZ_CASES`` per auth mode (default 600: 525 for /detect, 25 for each of
health, ready and metrics; Schemathesis leaves out openapi.json, the document it reads),
so 1,200 in all; ``API_FUZZ_SEED`` replays a run (the seed is printed).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.api_stack import SECRET, Stack, make_stack, qr_png
from tests.unit.test_api_helpers import png_claiming

pytestmark = pytest.mark.integration

CASES = int(os.environ.get("API_FUZZ_CASES", "600"))
SEED = int(os.environ.get("API_FUZZ_SEED", str(random.randrange(2**32))))
OTHER_OPERATION_CASES = 25
DETECT = ("/api/v1/detect", "POST")
# 5xx a healthy deployment may give: the reply cannot come within a tiny timeout_ms
EXPECTED_5XX = {(504, "timeout")}


@dataclass
class Report:
    statuses: Counter[tuple[str, int, str]] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def count(self, operation: str | None = None, status: int | None = None) -> int:
        return sum(
            n
            for (op, st_, _), n in self.statuses.items()
            if operation in (None, op) and status in (None, st_)
        )


@pytest.fixture(scope="module")
def stacks(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Stack]]:
    """Auth off (``off``) and on (``on``): two gunicorn APIs, one detection worker."""
    tmp = tmp_path_factory.mktemp("fuzz")
    common: dict[str, Any] = {
        "rate_limit": "100000/minute",  # the limiter runs on every case, never refuses
        "api_timeout_ms": 5000,
        "api_max_timeout_ms": 5000,
        "log_level": "WARNING",
    }
    open_api = make_stack(kafka_bootstrap, tmp, api_workers=1, detection_workers=1, **common)
    shared = {
        name: getattr(open_api.settings, name)
        for name in ("topic_images", "topic_detections", "topic_replies", "topic_dlq")
    }
    try:
        secured = make_stack(
            kafka_bootstrap,
            tmp,
            api_workers=1,
            detection_workers=0,
            api_reply_partition=1,
            consumer_group=open_api.settings.consumer_group,
            auth_enabled=True,
            auth_jwt_secret=SECRET,
            **shared,
            **common,
        )
    except BaseException:
        open_api.stop()
        raise
    yield {"off": open_api, "on": secured}
    secured.stop(drop_topics=False)
    open_api.stop()


# --- mutators --------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rsa_public_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


NOW = int(time.time())
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=6,
)
ALGS = st.sampled_from(
    [
        "HS256",
        "HS384",
        "HS512",
        "RS256",
        "ES256",
        "EdDSA",
        "PS256",
        "none",
        "None",
        "",
        "hs256",
        "HS256 ",
    ]
)
JWT_HEADER = st.one_of(
    st.fixed_dictionaries(
        {"alg": ALGS | JSON},
        optional={
            "typ": st.sampled_from(["JWT", "jwt", "at+jwt"]) | JSON,
            "kid": st.sampled_from(["../../etc/passwd", "' OR 1=1 --", "k1"]) | JSON,
            "crit": st.sampled_from([["exp"], ["b64"], []]) | JSON,
            "jku": st.just("http://169.254.169.254/latest/keys"),
            "x5u": st.just("http://evil.example/cert"),
            "jwk": JSON,
            "b64": st.booleans(),
        },
    ),
    JSON,  # not even an object
)
TIMES = st.one_of(
    st.sampled_from([NOW - 3600, NOW + 3600, NOW + 60, 0, -1, 2**63, 2**64, 10**30]),
    st.integers(NOW - 10**6, NOW + 10**6),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    JSON,
)
CLAIMS = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "sub": st.text(max_size=10) | JSON,
            "exp": TIMES,
            "nbf": TIMES,
            "iat": TIMES,
            "aud": st.sampled_from(["qrsight", ["qrsight", "x"]]) | JSON,
            "iss": st.sampled_from(["https://issuer.example"]) | JSON,
        },
    ),
    JSON,
)
KEYS = st.sampled_from(
    [SECRET.encode(), b"another-secret-that-is-long-enough-for-hs256", rsa_public_pem(), b""]
)


@st.composite
def mutated_tokens(draw: st.DrawFn) -> str:
    header = b64(json.dumps(draw(JWT_HEADER)).encode())
    payload = b64(json.dumps(draw(CLAIMS)).encode())
    signing_input = f"{header}.{payload}"
    signature = b64(hmac.new(draw(KEYS), signing_input.encode(), hashlib.sha256).digest())
    match draw(st.sampled_from(["keep", "drop", "truncate", "empty", "extra"])):
        case "drop":
            return signing_input
        case "truncate":
            return f"{signing_input}.{signature[:10]}"
        case "empty":
            return f"{signing_input}."
        case "extra":
            return f"{signing_input}.{signature}.{signature}"
    return f"{signing_input}.{signature}"


def valid_token(subject: str) -> str:
    import jwt

    return jwt.encode({"sub": subject, "exp": NOW + 3600}, SECRET, algorithm="HS256")


HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E)
    | st.characters(min_codepoint=0xA1, max_codepoint=0xFF),
    max_size=60,
)
# Half the cases carry a valid token, so that with auth on the checks behind the token
# (size, type, pixels, the Kafka round trip) are reached often enough that every seed
# reaches each of them; the other half are hostile.
VALID_TOKENS = st.one_of(
    st.builds(valid_token, st.text(max_size=8)),
    st.builds(valid_token, st.sampled_from(["alice", "bob"])),
)
HOSTILE_AUTHORIZATION = st.one_of(
    st.none(),  # as generated: none
    st.builds("Bearer {}".format, mutated_tokens()),
    st.builds("Bearer {}".format, mutated_tokens()),
    st.sampled_from(
        [
            "Bearer",
            "Bearer ",
            "bearer x.y.z",
            "Basic dXNlcjpwYXNz",
            "Token abc",
            "Bearer a.b",
            "Bearer ....",
            "Bearer " + "A" * 5000,
            "Bearer " + "A" * 9000,
        ]
    ),
    HEADER_TEXT,
)
AUTHORIZATION = st.one_of(VALID_TOKENS, HOSTILE_AUTHORIZATION).map(
    lambda value: (
        value if value is None or " " in value or value.count(".") != 2 else f"Bearer {value}"
    )
)


def images() -> list[bytes]:
    png = qr_png("fuzz")[0]
    ok, jpg = cv2.imencode(".jpg", cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR))
    assert ok
    flipped = bytearray(png)
    flipped[20] ^= 0xFF  # inside IHDR: its CRC no longer matches
    return [
        png,
        jpg.tobytes(),
        png[: len(png) * 2 // 3],  # truncated
        bytes(flipped),
        png_claiming(60_000, 60_000),  # decompression-bomb header
        png_claiming(0, 10),
        b"GIF89a" + b"\x00" * 64,
        b"",
        b"\x00" * 128,
    ]


def oversized() -> list[bytes]:
    """Over the body limit; a branch of their own, so that every seed reaches the size check
    (behind the token with auth on) many times, not by luck."""
    png = qr_png("fuzz")[0]
    return [b"\xff\xd8\xff" + b"\x00" * 2_100_000, png[:64] + b"\x00" * 2_100_000]


IMAGES = st.one_of(st.none(), st.sampled_from(images()), st.sampled_from(oversized()))
REQUEST_IDS = st.one_of(st.none(), st.sampled_from(["dup-1", "dup-2", "dup-1"]), HEADER_TEXT)
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


# --- the run ---------------------------------------------------------------------------
def error_code(response: requests.Response) -> str:
    if response.status_code < 400:
        return "-"
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "not-json"


def describe(case: schemathesis.Case, detail: str) -> str:
    body = case.body if isinstance(case.body, bytes | str) else repr(case.body)
    return (
        f"{case.method} {case.path} query={case.query} headers={case.headers} "
        f"media_type={case.media_type} body={str(body)[:120]!r}: {detail[:600]}"
    )


def fuzz_operation(stack: Stack, operation: Any, examples: int, report: Report) -> None:
    label = f"{operation.method.upper()} {operation.path}"
    strategy = operation.as_strategy(GenerationMode.POSITIVE)
    if (operation.path, operation.method.upper()) == DETECT:
        strategy = st.one_of(strategy, operation.as_strategy(GenerationMode.NEGATIVE))
    session = requests.Session()

    @seed(SEED)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy, auth=AUTHORIZATION, image=IMAGES, request_id=REQUEST_IDS)
    def one(
        case: schemathesis.Case, auth: str | None, image: bytes | None, request_id: str | None
    ) -> None:
        headers = dict(case.headers or {})
        if auth is not None:
            headers["Authorization"] = auth
        if request_id is not None:
            headers["X-Request-ID"] = request_id
        case.headers = headers
        if image is not None and case.media_type is not None:
            case.body = {"image": image} if case.media_type == "multipart/form-data" else image
        try:
            response = case.call(base_url=stack.url, session=session, timeout=30)
        except requests.RequestException as exc:
            report.failures.append(describe(case, f"no response: {exc!r}"))
            return
        code = error_code(response)
        report.statuses[(label, response.status_code, code)] += 1
        if response.status_code >= 500 and (response.status_code, code) not in EXPECTED_5XX:
            report.failures.append(describe(case, f"unexpected {response.status_code} {code}"))
        try:
            case.validate_response(response, checks=CHECKS)
        except Exception as exc:  # schemathesis reports every check that failed at once
            report.failures.append(describe(case, f"{response.status_code}: {exc}"))

    one()


def fuzz(stack: Stack) -> Report:
    # Schemathesis leaves out the operation it reads the schema from (openapi.json)
    schema = schemathesis.openapi.from_url(f"{stack.url}/api/v1/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    others = len(operations) - 1
    report = Report()
    for operation in operations:
        is_detect = (operation.path, operation.method.upper()) == DETECT
        examples = CASES - others * OTHER_OPERATION_CASES if is_detect else OTHER_OPERATION_CASES
        fuzz_operation(stack, operation, max(examples, 1), report)
    return report


def summary(mode: str, report: Report, took: float) -> str:
    lines = [f"auth {mode}: {sum(report.statuses.values())} cases in {took:.0f} s (seed {SEED})"]
    lines += [
        f"  {op} {status} {code}: {n}" for (op, status, code), n in sorted(report.statuses.items())
    ]
    return "\n".join(lines)


@pytest.mark.parametrize("mode", ["off", "on"])
def test_every_generated_request_gets_a_documented_answer(
    stacks: dict[str, Stack], mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    report = fuzz(stacks[mode])
    with capsys.disabled():
        print("\n" + summary(mode, report, time.monotonic() - started))
    assert report.failures == [], f"{len(report.failures)} failures (seed {SEED}):\n" + "\n".join(
        report.failures[:10]
    )
    assert sum(report.statuses.values()) >= CASES
    detect = f"{DETECT[1]} {DETECT[0]}"
    for status in (200, 400, 413, 415):
        assert report.count(detect, status) > 0, (status, summary(mode, report, 0))
    assert report.count(detect, 401) > 0 if mode == "on" else report.count(detect, 401) == 0
