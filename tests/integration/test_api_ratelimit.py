"""Rate limits as deployed: two pods (gunicorn masters, one with two workers) sharing
one count in a real Redis (``redis-server`` from Debian, started here on a free port), one
client rotating ``X-Forwarded-For``/``Forwarded`` on fresh connections across both, a
token guesser.

With ``memory://`` each worker would count on its own (up to three times the limit here);
with the shared store the client gets exactly the limit, whichever pod and worker answers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from tests.integration.api_stack import SECRET, Stack, free_port, make_stack, qr_png, token

pytestmark = pytest.mark.integration

LIMIT = 10


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing: deploy/local/test-tools.sh installs it")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    args += ["--appendonly", "no", "--dir", str(folder)]
    with (folder / "redis.log").open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert proc.poll() is None, (folder / "redis.log").read_text()
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def pods(
    kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Stack]]:
    """Two pods on one store: gunicorn masters on their own ports, with 2 and 1 workers."""
    stacks: list[Stack] = []
    try:
        for api_workers in (2, 1):
            stacks.append(
                make_stack(
                    kafka_bootstrap,
                    tmp_path_factory.mktemp("ratelimit"),
                    api_workers=api_workers,
                    detection_workers=0,
                    rate_limit=f"{LIMIT}/minute",
                    rate_limit_storage_uri=redis_url,
                    auth_enabled=True,
                    auth_jwt_secret=SECRET,
                )
            )
        yield stacks
    finally:
        for stack in stacks:
            stack.stop()


def test_one_client_rotating_forwarded_headers_gets_the_limit_across_workers_and_pods(
    pods: list[Stack],
) -> None:
    """Requests alternate between two pods (which gunicorn worker of a pod answers is the
    kernel's choice, so the pods are what makes the sharing certain): with per-process
    counts the client would get its limit once per process."""

    def post(i: int) -> tuple[int, requests.Response]:
        fake = f"203.0.113.{i}"
        headers = {
            "Connection": "close",  # a new connection each time: any worker may answer
            "X-Forwarded-For": fake,
            "Forwarded": f"for={fake}",
            "X-Real-IP": fake,
            **token("rotating-client"),
        }
        url = f"{pods[i % 2].url}/api/v1/detect"
        return i % 2, requests.post(url, data=b"", headers=headers, timeout=10)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, range(3 * LIMIT)))
    counts = Counter(r.status_code for _, r in answers)
    assert counts == {400: LIMIT, 429: 2 * LIMIT}, counts
    assert all(int(r.headers["Retry-After"]) > 0 for _, r in answers if r.status_code == 429)
    refused_by = Counter(pod for pod, r in answers if r.status_code == 429)
    assert set(refused_by) == {0, 1}, refused_by  # both pods counted in one store


def test_token_guessing_is_limited_by_address(pods: list[Stack]) -> None:
    image = qr_png("guess")[0]
    statuses = Counter(
        requests.post(
            f"{pods[0].url}/api/v1/detect",
            data=image,
            headers={
                "Content-Type": "image/png",
                "Connection": "close",
                "Authorization": f"Bearer guess.{i}.x",
            },
            timeout=10,
        ).status_code
        for i in range(2 * LIMIT)
    )
    # counted by address (the other test's requests had a valid token: counted by subject)
    assert statuses == {401: LIMIT, 429: LIMIT}, statuses
