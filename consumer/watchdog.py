"""Turning a hung pipeline run into a death the crash journal can count.

An image that makes a native decoder or the model spin for ever does not raise and does not
kill the process: without help the worker holds its partitions with nothing moving, its
``/healthz`` still answers, and after ``max.poll.interval.ms`` the group hands the same
batch to the next worker, which hangs on it too. So each pipeline run (decode, model,
NMS, payload reading; not the fetch, not the wait for the broker's acknowledgements) is
timed by :mod:`faulthandler`'s watchdog: a C thread that needs no GIL, so it fires even
when the hang holds the GIL. Past ``QRSIGHT_PIPELINE_TIMEOUT_S`` it writes every thread's
Python stack to stderr (where the hang is) and exits the process with status 1. The
supervisor (or Kubernetes) restarts the worker, the note of the batch in hand is still
there (:mod:`consumer.journal`), and after ``QRSIGHT_CRASH_LIMIT`` such deaths the batch
runs one message at a time and the message that hangs is quarantined to the DLQ.

The faulthandler watchdog is one per process, so only a worker that owns its process (what
``qrsight-consumer`` starts) arms it; workers run in threads (tests, benches) do not.
"""

from __future__ import annotations

import contextlib
import faulthandler
import sys
from collections.abc import Iterator


class HangWatchdog:
    """``with watchdog.guard():`` exits the process if the block runs past ``timeout_s``
    (0 = never)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        if self.timeout_s <= 0:
            yield
            return
        out = sys.__stderr__ or sys.stderr  # a real file descriptor, even under a test runner
        faulthandler.dump_traceback_later(self.timeout_s, repeat=False, file=out, exit=True)
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()


UNGUARDED = HangWatchdog(0)
