"""Stage intervals of a pipeline run, recorded only while tracing is on."""

from __future__ import annotations

import time
from typing import Any


class StageLog:
    """Stage intervals of each job of one ``Pipeline.run``, for the image's spans.

    Times are ``time.perf_counter()`` seconds (what the pipeline measures anyway); one
    wall-clock anchor taken here turns them into span timestamps.
    """

    def __init__(self) -> None:
        self._wall_ns = time.time_ns()
        self._perf = time.perf_counter()
        self.by_job: dict[int, list[tuple[str, float, float, dict[str, Any]]]] = {}

    def add(self, job: object, stage: str, start: float, end: float, **attributes: Any) -> None:
        self.by_job.setdefault(id(job), []).append((stage, start, end, attributes))

    def of(self, job: object) -> list[tuple[str, float, float, dict[str, Any]]]:
        return self.by_job.get(id(job), [])

    def ns(self, perf_s: float) -> int:
        """A ``perf_counter()`` time as epoch nanoseconds."""
        return self._wall_ns + int((perf_s - self._perf) * 1e9)
