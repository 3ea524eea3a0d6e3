"""Keeps the reply client's threads running.

If the reply reader thread dies, the client turns unready at once (``/ready`` 503, new
requests 503) and a new reader is started after a back-off (:data:`RESTART_BACKOFF`: 1 s,
doubling up to 30 s with the restarts of the last :data:`RESTART_WINDOW_S`), resuming at the
offset after the last reply read. After ``max_restarts`` restarts within the window the next
death is one too many: the supervisor gives up and calls ``on_give_up`` (under gunicorn: the
worker exits and the master starts a fresh one). A dead delivery thread is started again
at once (it only serves librdkafka's callbacks).

The restart decision is :func:`restart_decision`, a plain function of the clock.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from api.metrics import REPLY_READER_RESTARTS
from api.reader import ReplyReader
from core.runtime.backoff import Backoff

logger = logging.getLogger(__name__)

SUPERVISE_S = 0.2
RESTART_BACKOFF = Backoff(first_s=1.0, max_s=30.0)
RESTART_WINDOW_S = 300.0
MAX_RESTARTS = 5


class Decision(enum.Enum):
    WAIT = "wait"
    RESTART = "restart"
    GIVE_UP = "give up"


def restart_decision(
    recent_restarts: int, died_at: float, now: float, max_restarts: int
) -> Decision:
    """What to do about a dead reader that died at ``died_at``, given the restarts already
    made within the window: give up past ``max_restarts``, else restart once its back-off
    (one step longer per recent restart) has passed."""
    if recent_restarts >= max_restarts:
        return Decision.GIVE_UP
    if now - died_at < RESTART_BACKOFF.delay_s(recent_restarts + 1):
        return Decision.WAIT
    return Decision.RESTART


@dataclass
class RestartHistory:
    """When the reader was restarted, within the last ``window_s``."""

    window_s: float = RESTART_WINDOW_S
    times: deque[float] = field(default_factory=deque)

    def recent(self, now: float) -> int:
        while self.times and now - self.times[0] > self.window_s:
            self.times.popleft()
        return len(self.times)

    def add(self, now: float) -> None:
        self.times.append(now)


class Supervisor:
    """A thread that restarts the reader and the delivery thread (see the module docstring)."""

    def __init__(
        self,
        reader: ReplyReader,
        start_deliveries: Callable[[], threading.Thread],
        stop: threading.Event,
        *,
        max_restarts: int = MAX_RESTARTS,
        on_give_up: Callable[[], None] | None = None,
    ) -> None:
        self.reader = reader
        self.start_deliveries = start_deliveries
        self.stop = stop
        self.max_restarts = max_restarts
        self.on_give_up = on_give_up
        self.deliveries: threading.Thread | None = None
        self.thread: threading.Thread | None = None
        self.history = RestartHistory()
        self.died_at: float | None = None
        self.restarts = 0
        self.gave_up = False
        self.problem = ""

    def start(self) -> None:
        self.deliveries = self.start_deliveries()
        self.reader.start()
        self.thread = threading.Thread(
            target=self.run, name="qrsight-reply-supervisor", daemon=True
        )
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(SUPERVISE_S) and not self.gave_up:
            try:
                self.check(time.monotonic())
            except Exception:
                logger.exception("reply supervisor check failed")

    def check(self, now: float) -> None:
        if self.deliveries is not None and not self.deliveries.is_alive():
            logger.error(
                "delivery thread died; starting it again partition=%s", self.reader.partition
            )
            self.deliveries = self.start_deliveries()
        if self.reader.thread is None or self.reader.alive() or self.stop.is_set():
            return
        if self.died_at is None:
            self.died_at = now
            self.reader.mark_dead()
        decision = restart_decision(self.history.recent(now), self.died_at, now, self.max_restarts)
        if decision is Decision.GIVE_UP:
            self._give_up()
        elif decision is Decision.RESTART:
            self._restart(now)

    def _restart(self, now: float) -> None:
        self.history.add(now)
        self.died_at = None
        self.restarts += 1
        REPLY_READER_RESTARTS.inc()
        logger.warning(
            "restarting the reply reader partition=%s resume_offset=%s restarts=%s",
            self.reader.partition,
            self.reader.next_offset,
            self.restarts,
        )
        self.reader.start()

    def _give_up(self) -> None:
        self.gave_up = True
        self.problem = (
            f"the reply reader died {self.max_restarts + 1} times within "
            f"{RESTART_WINDOW_S:.0f} s; this process cannot serve requests"
        )
        logger.critical("giving up partition=%s reason=%s", self.reader.partition, self.problem)
        if self.on_give_up is not None:
            self.on_give_up()

    def threads(self) -> dict[str, threading.Thread | None]:
        return {
            "reply reader": self.reader.thread,
            "delivery": self.deliveries,
            "supervisor": self.thread,
        }
