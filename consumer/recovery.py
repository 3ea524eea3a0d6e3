"""What a worker does when a batch fails for a reason other than its input.

Bad input never gets here: intake and the pipeline turn it into ``ERROR`` results. An
exception out of :meth:`Pipeline.run` (an OpenCV assertion on an odd image, an ONNX
Runtime error, a GPU hiccup) is handled as Spring Kafka's ``DefaultErrorHandler`` and
Kafka Streams' exception handlers do, without giving up the batch's offsets:

1. **retry** the whole batch ``QRSIGHT_RETRY_ATTEMPTS`` times with exponential back-off
   (``QRSIGHT_RETRY_BACKOFF_MS`` doubling up to ``QRSIGHT_RETRY_BACKOFF_MAX_MS``): a
   transient failure passes;
2. **isolate**: bisect the batch; halves that pass keep their results, a half that fails
   is split again down to single images, each tried once more on its own;
3. **quarantine** each image that still fails alone: an ``ERROR`` result with code
   ``quarantined`` (the worker then copies it to the DLQ, like any ``ERROR``), so its
   partition moves on.

Step 3 needs proof that the pipeline itself works: an image of the batch that passed,
or else a known-good canary image. If the canary fails too, nothing is the input's fault
(the model is broken): :class:`~core.runtime.errors.ModelError` propagates, the worker exits
without committing, and its supervisor restarts it with back-off.

**A deadline.** The worker does not poll while a batch is recovered, so the whole recovery,
first run included, must end within ``max.poll.interval.ms`` less a margin for delivering
the results (:func:`recovery_budget_s`): past it the group evicts the worker, refuses its
commit, and the next owner of the partition does the same again, for ever. The recovery
judges each run's time from the slowest image seen so far; it retries only while a retry
and an isolation after it still fit, and bisects only halves that fit. Images left
undecided when the time is up are quarantined too, with a message that says so (their DLQ
copies can be replayed); the others keep their results.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from core.runtime.backoff import Backoff
from core.runtime.errors import ModelError, QuarantinedError
from core.runtime.results import error_record
from core.runtime.settings import MAX_POLL_INTERVAL_MS, Settings
from core.vision.pipeline import ImageJob

logger = logging.getLogger(__name__)

RunFn = Callable[[Sequence[ImageJob]], list[dict[str, Any]]]
CANARY_ID = "qrsight-canary"
# of max.poll.interval.ms, kept for delivering the results and committing after a recovery
RECOVERY_MARGIN_FRACTION = 0.1
RECOVERY_MARGIN_MIN_S = 10.0


class Stopping(Exception):  # noqa: N818  (a signal, not an error)
    """The worker was told to stop while backing off; the batch stays uncommitted."""


def recovery_budget_s(settings: Settings) -> float:
    """The longest one batch's recovery may take: the consumer's ``max.poll.interval.ms``
    less a tenth of it (at least :data:`RECOVERY_MARGIN_MIN_S`)."""
    raw = settings.kafka_extra_values().get("max.poll.interval.ms", str(MAX_POLL_INTERVAL_MS))
    try:
        poll_s = int(raw) / 1000.0
    except ValueError:
        poll_s = MAX_POLL_INTERVAL_MS / 1000.0
    return max(poll_s - max(RECOVERY_MARGIN_FRACTION * poll_s, RECOVERY_MARGIN_MIN_S), 0.0)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int
    backoff_s: float
    backoff_max_s: float
    budget_s: float = float("inf")  # the whole recovery of a batch, its first run included

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            settings.retry_attempts,
            settings.retry_backoff_ms / 1000.0,
            settings.retry_backoff_max_ms / 1000.0,
            recovery_budget_s(settings),
        )

    @property
    def backoff(self) -> Backoff:
        """The project's one back-off policy with these figures (a first back-off above the
        cap waits the cap, as ``min(first * 2^k, cap)`` always did)."""
        return Backoff(min(self.backoff_s, self.backoff_max_s), self.backoff_max_s)

    def delay_s(self, attempt: int) -> float:
        """Back-off before retry ``attempt`` (1-based): exponential, capped."""
        return self.backoff.delay_s(attempt)


class Deadline:
    """One batch's recovery time: when it ends, and how long a run of ``n`` images is
    expected to take (the slowest image per run seen so far, failed runs included)."""

    def __init__(self, budget_s: float) -> None:
        self.ends = time.monotonic() + budget_s
        self.per_image_s = 0.0

    def left_s(self) -> float:
        return self.ends - time.monotonic()

    def estimate_s(self, images: int) -> float:
        return self.per_image_s * images

    def affords(self, seconds: float) -> bool:
        return seconds <= self.left_s()

    def observe(self, images: int, seconds: float) -> None:
        self.per_image_s = max(self.per_image_s, seconds / max(images, 1))


def canary_job() -> ImageJob:
    """A small, plain, valid image every working pipeline must take."""
    img = np.full((96, 128, 3), 255, np.uint8)
    img[24:72, 40:88] = 0
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return ImageJob(CANARY_ID, buf.tobytes())


class BatchRecovery:
    """Runs a batch's jobs; on failure retries, bisects and quarantines as described above.

    ``wait(seconds)`` sleeps and returns True when the worker was told to stop;
    ``on_retry`` and ``on_quarantine`` feed the metrics.
    """

    def __init__(
        self,
        run: RunFn,
        policy: RetryPolicy,
        wait: Callable[[float], bool],
        *,
        on_retry: Callable[[], None] = lambda: None,
        on_quarantine: Callable[[], None] = lambda: None,
    ) -> None:
        self._run = run
        self.policy = policy
        self._wait = wait
        self._on_retry = on_retry
        self._on_quarantine = on_quarantine

    def run(self, jobs: Sequence[ImageJob]) -> list[dict[str, Any]]:
        """One result per job, same order. Raises ModelError when the pipeline is broken
        and :class:`Stopping` when told to stop during a back-off."""
        if not jobs:
            return []
        deadline = Deadline(self.policy.budget_s)
        try:
            return self._timed(deadline, jobs)
        except Exception as exc:
            error: Exception = exc
        for attempt in range(1, self.policy.attempts + 1):
            delay = self.policy.delay_s(attempt)
            # the retry, then (should it fail) an isolation: about twice a full run
            if not deadline.affords(delay + 3 * deadline.estimate_s(len(jobs))):
                logger.warning(
                    "batch failed, no time left to retry it images=%d attempt=%d/%d "
                    "left_s=%.1f run_s=%.1f (max.poll.interval.ms bounds a recovery)",
                    len(jobs),
                    attempt,
                    self.policy.attempts,
                    deadline.left_s(),
                    deadline.estimate_s(len(jobs)),
                )
                break
            logger.warning(
                "batch failed, retrying images=%d attempt=%d/%d backoff_s=%.2f error=%s",
                len(jobs),
                attempt,
                self.policy.attempts,
                delay,
                _describe(error),
            )
            self._on_retry()
            if self._wait(delay):
                raise Stopping("stopped while backing off") from error
            try:
                return self._timed(deadline, jobs)
            except Exception as exc:
                error = exc
        return self._isolate(jobs, error, deadline)

    def _timed(self, deadline: Deadline, jobs: Sequence[ImageJob]) -> list[dict[str, Any]]:
        started = time.monotonic()
        try:
            return self._run(jobs)
        finally:
            deadline.observe(len(jobs), time.monotonic() - started)

    # --- isolation ------------------------------------------------------------------------
    def _isolate(
        self, jobs: Sequence[ImageJob], error: Exception, deadline: Deadline
    ) -> list[dict[str, Any]]:
        logger.warning(
            "batch failed after its retries, isolating the failing image(s) images=%d error=%s",
            len(jobs),
            _describe(error),
        )
        results: list[dict[str, Any] | None] = [None] * len(jobs)
        failed: dict[int, Exception] = {}
        late: list[int] = []  # never tried in a run that fit the deadline
        indices = list(range(len(jobs)))
        if len(indices) == 1:
            failed[0] = error  # already tried alone (1 + retries times)
        else:
            mid = len(indices) // 2
            for half in (indices[:mid], indices[mid:]):
                self._bisect(jobs, half, results, failed, late=late, deadline=deadline)
        if all(r is None for r in results):
            self._check_canary(error)
        for i, exc in failed.items():
            self._quarantine(
                results,
                jobs[i],
                i,
                f"the pipeline failed on this image {1 + self.policy.attempts} times while "
                f"other images went through; quarantined: {_describe(exc)}",
            )
        for i in late:
            self._quarantine(
                results,
                jobs[i],
                i,
                "its batch failed and the time to find the failing image ran out "
                f"({self.policy.budget_s:.0f} s: max.poll.interval.ms less a margin, after "
                "which the group would evict the worker); quarantined without a run of its "
                f"own: {_describe(error)}",
            )
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    def _quarantine(
        self, results: list[dict[str, Any] | None], job: ImageJob, i: int, message: str
    ) -> None:
        logger.error("quarantined request_id=%s %s (copied to the DLQ)", job.request_id, message)
        self._on_quarantine()
        error = QuarantinedError(message, request_id=job.request_id)
        results[i] = error_record(job.request_id, job.source, error)

    def _bisect(
        self,
        jobs: Sequence[ImageJob],
        indices: list[int],
        results: list[dict[str, Any] | None],
        failed: dict[int, Exception],
        *,
        late: list[int],
        deadline: Deadline,
    ) -> None:
        if not deadline.affords(deadline.estimate_s(len(indices))):
            late.extend(indices)
            return
        try:
            out = self._timed(deadline, [jobs[i] for i in indices])
        except Exception as exc:
            if len(indices) == 1:
                failed[indices[0]] = exc
                return
            mid = len(indices) // 2
            for half in (indices[:mid], indices[mid:]):
                self._bisect(jobs, half, results, failed, late=late, deadline=deadline)
            return
        for i, record in zip(indices, out, strict=True):
            results[i] = record

    def _check_canary(self, error: Exception) -> None:
        """No image passed: quarantine them only if a known-good image passes."""
        try:
            self._run([canary_job()])
        except Exception as exc:
            raise ModelError(
                f"the pipeline fails on every image, a known-good one too: {_describe(exc)} "
                f"(first error: {_describe(error)})"
            ) from exc


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:500]
