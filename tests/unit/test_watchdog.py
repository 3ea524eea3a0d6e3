"""The hang watchdog: a pipeline run past its time ends the process, even while the hang
holds the GIL; a run that finishes in time disarms it."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from core.runtime.settings import REPO_ROOT


def _run(body: str) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(
        """
        import ctypes, time
        from consumer.watchdog import HangWatchdog
        watchdog = HangWatchdog(0.5)
        """
    ) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_run_that_hangs_holding_the_gil_ends_the_process_with_its_stack() -> None:
    done = _run(
        """
        def stuck_in_native_code():
            with watchdog.guard():
                ctypes.PyDLL(None).sleep(30)  # holds the GIL for 30 s
        stuck_in_native_code()
        print("survived")
        """
    )
    assert done.returncode == -signal.SIGALRM
    assert "survived" not in done.stdout
    assert "stuck_in_native_code" in done.stderr, "the dump shows where it hung"


def test_a_run_that_finishes_in_time_disarms_the_watchdog() -> None:
    done = _run(
        """
        for _ in range(3):
            with watchdog.guard():
                time.sleep(0.2)
        time.sleep(1.0)  # past the timeout, outside any run
        print("survived")
        """
    )
    assert (done.returncode, done.stdout.strip()) == (0, "survived"), done.stderr


def test_a_zero_timeout_never_fires() -> None:
    done = _run(
        """
        watchdog = HangWatchdog(0)
        with watchdog.guard():
            time.sleep(0.8)
        print("survived")
        """
    )
    assert (done.returncode, done.stdout.strip()) == (0, "survived"), done.stderr
