"""One retry back-off for every loop that retries: the worker's batch recovery, the process
supervisor's restarts and the API's reply-reader restarts.

Exponential and capped, as tenacity's ``wait_exponential(multiplier=first, max=cap)``:
``first * 2^(failures - 1)``, never above ``cap``. A policy is a plain value; the loops keep
their own failure counts, so each decision is a pure function that unit tests call directly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential back-off: ``first_s`` after the first failure, doubling up to ``max_s``."""

    first_s: float
    max_s: float

    def __post_init__(self) -> None:
        if self.first_s < 0 or self.max_s < self.first_s:
            raise ValueError(f"need 0 <= first_s <= max_s, got {self.first_s}, {self.max_s}")

    def delay_s(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failures (0 → no wait)."""
        if failures <= 0:
            return 0.0
        # 2 ** 64 already dwarfs any cap; larger exponents would only cost big integers.
        return min(self.first_s * 2 ** min(failures - 1, 64), self.max_s)
