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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from core.runtime.backoff import Backoff
from core.runtime.errors import ModelError, QuarantinedError
from core.runtime.results import error_record
from core.runtime.settings import Settings
from core.vision.pipeline import ImageJob

logger = logging.getLogger(__name__)

RunFn = Callable[[Sequence[ImageJob]], list[dict[str, Any]]]
CANARY_ID = "qrsight-canary"


class Stopping(Exception):  # noqa: N818  (a signal, not an error)
    """The worker was told to stop while backing off; the batch stays uncommitted."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int
    backoff_s: float
    backoff_max_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            settings.retry_attempts,
            settings.retry_backoff_ms / 1000.0,
            settings.retry_backoff_max_ms / 1000.0,
        )

    @property
    def backoff(self) -> Backoff:
        """The project's one back-off policy with these figures (a first back-off above the
        cap waits the cap, as ``min(first * 2^k, cap)`` always did)."""
        return Backoff(min(self.backoff_s, self.backoff_max_s), self.backoff_max_s)

    def delay_s(self, attempt: int) -> float:
        """Back-off before retry ``attempt`` (1-based): exponential, capped."""
        return self.backoff.delay_s(attempt)


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
        try:
            return self._run(jobs)
        except Exception as exc:
            error: Exception = exc
        for attempt in range(1, self.policy.attempts + 1):
            delay = self.policy.delay_s(attempt)
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
                return self._run(jobs)
            except Exception as exc:
                error = exc
        return self._isolate(jobs, error)

    # --- isolation ------------------------------------------------------------------------
    def _isolate(self, jobs: Sequence[ImageJob], error: Exception) -> list[dict[str, Any]]:
        logger.warning(
            "batch failed after %d retries, isolating the failing image(s) images=%d error=%s",
            self.policy.attempts,
            len(jobs),
            _describe(error),
        )
        results: list[dict[str, Any] | None] = [None] * len(jobs)
        failed: dict[int, Exception] = {}
        indices = list(range(len(jobs)))
        if len(indices) == 1:
            failed[0] = error  # already tried alone (1 + retries times)
        else:
            mid = len(indices) // 2
            self._bisect(jobs, indices[:mid], results, failed)
            self._bisect(jobs, indices[mid:], results, failed)
        if failed and len(failed) == len(jobs):
            self._check_canary(error)
        for i, exc in failed.items():
            job = jobs[i]
            logger.error(
                "quarantined request_id=%s error=%s (copied to the DLQ)",
                job.request_id,
                _describe(exc),
            )
            self._on_quarantine()
            quarantined = QuarantinedError(
                f"the pipeline failed on this image {1 + self.policy.attempts} times while "
                f"other images went through; quarantined: {_describe(exc)}",
                request_id=job.request_id,
            )
            results[i] = error_record(job.request_id, job.source, quarantined)
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    def _bisect(
        self,
        jobs: Sequence[ImageJob],
        indices: list[int],
        results: list[dict[str, Any] | None],
        failed: dict[int, Exception],
    ) -> None:
        try:
            out = self._run([jobs[i] for i in indices])
        except Exception as exc:
            if len(indices) == 1:
                failed[indices[0]] = exc
                return
            mid = len(indices) // 2
            self._bisect(jobs, indices[:mid], results, failed)
            self._bisect(jobs, indices[mid:], results, failed)
            return
        for i, record in zip(indices, out, strict=True):
            results[i] = record

    def _check_canary(self, error: Exception) -> None:
        """Every image failed: quarantine them only if a known-good image passes."""
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
