"""Run N worker processes, restart the ones that crash, stop them all on SIGTERM/SIGINT.

Each worker is a child process (``python -m consumer.cli --worker-index i``) with its own
ONNX session, Kafka clients and metrics port, all in one consumer group. A crashed worker
is restarted with exponential backoff; a worker that exits with :data:`EXIT_CONFIG`
(a setting or file to fix) stops the whole supervisor, since a restart cannot help.

**A stable identity per worker.** Worker *i* joins the group as the static member
``<identity>-<i>`` (``group.instance.id``), the identity being ``QRSIGHT_GROUP_INSTANCE_ID``
or, unset, this host's name (what a StatefulSet gives on Kubernetes: the pod name). A
restarted worker is the same member again: it takes its partitions back at once, and the
group does not rebalance. A new member for each restart would make the group wait out the
dead one's ``session.timeout.ms`` (45 s) and, meanwhile, fence every offset commit of the
survivors, whose work is then done again when their partitions move (:func:`static_identity`).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from consumer.watchdog import HANG_SIGNAL
from core.runtime.backoff import Backoff

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78  # sysexits EX_CONFIG
RESTART_BACKOFF = Backoff(first_s=1.0, max_s=30.0)
STABLE_AFTER_S = 60.0  # a child that ran this long resets its backoff
POLL_S = 0.2
KILL_GRACE_S = 5.0
PR_SET_PDEATHSIG = 1


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()


def _die_with_parent() -> None:
    """Runs in the child between fork and exec (Linux): SIGTERM it when the supervisor dies,
    even by SIGKILL, so no orphaned worker keeps its partitions. Only one C call, no locks."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def static_identity(
    state_dir: Path, group: str, configured: str | None, enabled: bool
) -> tuple[str | None, IO[str] | None]:
    """The identity the workers of this supervisor join the group under, and the lock that
    keeps it this supervisor's own (hold it as long as the workers run).

    ``QRSIGHT_GROUP_INSTANCE_ID`` when set (the operator vouches that it is unique); else,
    with static membership on, the host name, if no other supervisor of the same group on
    this host (sharing ``QRSIGHT_STATE_DIR``) holds it already: two would fence each
    other's workers for good. Without one: dynamic membership (None).
    """
    if configured:
        return configured, None
    if not enabled:
        return None, None
    host = socket.gethostname()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{group}.{host}")
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        lock = open(state_dir / f"{safe}.lock", "a", encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        logger.warning("no lock on the host identity, using it anyway error=%s", exc)
        return host, None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        logger.warning(
            "another qrsight-consumer of group %s on this host uses the identity %s: this "
            "one's workers join as dynamic members (give each its own "
            "QRSIGHT_GROUP_INSTANCE_ID to make them static)",
            group,
            host,
        )
        return None, None
    return host, lock


def worker_command(index: int) -> list[str]:
    return [sys.executable, "-m", "consumer.cli", "--worker-index", str(index)]


@dataclass
class Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    exits: list[int] = field(default_factory=list)


class Supervisor:
    """Keeps ``workers`` children alive until told to stop."""

    def __init__(
        self,
        workers: int,
        shutdown_timeout_s: float,
        command: Callable[[int], list[str]] = worker_command,
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``env``: variables the workers get on top of this process's environment."""
        self.slots = [Slot(i) for i in range(workers)]
        self.shutdown_timeout_s = shutdown_timeout_s
        self.command = command
        self.env = {**os.environ, **env} if env else None
        self._stopping = threading.Event()
        self._code = EXIT_OK
        self.restarts = 0

    def stop(self) -> None:
        self._stopping.set()

    def install_signal_handlers(self) -> None:
        def handle(signum: int, _frame: FrameType | None) -> None:
            logger.info("supervisor stopping signal=%s", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def run(self) -> int:
        """Supervise until stopped; the exit code is 0 when every worker stopped cleanly."""
        for slot in self.slots:
            self._start(slot)
        while not self._stopping.wait(POLL_S):
            for slot in self.slots:
                self._check(slot)
        return self._shutdown()

    def _start(self, slot: Slot) -> None:
        preexec = _die_with_parent if _LIBC is not None else None
        # safe with threads: the hook takes no lock (libc was loaded at import)
        command = self.command(slot.index)
        slot.proc = subprocess.Popen(command, env=self.env, preexec_fn=preexec)  # noqa: PLW1509
        slot.started = time.monotonic()
        slot.restart_at = None
        logger.info("worker started worker=%d pid=%d", slot.index, slot.proc.pid)

    def _check(self, slot: Slot) -> None:
        now = time.monotonic()
        if slot.proc is None:
            if slot.restart_at is not None and now >= slot.restart_at:
                self._start(slot)
            return
        code = slot.proc.poll()
        if code is None:
            return
        slot.exits.append(code)
        slot.proc = None
        if code == EXIT_CONFIG:
            logger.error("worker has a configuration error, giving up worker=%d", slot.index)
            self._code = EXIT_CONFIG
            self.stop()
            return
        slot.failures = 1 if now - slot.started >= STABLE_AFTER_S else slot.failures + 1
        delay = RESTART_BACKOFF.delay_s(slot.failures)
        slot.restart_at = now + delay
        self.restarts += 1
        logger.warning(
            "worker exited, restarting worker=%d exit_code=%d%s restart_in_s=%.1f restarts=%d",
            slot.index,
            code,
            _exit_reason(code),
            delay,
            self.restarts,
        )

    def _shutdown(self) -> int:
        running = [s for s in self.slots if s.proc is not None]
        for slot in running:
            assert slot.proc is not None
            _signal(slot.proc, signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_timeout_s + KILL_GRACE_S
        code = self._code
        for slot in running:
            assert slot.proc is not None
            try:
                rc = slot.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                logger.error("worker did not stop in time, killing worker=%d", slot.index)
                slot.proc.kill()
                rc = slot.proc.wait()
            logger.info("worker stopped worker=%d exit_code=%d", slot.index, rc)
            if rc != EXIT_OK and code == EXIT_OK:
                code = EXIT_FAILURE
        return code


def _exit_reason(code: int) -> str:
    if code >= 0:
        return ""
    if -code == HANG_SIGNAL:
        return (
            f" signal={HANG_SIGNAL.name} reason=hung past QRSIGHT_PIPELINE_TIMEOUT_S "
            "(the worker's stacks at that moment are in its output)"
        )
    return f" signal={signal.Signals(-code).name}"


def _signal(proc: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signum)
