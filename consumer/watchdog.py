"""Turning a hung pipeline run into a death the crash journal can count.

An image that makes a native decoder or the model spin for ever does not raise and does not
kill the process: without help the worker holds its partitions with nothing moving, its
``/healthz`` still answers, and after ``max.poll.interval.ms`` the group hands the same
batch to the next worker, which hangs on it too. So each pipeline run (decode, model,
NMS, payload reading; not the fetch, not the wait for the broker's acknowledgements) runs
under a ``SIGALRM`` interval timer of ``QRSIGHT_PIPELINE_TIMEOUT_S``. The alarm is handled
in C, without the GIL, so it fires even when the hang holds the GIL: :mod:`faulthandler`
writes every thread's Python stack to stderr (where the hang is), then the signal's default
action ends the process (exit status -14, ``SIGALRM``). The supervisor (or Kubernetes)
restarts the worker, the note of the batch in hand is still there
(:mod:`consumer.journal`), and after ``QRSIGHT_CRASH_LIMIT`` such deaths the batch runs one
message at a time and the message that hangs is quarantined to the DLQ.

Arming and disarming are two ``setitimer`` calls, a few microseconds per batch
(``faulthandler.dump_traceback_later`` would start a thread per batch, ~0.1 ms). The
timer and the signal are one per process, so only a worker that owns its process (what
``qrsight-consumer`` starts) arms them; workers run in threads (tests, benches) do not.
"""

from __future__ import annotations

import contextlib
import faulthandler
import signal
import sys
from collections.abc import Iterator

HANG_SIGNAL = signal.SIGALRM


class HangWatchdog:
    """``with watchdog.guard():`` ends the process if the block runs past ``timeout_s``
    (0 = never)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._installed = False

    def _install(self) -> None:
        if signal.getsignal(HANG_SIGNAL) not in (signal.SIG_DFL, None):
            raise RuntimeError("SIGALRM already has a handler; the hang watchdog needs it")
        out = sys.__stderr__ or sys.stderr  # a real file descriptor, even under a test runner
        # chain=True: after the dump, the default action (end the process) runs
        faulthandler.register(HANG_SIGNAL, file=out, all_threads=True, chain=True)
        self._installed = True

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        if self.timeout_s <= 0:
            yield
            return
        if not self._installed:
            self._install()
        signal.setitimer(signal.ITIMER_REAL, self.timeout_s)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)


UNGUARDED = HangWatchdog(0)
