"""Back-pressure: a cap on the /detect requests one API process takes at once.

gunicorn's gthread worker serves every request of a process, /health and /ready
included, from one pool of ``QRSIGHT_API_THREADS`` threads, and a /detect request holds
its thread while the body uploads and while it waits for the reply (up to
``QRSIGHT_API_MAX_TIMEOUT_MS``). Without a cap, slow workers and long timeouts take every
thread; the liveness probe then queues behind them and the pod is restarted for being
busy. So a /detect request is admitted only while fewer than ``QRSIGHT_API_MAX_IN_FLIGHT``
are in flight; past that it is answered 503 ``overloaded`` with ``Retry-After`` at once,
before its body is read. The default keeps a quarter of the threads (at least two) for
everything else, and bounds what uploads can hold in memory: each admitted request holds
at most about three copies of its image for a moment (the body, its Kafka record while it
is encoded, librdkafka's copy until the broker acknowledges it) and none while it waits,
so the cap is also kept to half the container's memory limit over that (read from the
cgroup, when there is one) per gunicorn worker.
"""

from __future__ import annotations

import logging
import threading

from core.runtime.errors import QrsightError
from core.runtime.settings import Settings, env_name

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
# Copies of one image an admitted request can hold at once (see the module docstring).
COPIES_PER_REQUEST = 3


class OverloadedError(QrsightError):
    """More /detect requests in flight than ``QRSIGHT_API_MAX_IN_FLIGHT``: try again soon."""

    code = "overloaded"
    http_status = 503


class Admission:
    """A non-blocking counting gate: :meth:`enter` admits or refuses at once."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the in-flight limit must be at least 1")
        self.limit = limit
        self._in_flight = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        """Take a slot, or raise OverloadedError (503 with Retry-After)."""
        with self._lock:
            if self._in_flight >= self.limit:
                raise OverloadedError(
                    f"this API process already has {self.limit} detect requests in flight "
                    f"({env_name('api_max_in_flight')}); retry in {RETRY_AFTER_S} s",
                    retry_after=RETRY_AFTER_S,
                )
            self._in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)

    @property
    def in_flight(self) -> int:
        return self._in_flight


def in_flight_limit(settings: Settings, memory_bytes: int | None = None) -> int:
    """``QRSIGHT_API_MAX_IN_FLIGHT``, or its default from the threads and the memory limit."""
    if settings.api_max_in_flight is not None:
        return settings.api_max_in_flight
    threads = settings.api_threads
    limit = max(1, threads - max(2, threads // 4))
    if memory_bytes is not None:
        per_process = memory_bytes // settings.api_workers
        per_request = COPIES_PER_REQUEST * settings.max_image_bytes
        limit = min(limit, max(1, per_process // 2 // per_request))
    return limit
