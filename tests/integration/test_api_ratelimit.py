"""Rate limits as deployed: two gunicorn workers sharing one count in a real Redis
(``redis-server`` from Debian, started here on a free port), one client rotating
``X-Forwarded-For``/``Forwarded`` on fresh connections, a token guesser.

With ``memory://`` each worker would count on its own (twice the limit here); with the
shared store the client gets exactly the limit, whichever worker answers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
def shared(
    kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = make_stack(
        kafka_bootstrap,
        tmp_path_factory.mktemp("ratelimit"),
        api_workers=2,
        detection_workers=0,
        rate_limit=f"{LIMIT}/minute",
        rate_limit_storage_uri=redis_url,
        auth_enabled=True,
        auth_jwt_secret=SECRET,
    )
    yield stack
    stack.stop()


def served_pids(log: Path, status: int) -> set[str]:
    return set(
        re.findall(rf'"POST /api/v1/detect HTTP/1.1" {status} .* pid=<?(\d+)>?', log.read_text())
    )


def test_one_client_rotating_forwarded_headers_gets_the_limit_across_workers(
    shared: Stack,
) -> None:

    def post(i: int) -> requests.Response:
        fake = f"203.0.113.{i}"
        headers = {
            "Connection": "close",  # a new connection each time: both workers answer
            "X-Forwarded-For": fake,
            "Forwarded": f"for={fake}",
            "X-Real-IP": fake,
            **token("rotating-client"),
        }
        return requests.post(f"{shared.url}/api/v1/detect", data=b"", headers=headers, timeout=10)

    # 8 at a time: one after another, an idle machine can hand every accept to one worker
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(post, range(3 * LIMIT)))
    counts = Counter(r.status_code for r in statuses)
    assert counts == {400: LIMIT, 429: 2 * LIMIT}, counts
    assert all(int(r.headers["Retry-After"]) > 0 for r in statuses if r.status_code == 429)
    assert len(served_pids(shared.api_log, 429)) == 2  # both workers counted in one store


def test_token_guessing_is_limited_by_address(shared: Stack) -> None:
    image = qr_png("guess")[0]
    statuses = Counter(
        requests.post(
            f"{shared.url}/api/v1/detect",
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
