"""The one path from image bytes to ``DetectionResult`` dicts.

decode (thread pool) → letterbox → one ONNX run per chunk of ``max_batch`` → NMS and
rescale → :meth:`Pipeline.check`: payload reading, the crop verifier's judgement of the
unread QR boxes (``core.vision.verifier``; ``QRSIGHT_VERIFIER_PATH``, used with the detector it
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

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import cv2
import numpy as np

from core.runtime.errors import CorruptImageError, QrsightError
from core.runtime.gpu import default_workers, post_threads
from core.runtime.memory import container_memory_bytes
from core.runtime.results import error_record, now_ms
from core.runtime.settings import Settings
from core.runtime.telemetry import StageLog
from core.vision.detections import Detections, result_record
from core.vision.detector import Detector
from core.vision.gpu_decode import Decoded, make_gpu_decoder
from core.vision.images import ImageLimits, decode, jpeg_scale, probe
from core.vision.payload import HARD_ATTEMPTS, drop_duplicate_reads, read_harder, read_payloads
from core.vision.structure import cap_unstructured
from core.vision.symbols import drop_other_symbols
from core.vision.verifier import Verifier, load_verifier

logger = logging.getLogger(__name__)
T = TypeVar("T")

REDUCE_KEEP = 2  # decode reduced only while the longer side stays >= this x the model input
MIB = 1 << 20
DEFAULT_BUDGET_BYTES = 512 * MIB  # a batch's decoded images without a container limit
# Bytes per pixel one image takes at the peak of its decode (OpenCV 4, measured in a fresh
# process): a JPEG, and a PNG without alpha, about 6 (the 3-byte BGR result and a copy);
# a 16-bit RGBA PNG 18 (libpng's 8-byte rows, OpenCV's channel-swapped copy of them, then
# the 3-byte result); 8-bit BGRA WebP and BMP 9. The worst case of each format is counted.
PEAK_BYTES_PER_PIXEL = {"jpeg": 6, "png": 18, "webp": 9, "bmp": 9}
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
    trace_id: str | None = None  # the request's trace, for the log lines about it


@dataclass
class _Intake:
    image: np.ndarray | None
    decode_ms: float
    error: QrsightError | None = None
    started: float = 0.0  # perf_counter() at the decode's start
    scale: int = 1  # decoded at 1/scale (a large JPEG, see QRSIGHT_REDUCED_DECODE)
    size: tuple[int, int] | None = None  # (height, width) as sent, from the decode's probe


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class Pipeline:
    """Bytes in, one ``DetectionResult`` dict per job out (same order).

    Bad input never raises: it becomes an ``ERROR`` record with the error's code.
    A model failure raises :class:`core.runtime.errors.ModelError` (not the input's fault).
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
        # a JPEG this much larger than the model input is decoded at 1/2, 1/4 or 1/8
        self._keep_side = (
            REDUCE_KEEP * max(self.detector.input_hw) if settings.reduced_decode else 0
        )
        self.budget_bytes = batch_budget_bytes(settings, container_memory_bytes())
        self._pool = ThreadPoolExecutor(
            max_workers=settings.decode_threads, thread_name_prefix="qrsight-decode"
        )
        # GPU workers (core/vision/gpu_decode.py, core/runtime/gpu.py): JPEGs decoded on the GPU,
        # and the payloads of a batch read side by side
        self._gpu_decoder = make_gpu_decoder(
            settings,
            on_gpu=self.detector.on_gpu,
            keep_side=self._keep_side,
            device_id=self.detector.device_id,
        )
        workers = default_workers(settings, on_gpu=self.detector.on_gpu)
        threads = post_threads(settings, workers, on_gpu=self.detector.on_gpu)
        self._post_pool = (
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="qrsight-post")
            if threads > 1
            else None
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._post_pool is not None:
            self._post_pool.shutdown(wait=True)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def run(self, jobs: Sequence[ImageJob], stages: StageLog | None = None) -> list[dict[str, Any]]:
        """``stages`` (tracing on) receives each job's stage intervals for its spans.

        The jobs run in parts whose decoded images fit the batch's memory budget
        (:meth:`parts`), one part after another, so a batch of large images never holds
        them all decoded at once; the results are the same as in one part."""
        start, start_ms = time.perf_counter(), now_ms()
        queue_ms = [
            0.0 if j.submitted_at_ms is None else max(0.0, float(start_ms - j.submitted_at_ms))
            for j in jobs
        ]
        results: list[dict[str, Any]] = [{} for _ in jobs]
        # the host's other workers see this one busy for the whole batch, not only while
        # its model runs (core.runtime.busy): a worker between two model runs still has
        # work in hand, and its core is not free for another worker's solo session
        board = getattr(self.detector, "busy", None)
        with board.running() if board is not None else contextlib.nullcontext():
            for part in self.parts(jobs):
                sub = [jobs[i] for i in part]
                records = self._run_part(sub, [queue_ms[i] for i in part], start, stages)
                for i, record in zip(part, records, strict=True):
                    results[i] = record
        logger.debug("pipeline run images=%d ms=%.1f", len(jobs), _ms(start))
        return results

    def parts(self, jobs: Sequence[ImageJob]) -> list[list[int]]:
        """The jobs' indices in consecutive parts whose decoded bytes
        (:func:`decoded_bytes`) stay within ``QRSIGHT_BATCH_MEMORY_MB``; an image over the
        budget on its own is a part on its own; a lone job is one part without reading its
        header here (the decode reads it)."""
        if len(jobs) <= 1:
            return [list(range(len(jobs)))] if jobs else []
        parts: list[list[int]] = []
        held = 0
        for i, job in enumerate(jobs):
            cost = decoded_bytes(job.data, self.limits, self._keep_side)
            if not parts or held + cost > self.budget_bytes:
                parts.append([])
                held = 0
            parts[-1].append(i)
            held += cost
        return parts

    def _run_part(
        self,
        jobs: Sequence[ImageJob],
        queue_ms: Sequence[float],
        start: float,
        stages: StageLog | None,
    ) -> list[dict[str, Any]]:
        intakes = self._decode_all(jobs)
        if stages is not None:
            for job, intake in zip(jobs, intakes, strict=True):
                stages.add(job, "decode", intake.started, intake.started + intake.decode_ms / 1e3)
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
            records = self._run_chunk(jobs, intakes, chunk, queue_ms, start, stages=stages)
            for i, record in zip(chunk, records, strict=True):
                results[i] = record
        return [r for r in results if r is not None]

    def _decode_all(self, jobs: Sequence[ImageJob]) -> list[_Intake]:
        """Every job decoded: JPEGs on the GPU when there is a GPU decoder (one batched
        call), the rest — and whatever it leaves — on the CPU in the decode pool."""
        gpu: list[Decoded | None] = [None] * len(jobs)
        if self._gpu_decoder is not None:
            gpu = self._gpu_decoder.decode_many([j.data for j in jobs])
        todo = [j for j, g in zip(jobs, gpu, strict=True) if g is None]
        if len(todo) == 1:  # no hand-off to the pool (and back) for a lone image
            cpu = iter([self._decode(todo[0])])
        else:
            cpu = iter(list(self._pool.map(self._decode, todo)))
        return [
            next(cpu) if g is None else _Intake(g.pixels, g.decode_ms, started=g.started)
            for g in gpu
        ]

    def _decode(self, job: ImageJob) -> _Intake:
        start = time.perf_counter()
        try:
            info = probe(job.data, self.limits)
            scale = jpeg_scale(info, self._keep_side)
            image = decode(job.data, self.limits, scale=scale)
        except QrsightError as exc:
            return _Intake(None, _ms(start), exc, started=start)
        except Exception as exc:  # a decoder bug must not stop the batch: report it as bad input
            logger.warning(
                "image decode failed request_id=%s", job.request_id, exc_info=True, extra=_ids(job)
            )
            error = CorruptImageError(f"cannot decode the image: {exc}")
            return _Intake(None, _ms(start), error, started=start)
        size = (info.height, info.width)
        return _Intake(image, _ms(start), started=start, scale=scale, size=size)

    def _run_chunk(
        self,
        jobs: Sequence[ImageJob],
        intakes: Sequence[_Intake],
        chunk: Sequence[int],
        queue_ms: Sequence[float],
        start: float,
        *,
        stages: StageLog | None = None,
    ) -> list[dict[str, Any]]:
        images = [intakes[i].image for i in chunk]
        assert all(img is not None for img in images)
        pixels: list[np.ndarray] = [img for img in images if img is not None]
        t_infer = time.perf_counter()
        raw, metas = self.detector.run_images(pixels)  # letterbox on the host or the device
        infer_ms = _ms(t_infer)
        t_post = time.perf_counter()
        confs = [jobs[i].conf for i in chunk]
        detections = self.detector.postprocess(raw, metas, confs)
        t_done = time.perf_counter()
        post_share = (t_done - t_post) * 1000.0 / len(chunk)

        def finish(i: int, image: np.ndarray, found: Detections) -> dict[str, Any]:
            job = jobs[i]
            t_pay = time.perf_counter()
            read = self.settings.decode_payloads if job.decode is None else job.decode
            scale = intakes[i].scale
            dets = self.check(image, found, read=read, job=job, scale=scale)
            if stages is not None:
                stages.add(job, "infer", t_infer, t_post, images=len(chunk))
                stages.add(job, "postprocess", t_post, t_done, images=len(chunk))
                stages.add(job, "payloads", t_pay, time.perf_counter(), read=read)
            height, width = self._full_size(image, scale, job, intakes[i].size)
            dets = rescale(dets, scale)
            timing = {
                "queue_ms": queue_ms[i],
                "decode_ms": intakes[i].decode_ms,
                "infer_ms": infer_ms,
                "post_ms": post_share + _ms(t_pay),
                "total_ms": queue_ms[i] + _ms(start),
            }
            return result_record(
                job.request_id,
                job.source,
                dets,
                width=width,
                height=height,
                model=self.detector.info,
                timing=timing,
            )

        if self._post_pool is None or len(chunk) == 1:
            return [finish(*args) for args in zip(chunk, pixels, detections, strict=True)]
        return list(self._post_pool.map(finish, chunk, pixels, detections))

    def check(
        self,
        image: np.ndarray,
        dets: Detections,
        *,
        read: bool = True,
        job: ImageJob | None = None,
        scale: int = 1,
    ) -> Detections:
        """The detector's boxes of one image → what the pipeline reports.

        With ``read``: payloads the standard way (and codes a whole-image read finds
        outside every box, ``QRSIGHT_READ_WHOLE_IMAGE``). Then the verifier judges each
        unread QR box; the plausible ones (judged at least :data:`HARD_READ_MIN`, all of
        them without a verifier) get the harder reads of ``hard_attempts`` (default
        ``core.vision.payload.HARD_ATTEMPTS``); an unread box judged at the verifier's
        threshold whose crop shows no QR finder patterns has its judgement capped
        (:meth:`_structure`); finally the verifier's rule keeps read boxes and those judged
        at its threshold, with their calibrated confidence. Most confident
        first, at most ``max_detections``.

        ``image`` may be ``job``'s JPEG decoded at 1/``scale`` (boxes in its pixels):
        boxes it leaves unread are read again on full-resolution crops, the JPEG decoded
        in full once, and only if there is such a box.
        """
        full = _FullImage(image, job, scale, self.limits)
        if read:
            dets = self._payloads(job, image, dets)
            if scale > 1:
                dets = self._payloads_full(job, full, dets)
        judged = (
            self.verifier.judge(image, dets, self._qr_id)
            if self.verifier is not None
            else np.ones(len(dets), np.float32)
        )
        if read:
            dets = self._read_harder(job, full, dets, judged)
        if self.verifier is not None:
            judged = self._structure(job, full, dets, judged)
            dets = self.verifier.apply(dets, judged)
        if read:
            dets = drop_duplicate_reads(dets)
        order = np.argsort(-dets.confidence, kind="stable")  # the contract: most confident first
        if not (order == np.arange(len(dets))).all():
            dets = dets[order]
        # the whole-image read adds codes beside the detector's boxes (already capped at
        # max_detections by NMS): the cap holds for what is reported, most confident kept
        limit = self.settings.max_detections
        return dets if len(dets) <= limit else dets[:limit]

    def _payloads(self, job: ImageJob | None, image: np.ndarray, dets: Detections) -> Detections:
        return _best_effort(
            "payload reading",
            job,
            dets,
            lambda: drop_duplicate_reads(read_payloads(image, dets, add_missed_as=self._missed_as)),
        )

    def _read_harder(
        self, job: ImageJob | None, full: _FullImage, dets: Detections, judged: np.ndarray
    ) -> Detections:
        """The harder reads of the unread QR boxes judged plausible, on full-resolution
        crops (decoding a reduced JPEG in full only when there is such a box)."""
        assert dets.text is not None
        which = [
            i
            for i, (c, t, j) in enumerate(zip(dets.class_id, dets.text, judged, strict=True))
            if c == self._qr_id and t is None and j >= HARD_READ_MIN
        ]
        if not which or not self.hard_attempts:
            return dets
        return _best_effort(
            "harder reading",
            job,
            dets,
            lambda: rescale(
                read_harder(full.get(), rescale(dets, full.scale), which, self.hard_attempts),
                1 / full.scale,
            ),
        )

    def _structure(
        self, job: ImageJob | None, full: _FullImage, dets: Detections, judged: np.ndarray
    ) -> np.ndarray:
        """The verifier's judgements with the unread QR boxes it would keep set to 0 where
        zxing-cpp reads another symbology over them (``core.vision.symbols``,
        ``QRSIGHT_OTHER_SYMBOLS``), then capped at ``QRSIGHT_STRUCTURE_CAP`` where their
        full-resolution crop shows no QR finder patterns (``core.vision.structure``);
        set to 0 where it shows no finder pattern at all (``QRSIGHT_STRUCTURE_VETO``);
        unchanged by a step that fails."""
        assert self.verifier is not None and dets.text is not None
        if self.settings.structure_cap >= 1.0 and not self.settings.other_symbols:
            return judged
        unread = np.array([t is None for t in dets.text], bool)
        if not (
            unread & (dets.class_id == self._qr_id) & (judged >= self.verifier.threshold)
        ).any():
            return judged  # nothing to scan: no grey copy of the image either
        boxes, threshold = rescale(dets, full.scale), self.verifier.threshold
        if self.settings.other_symbols:
            judged = _best_effort(
                "other-symbol check",
                job,
                judged,
                lambda: drop_other_symbols(
                    full.gray(), boxes, judged, self._qr_id, threshold=threshold
                ),
            )
        if self.settings.structure_cap < 1.0:
            judged = _best_effort(
                "structure check",
                job,
                judged,
                lambda: cap_unstructured(
                    full.gray(),
                    boxes,
                    judged,
                    self._qr_id,
                    threshold=threshold,
                    cap=self.settings.structure_cap,
                    veto=self.settings.structure_veto,
                ),
            )
        return judged

    # --- large JPEGs decoded at 1/scale ------------------------------------------------
    def _payloads_full(
        self, job: ImageJob | None, full: _FullImage, dets: Detections
    ) -> Detections:
        """The boxes the reduced image left unread, read on full-resolution crops (in the
        reduced image's coordinates), so a photo whose codes read at 1/scale is never
        decoded in full."""
        if dets.text is None or all(t is not None for t in dets.text):
            return dets
        return _best_effort(
            "full-resolution payload reading",
            job,
            dets,
            lambda: rescale(read_payloads(full.get(), rescale(dets, full.scale)), 1 / full.scale),
        )

    def _full_size(
        self,
        image: np.ndarray,
        scale: int,
        job: ImageJob,
        probed: tuple[int, int] | None = None,
    ) -> tuple[int, int]:
        """(height, width) of the image as sent: the reduced size times ``scale``, read
        from the header when reduced (ceil division loses the exact size): ``probed``,
        the size the decode's probe read, else the header probed again (a probe scans a
        large JPEG's bytes: about 2 ms for a 4032x3024 frame)."""
        if scale == 1:
            return image.shape[0], image.shape[1]
        if probed is not None:
            return probed
        info = probe(job.data, self.limits)
        return info.height, info.width


def batch_budget_bytes(settings: Settings, memory_bytes: int | None) -> int:
    """``QRSIGHT_BATCH_MEMORY_MB``, or by default a quarter of ``memory_bytes``, the
    container's memory limit (the model, the runtime and the Kafka clients' buffers need
    the rest), and :data:`DEFAULT_BUDGET_BYTES` where there is no limit."""
    if settings.batch_memory_mb is not None:
        return settings.batch_memory_mb * MIB
    return DEFAULT_BUDGET_BYTES if memory_bytes is None else max(memory_bytes // 4, MIB)


def decoded_bytes(data: bytes, limits: ImageLimits, keep_side: int = 0) -> int:
    """What decoding the image takes at its peak, judged from its header alone: its pixels
    (at the size a large JPEG is decoded at) times its format's
    :data:`PEAK_BYTES_PER_PIXEL`. An image its header refuses costs nothing: it is never
    decoded."""
    try:
        info = probe(data, limits)
    except Exception:
        return 0
    scale = jpeg_scale(info, keep_side)
    pixels = -(-info.width // scale) * -(-info.height // scale)
    return pixels * PEAK_BYTES_PER_PIXEL.get(info.format, max(PEAK_BYTES_PER_PIXEL.values()))


def _best_effort(what: str, job: ImageJob | None, before: T, step: Callable[[], T]) -> T:
    """``step()``, or ``before`` unchanged if it raises: payload reading and the checks
    after it are best effort, the boxes still stand (the failure is logged with the
    request id)."""
    try:
        return step()
    except Exception:
        logger.warning(
            "%s failed request_id=%s", what, _request_id(job), exc_info=True, extra=_ids(job)
        )
        return before


def rescale(dets: Detections, factor: float) -> Detections:
    """The same detections with boxes and corners multiplied by ``factor``."""
    if factor == 1 or len(dets) == 0:
        return dets
    corners = (
        None if dets.corners is None else [None if c is None else c * factor for c in dets.corners]
    )
    return Detections(
        xyxy=dets.xyxy * factor,
        confidence=dets.confidence,
        class_id=dets.class_id,
        text=dets.text,
        corners=corners,
    )


class _FullImage:
    """The image at full resolution, decoded from ``job``'s bytes on first use when the
    pipeline holds it at 1/``scale``."""

    def __init__(
        self, image: np.ndarray, job: ImageJob | None, scale: int, limits: ImageLimits
    ) -> None:
        if scale > 1 and job is None:
            raise ValueError("a reduced image needs its job to decode it in full")
        self._job, self.scale, self._limits = job, scale, limits
        self._full: np.ndarray | None = image if scale == 1 else None
        self._gray: np.ndarray | None = None

    def get(self) -> np.ndarray:
        if self._full is None:
            assert self._job is not None
            self._full = decode(self._job.data, self._limits)
        return self._full

    def gray(self) -> np.ndarray:
        """:meth:`get` in grey levels (converted once)."""
        if self._gray is None:
            full = self.get()
            self._gray = full if full.ndim == 2 else cv2.cvtColor(full, cv2.COLOR_BGR2GRAY)
        return self._gray


def _ids(job: ImageJob | None) -> dict[str, str | None]:
    """A log line's request fields (``core.runtime.logs``)."""
    if job is None:
        return {"request_id": None, "trace_id": None}
    return {"request_id": job.request_id, "trace_id": job.trace_id}


def _request_id(job: ImageJob | None) -> str:
    return "" if job is None else job.request_id


def qr_class(labels: Mapping[int, str]) -> int | None:
    """The class id of QR codes: the label that names them, or the only class; ``None``
    for a model whose classes are something else (its QR codes are not added)."""
    named = [cid for cid, label in labels.items() if "qr" in label.lower()]
    if named:
        return min(named)
    return 0 if len(labels) <= 1 else None
