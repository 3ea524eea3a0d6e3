"""A circuit breaker on writes to Kafka: when the cluster stops taking them, say so at once.

Without it, every /detect call waits out the produce timeout (``QRSIGHT_API_PRODUCE_TIMEOUT_MS``)
for a write that cannot happen (too few in-sync replicas, every broker down, a local queue
that never drains), holding a thread and an in-flight slot the whole time. With it:

- **closed** (normal): every request is produced. A success resets the count of failures.
- **open**: after ``threshold`` failed writes in a row (a refused ``produce()``, a failed
  delivery report, no acknowledgement in time), new requests are refused with 503 and
  ``Retry-After`` without touching Kafka, and ``/ready`` says why. When librdkafka has
  reported every broker down, one failed write is enough; and it opens at once if writes
  were waiting then. Not on the report alone: a broker closing an idle connection
  (``connections.max.idle.ms``) makes the same report while nothing is wrong. It stays
  open for a back-off (:data:`OPEN_BACKOFF`: 1 s, doubling up to 8 s while the trials
  keep failing).
- **half-open**: when the back-off has passed, one request goes through as a trial; the
  others are still refused. Its delivery closes the circuit, its failure opens it again.

The decisions are plain code over a clock passed in, so unit tests drive them directly.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from core.runtime.backoff import Backoff

# Failed writes in a row that open the circuit: a single slow delivery (a leader election)
# does not, a cluster that refuses every write does within the first few calls.
FAILURES_TO_OPEN = 3
OPEN_BACKOFF = Backoff(first_s=1.0, max_s=8.0)


@dataclass
class _State:
    failures: int = 0  # failed writes since the last success
    opens: int = 0  # times opened since the last success (drives the back-off)
    open_until: float | None = None  # None: closed
    trial_since: float | None = None  # when the half-open trial went out
    all_down: bool = False  # librdkafka reported every broker down since the last success
    reason: str = ""


class WriteCircuit:
    """Thread-safe: the request threads ask, the delivery thread reports."""

    def __init__(
        self,
        threshold: int = FAILURES_TO_OPEN,
        backoff: Backoff = OPEN_BACKOFF,
        trial_timeout_s: float = 10.0,
    ) -> None:
        if threshold < 1:
            raise ValueError("the circuit needs a threshold of at least 1 failure")
        self.threshold = threshold
        self.backoff = backoff
        self.trial_timeout_s = trial_timeout_s  # a trial never reported frees its turn
        self._state = _State()
        self._lock = threading.Lock()

    def refusal(self, now: float) -> float | None:
        """None when a write may go out now; else the seconds until the next trial."""
        with self._lock:
            state = self._state
            if state.open_until is None:
                return None
            if now < state.open_until:
                return state.open_until - now
            trial = state.trial_since
            if trial is not None and now - trial < self.trial_timeout_s:
                return float(self.backoff.first_s)  # another call is the trial: soon
            state.trial_since = now
            return None

    def failed(self, now: float, reason: str) -> None:
        """A write failed: count it; open (or re-open, for longer) the circuit."""
        with self._lock:
            state = self._state
            state.failures += 1
            state.reason = reason
            half_open = state.open_until is not None and now >= state.open_until
            enough = state.failures >= self.threshold or state.all_down
            if half_open or (state.open_until is None and enough):
                if state.all_down:
                    state.reason = f"{reason}; every broker is unreachable"
                self._open(now)

    def all_brokers_down(self, now: float, reason: str, *, writes_waiting: bool) -> None:
        """librdkafka says every broker is down: open now if writes are waiting, else let
        the next failed write open it (an idle connection closed by a broker looks the
        same, and the next write simply reconnects)."""
        with self._lock:
            state = self._state
            state.all_down = True
            state.reason = reason
            if writes_waiting and (state.open_until is None or now >= state.open_until):
                self._open(now)

    def succeeded(self) -> None:
        """Kafka took a write: close."""
        with self._lock:
            self._state = _State()

    def problem(self, now: float) -> str | None:
        """Why writes are refused now (for ``/ready``), None while closed or half-open."""
        with self._lock:
            state = self._state
            if state.open_until is None or now >= state.open_until:
                return None
            wait = retry_after_s(state.open_until - now)
            return f"Kafka is not taking writes ({state.reason}); next try in {wait} s"

    def is_open(self) -> bool:
        with self._lock:
            return self._state.open_until is not None

    def _open(self, now: float) -> None:
        state = self._state
        state.opens += 1
        state.open_until = now + self.backoff.delay_s(state.opens)
        state.trial_since = None


def retry_after_s(seconds: float) -> int:
    """A ``Retry-After`` value: whole seconds, at least 1."""
    return max(1, math.ceil(seconds))
