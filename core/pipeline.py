"""The one path from image bytes to ``DetectionResult`` dicts.

decode (thread pool) → letterbox → one ONNX run per chunk of ``max_batch`` → NMS and
rescale → :meth:`Pipeline.check`: payload reading, the crop verifier's judgement of the
unread QR boxes (``core.verifier``; ``QRSIGHT_VERIFIER_PATH``, used with the detector it
was trained for), harder reads of the plausible ones, the verifier's keep rule and
calibrated confidence → records. The workers, ``qrsight-detect`` and the
benchmarks all call :meth:`Pipeline.run`, so their boxes are identical.

Timings per image: ``queue_ms`` from ``submitted_at_ms`` to the start of the run;
``decode_ms`` the image's own decode; ``infer_ms`` letterbox + ONNX run of its chunk
(the same for every image of the chunk); ``post_ms`` its share of the chunk's
NMS/rescale plus its own payload reading and verification; ``total_ms`` queue time plus
the time from the start of the run until its record was built.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from core.detections import Detections
from core.detector import Detector
from core.errors import CorruptImageError, QrsightError
from core.images import ImageLimits, decode
from core.payload import HARD_ATTEMPTS, drop_duplicate_reads, read_harder, read_payloads
from core.results import error_record, now_ms, result_record
from core.settings import Settings
from core.verifier import Verifier, load_verifier

logger = logging.getLogger(__name__)

# unread QR boxes the verifier judges at least this plausible get the harder reads
# (measured in models/README.md: below it they are not codes, and each costs the full
# time of every attempt)
HARD_READ_MIN = 0.05


@dataclass(frozen=True)
class ImageJob:
    """One image to process. ``conf``/``decode`` override the settings for this image;
    ``content_type`` is informational (intake sniffs the magic bytes)."""

    request_id: str
    data: bytes
    source: str | None = None
    content_type: str | None = None
    conf: float | None = None
    decode: bool | None = None
    submitted_at_ms: int | None = None


@dataclass
class _Intake:
    image: np.ndarray | None
    decode_ms: float
    error: QrsightError | None = None


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class Pipeline:
    """Bytes in, one ``DetectionResult`` dict per job out (same order).

    Bad input never raises: it becomes an ``ERROR`` record with the error's code.
    A model failure raises :class:`core.errors.ModelError` (not the input's fault).
    """

    def __init__(
        self,
        settings: Settings,
        detector: Detector | None = None,
        verifier: Verifier | None = None,
    ) -> None:
        self.settings = settings
        self.detector = detector or Detector.from_settings(settings)
        self.limits = ImageLimits.from_settings(settings)
        self._qr_id = qr_class(self.detector.info.labels)
        self._missed_as = self._qr_id if settings.read_whole_image else None
        self.verifier = verifier or load_verifier(settings, self.detector.model_path)
        self.hard_attempts = HARD_ATTEMPTS  # the harder reads of unread boxes, in order
        self._pool = ThreadPoolExecutor(
            max_workers=settings.decode_threads, thread_name_prefix="qrsight-decode"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def run(self, jobs: Sequence[ImageJob]) -> list[dict[str, Any]]:
        start, start_ms = time.perf_counter(), now_ms()
        queue_ms = [
            0.0 if j.submitted_at_ms is None else max(0.0, float(start_ms - j.submitted_at_ms))
            for j in jobs
        ]
        intakes = list(self._pool.map(self._decode, jobs))
        results: list[dict[str, Any] | None] = [None] * len(jobs)
        good: list[int] = []
        for i, (job, intake) in enumerate(zip(jobs, intakes, strict=True)):
            if intake.error is None:
                good.append(i)
                continue
            timing = {"queue_ms": queue_ms[i], "decode_ms": intake.decode_ms}
            timing["total_ms"] = queue_ms[i] + _ms(start)
            results[i] = error_record(job.request_id, job.source, intake.error, timing=timing)
        step = self.settings.max_batch
        for first in range(0, len(good), step):
            chunk = good[first : first + step]
            records = self._run_chunk(jobs, intakes, chunk, queue_ms, start)
            for i, record in zip(chunk, records, strict=True):
                results[i] = record
        logger.debug("pipeline run images=%d ok=%d ms=%.1f", len(jobs), len(good), _ms(start))
        return [r for r in results if r is not None]

    def _decode(self, job: ImageJob) -> _Intake:
        start = time.perf_counter()
        try:
            image = decode(job.data, self.limits)
        except QrsightError as exc:
            return _Intake(None, _ms(start), exc)
        except Exception as exc:  # a decoder bug must not stop the batch: report it as bad input
            logger.warning("image decode failed request_id=%s", job.request_id, exc_info=True)
            return _Intake(None, _ms(start), CorruptImageError(f"cannot decode the image: {exc}"))
        return _Intake(image, _ms(start))

    def _run_chunk(
        self,
        jobs: Sequence[ImageJob],
        intakes: Sequence[_Intake],
        chunk: Sequence[int],
        queue_ms: Sequence[float],
        start: float,
    ) -> list[dict[str, Any]]:
        images = [intakes[i].image for i in chunk]
        assert all(img is not None for img in images)
        pixels: list[np.ndarray] = [img for img in images if img is not None]
        t_infer = time.perf_counter()
        batch, metas = self.detector.preprocess(pixels)
        raw = self.detector.infer(batch)
        infer_ms = _ms(t_infer)
        t_post = time.perf_counter()
        confs = [jobs[i].conf for i in chunk]
        detections = self.detector.postprocess(raw, metas, confs)
        post_share = _ms(t_post) / len(chunk)
        records = []
        for i, image, found in zip(chunk, pixels, detections, strict=True):
            job = jobs[i]
            t_pay = time.perf_counter()
            read = self.settings.decode_payloads if job.decode is None else job.decode
            dets = self.check(image, found, read=read, request_id=job.request_id)
            timing = {
                "queue_ms": queue_ms[i],
                "decode_ms": intakes[i].decode_ms,
                "infer_ms": infer_ms,
                "post_ms": post_share + _ms(t_pay),
                "total_ms": queue_ms[i] + _ms(start),
            }
            records.append(
                result_record(
                    job.request_id,
                    job.source,
                    dets,
                    width=image.shape[1],
                    height=image.shape[0],
                    model=self.detector.info,
                    timing=timing,
                )
            )
        return records

    def check(
        self, image: np.ndarray, dets: Detections, *, read: bool = True, request_id: str = ""
    ) -> Detections:
        """The detector's boxes of one image → what the pipeline reports.

        With ``read``: payloads the standard way (and codes a whole-image read finds
        outside every box, ``QRSIGHT_READ_WHOLE_IMAGE``). Then the verifier judges each
        unread QR box; the plausible ones (judged at least :data:`HARD_READ_MIN`, all of
        them without a verifier) get the harder reads of ``hard_attempts`` (default
        ``core.payload.HARD_ATTEMPTS``);
        finally the verifier's rule keeps read boxes and those judged at its threshold,
        with their calibrated confidence. Most confident first.
        """
        if read:
            dets = self._payloads(request_id, image, dets)
        judged = (
            self.verifier.judge(image, dets, self._qr_id)
            if self.verifier is not None
            else np.ones(len(dets), np.float32)
        )
        if read:
            dets = self._read_harder(request_id, image, dets, judged)
        if self.verifier is not None:
            dets = self.verifier.apply(dets, judged)
        if read:
            dets = drop_duplicate_reads(dets)
        order = np.argsort(-dets.confidence, kind="stable")  # the contract: most confident first
        return dets if (order == np.arange(len(dets))).all() else dets[order]

    def _payloads(self, request_id: str, image: np.ndarray, dets: Detections) -> Detections:
        try:
            return drop_duplicate_reads(read_payloads(image, dets, add_missed_as=self._missed_as))
        except Exception:  # payload reading is best effort; the boxes still stand
            logger.warning("payload reading failed request_id=%s", request_id, exc_info=True)
            return dets

    def _read_harder(
        self, request_id: str, image: np.ndarray, dets: Detections, judged: np.ndarray
    ) -> Detections:
        assert dets.text is not None
        which = [
            i
            for i, (c, t, j) in enumerate(zip(dets.class_id, dets.text, judged, strict=True))
            if c == self._qr_id and t is None and j >= HARD_READ_MIN
        ]
        try:
            return read_harder(image, dets, which, self.hard_attempts)
        except Exception:  # best effort, as the standard reads
            logger.warning("harder reading failed request_id=%s", request_id, exc_info=True)
            return dets


def qr_class(labels: Mapping[int, str]) -> int | None:
    """The class id of QR codes: the label that names them, or the only class; ``None``
    for a model whose classes are something else (its QR codes are not added)."""
    named = [cid for cid, label in labels.items() if "qr" in label.lower()]
    if named:
        return min(named)
    return 0 if len(labels) <= 1 else None
