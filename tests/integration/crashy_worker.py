"""A qrsight worker whose pipeline kills its own process (SIGKILL, as the kernel's OOM killer
or a segfault in a native decoder would) when an image carries :data:`MARKER`, and hangs
for an hour inside a C call that holds the GIL (as a native decoder stuck in a loop would)
when it carries :data:`HANG_MARKER`, and takes :data:`SLOW_S` seconds (a slow but valid
image, in Python: signals are handled meanwhile) when it carries :data:`SLOW_MARKER`.

``python -m tests.integration.crashy_worker --worker-index I`` is one such worker;
``python -m tests.integration.crashy_worker --supervise`` runs the real
:class:`consumer.supervisor.Supervisor` over one of them, so a test sees what production
would: deaths, restarts with back-off, and the worker noticing what killed it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from consumer import worker as worker_module
from consumer.cli import configure_logging, main
from consumer.supervisor import Supervisor
from core.runtime.settings import load_settings
from core.vision.pipeline import ImageJob

MARKER = b"KILL-ME"
HANG_MARKER = b"HANG-ME"
SLOW_MARKER = b"SLOW-ME"
SLOW_S = 8.0
SLOW_LINE = "slow image in hand"

logger = logging.getLogger(__name__)


def _deadly_load(settings: Any) -> Any:
    pipeline, facts = _original_load(settings)
    run = pipeline.run

    def deadly(jobs: Sequence[ImageJob], stages: Any = None) -> list[dict[str, Any]]:
        if any(MARKER in job.data for job in jobs):
            os.kill(os.getpid(), signal.SIGKILL)
        if any(HANG_MARKER in job.data for job in jobs):
            ctypes.PyDLL(None).sleep(3600)  # PyDLL: the GIL stays held during the call
        if any(SLOW_MARKER in job.data for job in jobs):
            logger.warning("%s seconds=%.0f", SLOW_LINE, SLOW_S)
            time.sleep(SLOW_S)
        return run(jobs, stages)

    pipeline.run = deadly  # type: ignore[method-assign]
    return pipeline, facts


_original_load = worker_module.load_pipeline


def command(index: int) -> list[str]:
    return [sys.executable, "-m", "tests.integration.crashy_worker", "--worker-index", str(index)]


def run(argv: list[str]) -> int:
    if argv == ["--supervise"]:
        settings = load_settings()
        configure_logging(settings.log_level)
        supervisor = Supervisor(1, settings.shutdown_timeout_s, command=command)
        supervisor.install_signal_handlers()
        return supervisor.run()
    worker_module.load_pipeline = _deadly_load
    return main(argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
