"""The API end to end: real broker, real workers (``python -m consumer.cli``), the app under
real gunicorn (``python -m api.cli``) on a free port.

One "full" stack (2 gunicorn workers + 1 detection worker) serves the happy paths; a
"bare" stack (1 gunicorn worker, auth and a rate limit on, no detection worker on its
topic) serves 401/429/504. The 503 and /ready cases build the app in-process with a real
reply client.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from api import create_app
from core.runtime.settings import load_settings
from core.vision.postprocess import box_iou
from producer_tools.topics import create_topics
from tests.integration.api_stack import (
    FIXED_BOX,
    IMAGE_SIZE,
    REPO,
    SECRET,
    Stack,
    free_port,
    make_stack,
    metric,
    payloads,
    qr_png,
    token,
    wait_ready,
)
from tests.integration.kafka_topics import fresh_settings

pytestmark = pytest.mark.integration

BOOT_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def full(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = make_stack(
        kafka_bootstrap,
        tmp_path_factory.mktemp("full"),
        api_workers=2,
        detection_workers=1,
        rate_limit="off",
        # room for 100 concurrent requests even if one gunicorn worker accepts them all
        api_threads=108,
        api_max_in_flight=100,
    )
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def bare(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = make_stack(
        kafka_bootstrap,
        tmp_path_factory.mktemp("bare"),
        api_workers=1,
        detection_workers=0,
        rate_limit="3/minute",
        auth_enabled=True,
        auth_jwt_secret=SECRET,
        api_timeout_ms=1500,
    )
    yield stack
    stack.stop()


def check_detection(stack: Stack, body: dict[str, Any], text: str, true_box: np.ndarray) -> None:
    assert body["image"] == {"width": IMAGE_SIZE, "height": IMAGE_SIZE}
    assert body["model"]["name"]
    assert body["timings"]["total_ms"] >= 0
    results = body["results"]
    assert results, body
    best = max(results, key=lambda r: r["confidence"])
    box = np.array([best["x1"], best["y1"], best["x2"], best["y2"]])
    if stack.real_model:
        assert box_iou(box, true_box)[0, 0] > 0.5, (box, true_box)
    else:
        assert len(results) == 1, results
        cx, cy, w, h = FIXED_BOX
        assert np.allclose(box, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], atol=1.0)
    assert best["label"] == "qr"
    assert best["text"] == text
    assert payloads(body) == {text}


def test_multipart_and_raw_body_get_the_box_and_payload(full: Stack) -> None:
    data, true_box = qr_png("https://example.com/parcel/42")
    multipart = requests.post(
        f"{full.url}/api/v1/detect",
        files={"image": ("qr.png", io.BytesIO(data), "image/png")},
        timeout=30,
    )
    assert multipart.status_code == 200, multipart.text
    check_detection(full, multipart.json(), "https://example.com/parcel/42", true_box)
    raw = requests.post(
        f"{full.url}/api/v1/detect?conf=0.25&decode=true",
        data=data,
        headers={"Content-Type": "image/png", "X-Request-ID": "raw-1"},
        timeout=30,
    )
    assert raw.status_code == 200, raw.text
    assert raw.headers["X-Request-ID"] == "raw-1"  # the caller's id is echoed, not used
    assert raw.json()["request_id"] != "raw-1"
    check_detection(full, raw.json(), "https://example.com/parcel/42", true_box)


def test_decode_off_returns_boxes_without_payloads(full: Stack) -> None:
    data, _ = qr_png("no decode please")
    response = requests.post(
        f"{full.url}/api/v1/detect?decode=false",
        data=data,
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json()["results"]
    assert payloads(response.json()) == set()


def test_100_concurrent_requests_sharing_50_request_ids_each_get_their_own_payload(
    full: Stack,
) -> None:
    """The caller's X-Request-ID is echoed, never the correlation id: two requests that
    share one cannot take each other's reply (nor strand each other in a timeout)."""
    sent = [
        (f"client-id-{i % 50:02d}", f"payload-{i:03d}-{uuid.uuid4().hex[:6]}") for i in range(100)
    ]
    images = {payload: qr_png(payload)[0] for _, payload in sent}

    def post(item: tuple[str, str]) -> tuple[str, str, requests.Response]:
        client_id, payload = item
        # a new connection per request, so both gunicorn workers take some
        response = requests.post(
            f"{full.url}/api/v1/detect?timeout_ms=30000",
            data=images[payload],
            headers={"Content-Type": "image/png", "Connection": "close", "X-Request-ID": client_id},
            timeout=60,
        )
        return client_id, payload, response

    with ThreadPoolExecutor(100) as pool:
        answers = list(pool.map(post, sent))
    statuses = Counter(response.status_code for _, _, response in answers)
    assert statuses == {200: 100}, statuses
    for client_id, payload, response in answers:
        assert payloads(response.json()) == {payload}
        assert response.headers["X-Request-ID"] == client_id
    assert len({response.json()["request_id"] for _, _, response in answers}) == 100
    log = full.api_log.read_text()
    served = r'"POST /api/v1/detect\?\S* HTTP/1.1" 200 .* pid=<?(\d+)>?'
    served_by = Counter(re.findall(served, log))
    assert len(served_by) == 2, served_by  # both gunicorn workers answered some
    for client_id, _, response in answers[:5]:  # the access line has our id and the caller's
        rid = response.json()["request_id"]
        lines = [
            line for line in log.splitlines() if f"request_id={rid}" in line and "POST" in line
        ]
        assert len(lines) == 2, lines  # the app's request line and gunicorn's access line
        assert all(f"client_request_id={client_id} " in line for line in lines), lines


