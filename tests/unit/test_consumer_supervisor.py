"""The supervisor with stand-in children (tiny Python scripts, no Kafka, no model)."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from consumer.supervisor import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, Supervisor, static_identity

# A child that appends its start to a file, then sleeps until SIGTERM (exit 0) or crashes.
CHILD = """
import signal, sys, time
log, mode = sys.argv[1], sys.argv[2]
open(log, "a").write("start\\n")
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
if mode == "crash-once" and open(log).read().count("start") == 1:
    sys.exit(1)
if mode == "config":
    sys.exit(78)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(60)
"""


def supervisor(tmp_path: Path, mode: str, workers: int = 1, timeout_s: float = 2.0) -> Supervisor:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    logs = [tmp_path / f"child-{i}.log" for i in range(workers)]
    return Supervisor(
        workers,
        timeout_s,
        command=lambda i: [sys.executable, str(script), str(logs[i]), mode],
    )


def run_in_thread(sup: Supervisor) -> tuple[threading.Thread, list[int]]:
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(sup.run()), daemon=True)
    thread.start()
    return thread, codes


def starts(tmp_path: Path, index: int = 0) -> int:
    path = tmp_path / f"child-{index}.log"
    return path.read_text().count("start") if path.exists() else 0


def wait_until(predicate: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_stop_forwards_sigterm_and_exits_0(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "run", workers=2)
    thread, codes = run_in_thread(sup)
    wait_until(lambda: starts(tmp_path, 0) == 1 and starts(tmp_path, 1) == 1)
    sup.stop()
    thread.join(10)
    assert codes == [EXIT_OK]
    assert all(s.proc is None or s.proc.poll() is not None for s in sup.slots)


def test_a_crashed_worker_is_restarted(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "crash-once")
    thread, codes = run_in_thread(sup)
    wait_until(lambda: starts(tmp_path) == 2)
    assert sup.slots[0].exits == [EXIT_FAILURE]
    sup.stop()
    thread.join(10)
    assert codes == [EXIT_OK]


def test_a_configuration_error_stops_everything(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "config")
    thread, codes = run_in_thread(sup)
    thread.join(10)
    assert codes == [EXIT_CONFIG]
    assert starts(tmp_path) == 1, "not restarted: a restart cannot fix a setting"


@pytest.mark.slow
def test_a_worker_that_ignores_sigterm_is_killed_after_the_bound(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "stubborn", timeout_s=0.5)
    thread, codes = run_in_thread(sup)
    wait_until(lambda: starts(tmp_path) == 1)
    time.sleep(0.3)  # let the child install its SIG_IGN
    started = time.monotonic()
    sup.stop()
    thread.join(15)
    assert codes == [EXIT_FAILURE]
    assert time.monotonic() - started < 0.5 + 5 + 2


def test_workers_get_the_host_name_as_their_identity_so_a_restart_is_the_same_member(
    tmp_path: Path,
) -> None:
    identity, lock = static_identity(tmp_path, "g", None, enabled=True)
    try:
        assert identity == socket.gethostname()
    finally:
        assert lock is not None
        lock.close()


def test_a_second_supervisor_of_the_group_on_the_host_joins_dynamically(tmp_path: Path) -> None:
    """Two supervisors under one identity would fence each other's workers for good."""
    first, lock = static_identity(tmp_path, "g", None, enabled=True)
    assert first is not None and lock is not None
    assert static_identity(tmp_path, "g", None, enabled=True) == (None, None)
    other_group, other_lock = static_identity(tmp_path, "h", None, enabled=True)
    assert other_group == first, "another group's members do not collide"
    assert other_lock is not None
    other_lock.close()
    lock.close()
    again, lock = static_identity(tmp_path, "g", None, enabled=True)
    assert again == first, "the identity is free again once its holder is gone"
    assert lock is not None
    lock.close()


@pytest.mark.parametrize(
    ("configured", "enabled", "expected"),
    [("pod-3", True, "pod-3"), ("pod-3", False, "pod-3"), (None, False, None)],
)
def test_a_configured_identity_wins_and_static_membership_can_be_turned_off(
    tmp_path: Path, configured: str | None, enabled: bool, expected: str | None
) -> None:
    assert static_identity(tmp_path, "g", configured, enabled=enabled) == (expected, None)


def test_the_workers_get_the_supervisors_extra_environment(tmp_path: Path) -> None:
    script = tmp_path / "env.py"
    script.write_text(
        "import os, sys, time\n"
        "open(sys.argv[1], 'w').write(os.environ.get('QRSIGHT_GROUP_INSTANCE_ID', '-'))\n"
        "time.sleep(60)\n"
    )
    out = tmp_path / "seen"
    sup = Supervisor(
        1,
        2.0,
        command=lambda _i: [sys.executable, str(script), str(out)],
        env={"QRSIGHT_GROUP_INSTANCE_ID": "host-a"},
    )
    thread, _codes = run_in_thread(sup)
    wait_until(lambda: out.exists() and out.read_text() != "")
    sup.stop()
    thread.join(10)
    assert out.read_text() == "host-a"
