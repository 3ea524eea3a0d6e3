"""The one-command local stack, as a newcomer uses it: ``make up``, ``make demo``, the web
page in a real headless Chromium, then Ctrl-C, which must leave no process behind.

The stack starts its own broker (like ``make up`` on a fresh machine), on free ports,
with its state in a temp dir. The tests in this file run in order on one stack.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.runtime.settings import REPO_ROOT

SAMPLES = REPO_ROOT / "samples"
UP_TIMEOUT_S = 300.0
STOP_BOUND_S = 60.0
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    proc: subprocess.Popen[str]
    env: dict[str, str]
    api: str
    marker: str
    log: Path


def processes_with(marker: str) -> list[str]:
    """Command lines of live processes whose environment carries ``marker``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in environ and int(pid) != os.getpid():
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{pid}: {command}")
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("stack")
    port = _free_port()
    marker = f"STACK_TEST_{uuid.uuid4().hex}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("QRSIGHT_")},
        "KAFKA_HOME_DIR": str(home / "kafka"),
        "QRSIGHT_KAFKA_PORT": str(port),
        "QRSIGHT_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
        "QRSIGHT_API_PORT": str(_free_port()),
        "QRSIGHT_METRICS_PORT": str(_free_port()),
        "PYTHONUNBUFFERED": "1",
        marker: "1",
    }
    env.pop("KAFKA_CONTROLLER_PORT", None)
    log = home / "stack.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "producer_tools.stack"],
            env=env,
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    deadline = time.monotonic() + UP_TIMEOUT_S
    while "qrsight is up" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"make up did not come up:\n{log.read_text()[-4000:]}", pytrace=False)
        time.sleep(1.0)
    running = Stack(proc, env, f"http://127.0.0.1:{env['QRSIGHT_API_PORT']}", marker, log)
    try:
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_BOUND_S)
            except subprocess.TimeoutExpired:
                proc.kill()
        for line in processes_with(marker):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)


def expected_texts() -> dict[str, list[str]]:
    lines = (SAMPLES / "manifest.jsonl").read_text().splitlines()
    return {str(SAMPLES / m["path"]): sorted(m["texts"]) for m in map(json.loads, lines)}


def test_make_demo_reads_every_sample_payload_and_nothing_on_the_empty_one(stack: Stack) -> None:
    # `make demo` is `qrsight-publish samples/ --wait --compact`; the JSON form is checked here.
    run = subprocess.run(
        [sys.executable, "-m", "producer_tools.publish", str(SAMPLES), "--wait", "--quiet"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    results = {r["source"]: r for r in map(json.loads, run.stdout.splitlines())}
    expected = expected_texts()
    assert set(results) == set(expected)
    for source, texts in expected.items():
        assert results[source]["status"] == "OK", results[source]
        read = sorted(d["text"] for d in results[source]["detections"] if d["text"])
        assert read == texts, source
        if not texts:
            assert results[source]["detections"] == [], "a detection on the image without a code"


def test_results_follows_what_the_workers_published(stack: Stack) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "producer_tools.results",
            "--from-beginning",
            "--json",
            "--status",
            "OK",
            "--idle-exit",
            "3",
        ],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    sources = {json.loads(line)["source"] for line in run.stdout.splitlines()}
    assert set(expected_texts()) <= sources


def test_web_page_draws_a_box_for_a_sample(stack: Stack, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    if CHROMIUM is None:
        pytest.fail("the browser test needs Chromium: apt-get install chromium", pytrace=False)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(bypass_csp=True)  # lets the test read window.qrsight
            page.goto(stack.api + "/")
            page.set_input_files("#file", str(SAMPLES / "ticket.jpg"))
            page.wait_for_function("window.qrsight.lastResponse !== null", timeout=60_000)
            drawn = page.evaluate("window.qrsight.boxesDrawn")
            table = page.inner_text("#results")
            page.screenshot(path=str(tmp_path / "web-page.png"), full_page=True)
            assert page.inner_text("#error") == ""
        finally:
            browser.close()
    assert drawn >= 1
    assert "TICKET:GATE-B:SEAT-17A" in table
    assert (tmp_path / "web-page.png").stat().st_size > 10_000


def test_ctrl_c_stops_everything_and_leaves_no_process(stack: Stack) -> None:
    assert processes_with(stack.marker), "the stack's processes should be running before Ctrl-C"
    stack.proc.send_signal(signal.SIGINT)
    assert stack.proc.wait(STOP_BOUND_S) == 0
    time.sleep(1.0)
    assert processes_with(stack.marker) == []
    assert "[stack] stopped" in stack.log.read_text()