def test_gunicorns_own_refusals_are_json_errors(full: Stack) -> None:
    long_header = requests.get(
        f"{full.url}/api/v1/health", headers={"X-Big": "x" * 9000}, timeout=10
    )
    long_line = requests.get(f"{full.url}/api/v1/health?pad={'x' * 5000}", timeout=10)
    for response, status, code in (
        (long_header, 431, "headers_too_large"),
        (long_line, 414, "uri_too_long"),
    ):
        assert response.status_code == status
        assert response.headers["Content-Type"] == "application/json"
        assert response.json()["error"]["code"] == code


INVALID = [
    ("empty", b"", "image/png", 400, "empty_image"),
    ("corrupt PNG", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image/png", 400, "corrupt_image"),
    ("GIF", b"GIF89a" + b"\x00" * 40, "image/gif", 415, "unsupported_type"),
    ("body too big", b"\xff\xd8\xff" + b"\x00" * 2_200_000, "image/jpeg", 413, "image_too_large"),
]


@pytest.mark.parametrize(
    ("data", "ctype", "status", "code"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_input_is_refused_under_gunicorn(
    full: Stack, data: bytes, ctype: str, status: int, code: str
) -> None:
    response = requests.post(
        f"{full.url}/api/v1/detect", data=data, headers={"Content-Type": ctype}, timeout=30
    )
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_pixel_bomb_is_refused_from_its_header(full: Stack) -> None:
    from tests.unit.test_api_helpers import png_claiming

    response = requests.post(
        f"{full.url}/api/v1/detect",
        data=png_claiming(60_000, 60_000),
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "image_too_large"


def test_metrics_add_up_the_counts_of_both_workers(full: Stack) -> None:
    before = requests.get(f"{full.url}/api/v1/metrics", timeout=10).text
    # 8 at a time on fresh connections: one after another, an idle machine can hand every
    # accept to the same worker
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda _: requests.get(
                    f"{full.url}/api/v1/health", headers={"Connection": "close"}, timeout=10
                ),
                range(40),
            )
        )
    after = requests.get(f"{full.url}/api/v1/metrics", timeout=10).text
    labels = {"method": "GET", "route": "/api/v1/health", "status": "200"}
    delta = metric(after, "qrsight_api_requests_total", **labels) - metric(
        before, "qrsight_api_requests_total", **labels
    )
    assert delta == 40
    partitions = re.findall(r'^qrsight_api_reply_partition\{pid="\d+"\} (\S+)', after, re.MULTILINE)
    assert sorted(float(p) for p in partitions) == [0.0, 1.0]
    health_pids = set(
        re.findall(r'"GET /api/v1/health HTTP/1.1" 200 .* pid=<?(\d+)>?', full.api_log.read_text())
    )
    assert len(health_pids) == 2  # the 40 were served by both workers, yet counted once each


def test_a_replaced_worker_takes_over_the_free_reply_partition(full: Stack) -> None:
    text = requests.get(f"{full.url}/api/v1/metrics", timeout=10).text
    owners = dict(re.findall(r'^qrsight_api_reply_partition\{pid="(\d+)"\} (\S+)', text, re.M))
    victim = next(pid for pid, part in owners.items() if float(part) == 1.0)
    os.kill(int(victim), signal.SIGKILL)
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while True:
        assert time.monotonic() < deadline, owners
        time.sleep(0.5)
        try:
            text = requests.get(f"{full.url}/api/v1/metrics", timeout=10).text
        except requests.RequestException:
            continue
        owners = dict(re.findall(r'^qrsight_api_reply_partition\{pid="(\d+)"\} (\S+)', text, re.M))
        # the new worker's sample reads 0 until its app is built, then its partition
        if victim not in owners and sorted(float(p) for p in owners.values()) == [0.0, 1.0]:
            break
    wait_ready(full, 2)
    data, _ = qr_png("after restart")
    for _ in range(6):  # fresh connections: both workers answer
        response = requests.post(
            f"{full.url}/api/v1/detect",
            data=data,
            headers={"Content-Type": "image/png", "Connection": "close"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert payloads(response.json()) == {"after restart"}


def test_401_without_a_token(bare: Stack) -> None:
    response = requests.post(
        f"{bare.url}/api/v1/detect",
        data=qr_png("x")[0],
        headers={"Content-Type": "image/png"},
        timeout=10,
    )
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "unauthorized"


def test_429_after_the_limit(bare: Stack) -> None:
    headers = {"Content-Type": "image/png", **token("rate-test")}
    statuses = [
        requests.post(
            f"{bare.url}/api/v1/detect", data=b"", headers=headers, timeout=10
        ).status_code
        for _ in range(4)
    ]
    assert statuses == [400, 400, 400, 429]
    response = requests.post(f"{bare.url}/api/v1/detect", data=b"", headers=headers, timeout=10)
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) > 0
    assert response.json()["error"]["code"] == "rate_limited"
    assert requests.get(f"{bare.url}/api/v1/health", timeout=10).status_code == 200


def test_504_when_no_worker_answers(bare: Stack) -> None:
    data = qr_png("nobody home")[0]
    started = time.monotonic()
    response = requests.post(
        f"{bare.url}/api/v1/detect?timeout_ms=1000",
        data=data,
        headers={"Content-Type": "image/png", **token("timeout-test")},
        timeout=10,
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    body = response.json()["error"]
    assert body["code"] == "timeout"
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert 1.0 <= elapsed < 2.0


def test_503_fast_when_the_broker_is_unreachable() -> None:
    settings = load_settings({}, kafka_bootstrap=f"127.0.0.1:{free_port()}", rate_limit="off")
    app = create_app(settings)
    try:
        client = app.test_client()
        started = time.monotonic()
        response = client.post("/api/v1/detect", data=qr_png("down")[0], content_type="image/png")
        assert response.status_code == 503
        assert response.get_json()["error"]["code"] == "kafka_unavailable"
        assert time.monotonic() - started < 1.0
        ready = client.get("/api/v1/ready")
        assert ready.status_code == 503
        assert "not assigned" in ready.get_json()["error"]["message"]
        for answer in (response, ready):  # no broker address for clients to learn
            assert settings.kafka_bootstrap not in answer.get_data(as_text=True)
    finally:
        app.extensions["qrsight"].replies.close()


def test_ready_turns_200_once_the_reply_partition_is_assigned(kafka_bootstrap: str) -> None:
    uid = uuid.uuid4().hex[:8]
    settings = fresh_settings(
        kafka_bootstrap, uid, topic_partitions=1, replies_partitions=2, rate_limit="off"
    )
    app = create_app(settings)  # its reply topic does not exist yet
    try:
        client = app.test_client()
        response = client.get("/api/v1/ready")
        assert response.status_code == 503
        assert response.get_json()["error"]["code"] == "not_ready"
        create_topics(settings)
        deadline = time.monotonic() + 30
        while client.get("/api/v1/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/api/v1/ready").get_json()
            time.sleep(0.2)
        assert client.get("/api/v1/ready").get_json() == {"status": "ready", "reply_partition": 0}
    finally:
        app.extensions["qrsight"].replies.close()


KAFKA_SH = REPO / "deploy" / "local" / "kafka.sh"


def kafka_sh(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KAFKA_SH), command], env=env, capture_output=True, text=True, timeout=400, check=False
    )


def detect_in_process(client: Any, timeout_ms: int) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    response = client.post(
        f"/api/v1/detect?timeout_ms={timeout_ms}", data=qr_png("w")[0], content_type="image/png"
    )
    return response.status_code, response.get_json(), time.monotonic() - started


def wait_for_504(client: Any, within_s: float) -> None:
    """No detection worker runs: a request Kafka took ends in 504."""
    deadline = time.monotonic() + within_s
    while (answer := detect_in_process(client, 300))[0] != 504:
        assert answer[0] == 503 and time.monotonic() < deadline, answer
        time.sleep(0.5)


@pytest.mark.slow
def test_503_at_once_while_the_broker_takes_no_writes_and_back_when_it_does(
    tmp_path: Path,
) -> None:
    """A broker of its own under a ready app. Frozen (SIGSTOP: connections open, no answer),
    the first calls fail within the produce timeout, the next ones at once with
    Retry-After, and /ready says why; resumed, requests go through without a restart.
    Stopped, every call is refused at once; no answer names the broker."""
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_HOME_DIR": str(tmp_path / "kafka"),
        "QRSIGHT_KAFKA_PORT": str(port),
        "KAFKA_START_TIMEOUT": "180",
    }
    env.pop("KAFKA_CONTROLLER_PORT", None)
    started = kafka_sh("up", env)
    assert started.returncode == 0, started.stdout + started.stderr
    broker_pid = int((tmp_path / "kafka" / "kafka.pid").read_text())
    settings = load_settings(
        {},
        kafka_bootstrap=f"127.0.0.1:{port}",
        rate_limit="off",
        topic_partitions=1,
        replies_partitions=1,
        api_produce_timeout_ms=1000,
    )
    app = None
    try:
        create_topics(settings)
        app = create_app(settings)
        assert app.extensions["qrsight"].replies.wait_ready(60)
        client = app.test_client()
        assert client.get("/api/v1/ready").status_code == 200
        wait_for_504(client, 30)

        os.kill(broker_pid, signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(3) as pool:
                first = list(
                    pool.map(lambda _: detect_in_process(app.test_client(), 20_000), range(3))
                )
            for status, body, took in first:
                assert (status, body["error"]["code"]) == (503, "kafka_unavailable"), body
                assert took < 1.0 + 1.0
            started_at = time.monotonic()
            refused = client.post("/api/v1/detect", data=qr_png("x")[0], content_type="image/png")
            assert time.monotonic() - started_at < 0.5  # not the produce timeout again
            assert refused.status_code == 503, refused.get_json()
            assert int(refused.headers["Retry-After"]) >= 1
            ready = client.get("/api/v1/ready")
            assert ready.status_code == 503
            assert "not taking writes" in ready.get_json()["error"]["message"]
        finally:
            os.kill(broker_pid, signal.SIGCONT)
        wait_for_504(client, 60)
        assert client.get("/api/v1/ready").status_code == 200

        stopped = kafka_sh("down", env)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        started_at = time.monotonic()
        response = client.post(
            "/api/v1/detect?timeout_ms=20000", data=qr_png("down")[0], content_type="image/png"
        )
        assert response.status_code == 503, response.get_json()
        assert response.get_json()["error"]["code"] == "kafka_unavailable"
        assert time.monotonic() - started_at < 1.0 + 1.0
        # the next calls do not wait out the produce timeout again: 503 at once
        started_at = time.monotonic()
        again = client.post("/api/v1/detect", data=qr_png("down")[0], content_type="image/png")
        assert again.status_code == 503, again.get_json()
        assert time.monotonic() - started_at < 0.5
        assert int(again.headers["Retry-After"]) >= 1
        ready = client.get("/api/v1/ready")
        assert ready.status_code == 503
        assert "unreachable" in ready.get_json()["error"]["message"]
        for answer in (response, again, ready):
            assert f"127.0.0.1:{port}" not in answer.get_data(as_text=True)
    finally:
        if app is not None:
            app.extensions["qrsight"].replies.close()
        kafka_sh("down", env)
