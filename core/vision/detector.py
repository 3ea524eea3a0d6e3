"""The ONNX detector: preprocess → ONNX Runtime → postprocess, in batches.

One :class:`Detector` (one ``InferenceSession``) per process. Any YOLO-style export
drops in: the output layout (YOLOv5, YOLOv8/11, end-to-end) is detected from the
output shape and the Ultralytics metadata (``names``, ``imgsz``, ``stride``).
"""

from __future__ import annotations

import ast
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from core.runtime.busy import BusyBoard
from core.runtime.errors import ConfigError, ModelError
from core.runtime.gpu import GPU_PROVIDERS, gpu_runtime, ort_intra_threads, ort_solo_threads
from core.runtime.settings import Settings
from core.vision.batch_nms import postprocess_batch_vectorized
from core.vision.detections import Detections, ModelInfo
from core.vision.letterbox_graph import DeviceLetterbox
from core.vision.postprocess import (
    LAYOUT_DEFAULTS,
    Layout,
    Letterbox,
    detect_layout,
    input_hw,
    layout_classes,
    letterbox_batch,
)

__all__ = ["Detector", "ModelInfo", "choose_providers"]

logger = logging.getLogger(__name__)

PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
DEFAULT_IMGSZ = 640


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """Providers to use, in order: ``requested`` (checked), else TensorRT → CUDA → CPU."""
    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ConfigError(
                f"QRSIGHT_ONNX_PROVIDERS names providers this onnxruntime lacks: {missing}; "
                f"available: {available}"
            )
        return list(requested)
    chosen = [p for p in PREFERRED_PROVIDERS if p in available]
    return chosen or ["CPUExecutionProvider"]


def provider_options(providers: Sequence[str], device_id: int) -> list[Any]:
    """``providers`` as ONNX Runtime takes them, the GPU ones pinned to CUDA device
    ``device_id`` (``(name, {"device_id": ...})``); the CPU provider needs no option."""
    return [(p, {"device_id": str(device_id)}) if p in GPU_PROVIDERS else p for p in providers]


def parse_literal(value: str | None) -> Any:
    """A Python literal stored as text in model metadata (``"{0: 'qr'}"``), else None."""
    if not value:
        return None
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def parse_names(value: str | None) -> dict[int, str]:
    """Ultralytics ``names``: a dict literal ``{0: 'qr'}`` (or a list ``['qr']``)."""
    names = parse_literal(value)
    if isinstance(names, list | tuple):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not all(
        isinstance(k, int) and isinstance(v, str) for k, v in names.items()
    ):
        return {}
    return dict(names)


def parse_imgsz(value: str | None) -> tuple[int, int] | None:
    """Ultralytics ``imgsz``: ``"[640, 640]"`` (h, w) or ``"640"``."""
    size = parse_literal(value)
    if isinstance(size, int) and size > 0:
        return (size, size)
    if (
        isinstance(size, list | tuple)
        and len(size) == 2
        and all(isinstance(s, int) and s > 0 for s in size)
    ):
        return (size[0], size[1])
    return None


def _fixed(dim: object) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


class Detector:
    """A YOLO-style ONNX detector.

    ``predict(images)`` = ``postprocess(infer(preprocess(images)))``; the stages are
    public so callers can time them. Thresholds: per call, else the constructor's,
    else the layout's defaults (YOLOv5 0.25/0.45, YOLOv8/11 0.25/0.7, end-to-end 0.25).

    ``pad_to``: run every batch as exactly that many images (padded with blanks, longer
    ones split) when ``pad`` is true — by default when the session runs on CUDA or
    TensorRT, where each new input shape costs a cuDNN algorithm search or an engine
    build (0.5 to 3 s, measured in ``bench/README.md``) and micro-batches vary in size. The
    padded shape is run once at load (warm-up).

    ``device_preprocess``: letterbox on the inference device (:mod:`core.vision.letterbox_graph`;
    by default on CUDA and TensorRT) instead of on the host; :meth:`run_images` picks the
    path. ``device_id``: the CUDA device of the GPU providers.

    ``solo_threads`` (CPU only; 0 = off): a second session with that many intra-op
    threads runs a batch of exactly one image (kept only if a lone image takes at least
    ``solo_min_run_ms`` on the normal session, timed at load), so a lone image at low
    load may use the cores other workers leave idle, while fuller batches keep
    ``intra_threads``; with
    :attr:`busy` set (a worker's :class:`core.runtime.busy.BusyBoard`, which
    ``core.vision.pipeline.Pipeline.run`` marks for the whole batch) only while no other
    worker of the host has a batch in hand and together they used less than half a core
    over the last second (at full load a worker is idle between two batches too).
    """

    def __init__(
        self,
        model_path: str | Path,
        providers: Sequence[str] | None = None,
        *,
        intra_threads: int = 0,
        inter_threads: int = 1,
        imgsz: int | None = None,
        conf: float | None = None,
        iou: float | None = None,
        max_det: int = 100,
        pad_to: int | None = None,
        pad: bool | None = None,
        device_id: int = 0,
        device_preprocess: bool | None = None,
        solo_threads: int = 0,
        solo_min_run_ms: float = 0.0,
        rect: bool = False,
        scaleup: bool = True,
    ) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ConfigError(
                f"model file not found: {self.model_path} (set QRSIGHT_MODEL_PATH to an .onnx file)"
            )
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.device_id = device_id
        chosen = provider_options(choose_providers(providers), device_id)
        self.session = self._open(chosen, intra_threads, inter_threads)
        self.providers: list[str] = self.session.get_providers()
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        inp = self.session.get_inputs()[0]
        self.input_name: str = inp.name
        self.input_dtype = np.float16 if "float16" in inp.type else np.float32
        self.input_hw = self._input_size(inp.shape, meta, imgsz)
        self.stride = int(parse_literal(meta.get("stride")) or 32)
        self.fixed_batch = _fixed(inp.shape[0])
        if self.fixed_batch is not None:
            logger.info(
                "model has a fixed batch, images run in chunks of that size model=%s batch=%d",
                self.model_path,
                self.fixed_batch,
            )
        self.on_gpu = self.providers[0] in GPU_PROVIDERS
        self.solo_session = (
            self._open(chosen, solo_threads, inter_threads, spin=True)
            if solo_threads > 0 and solo_threads != intra_threads and not self.on_gpu
            else None
        )
        if self.solo_session is not None and solo_min_run_ms > 0:
            lone_ms = self._lone_run_ms()
            if lone_ms < solo_min_run_ms:
                logger.info(
                    "solo session off: a lone image runs in %.1f ms, under %.0f ms "
                    "(QRSIGHT_ORT_SOLO_MIN_RUN_MS)",
                    lone_ms,
                    solo_min_run_ms,
                )
                self.solo_session = None
        # the host's other workers (core.runtime.busy), set by a worker that has a solo session
        self.busy: BusyBoard | None = None
        self.lone_runs = 0  # batches of one image, while a solo session exists
        self.solo_runs = 0  # of which run on the solo session
        if pad is None:  # CUDA searches kernels, TensorRT builds an engine, per input shape
            pad = self.on_gpu
        self.run_batch = self.fixed_batch or (pad_to if pad else None)
        self.scaleup = scaleup
        # the on-device letterbox always enlarges: without scale-up the host letterboxes
        self.letterbox = self._device_letterbox(device_preprocess) if scaleup else None
        # the smallest input that holds the batch, on the CPU only: on a GPU each shape costs
        # a kernel search or an engine build, and a padded run or a fixed input keeps one shape
        free_hw = not (_fixed(inp.shape[2]) and _fixed(inp.shape[3]))
        self.rect = (
            rect
            and free_hw
            and not self.on_gpu
            and self.run_batch is None
            and self.letterbox is None
        )
        labels = parse_names(meta.get("names"))
        self.layout = self._find_layout(meta, len(labels) or None)
        if not labels:
            nc = layout_classes(self.layout, self._output_shape) or 1
            labels = {i: str(i) for i in range(nc)}
        self.info = ModelInfo(
            name=meta.get("description") or self.model_path.stem,
            version=meta.get("version") or "unknown",
            input_size=max(self.input_hw),
            layout=self.layout,
            labels=labels,
        )
        logger.info(
            "detector loaded model=%s layout=%s input=%dx%d classes=%d providers=%s",
            self.model_path,
            self.layout,
            self.input_hw[1],
            self.input_hw[0],
            len(labels),
            ",".join(self.providers),
        )
        if self.run_batch is not None and self.on_gpu:
            self._warm_up()

    def _device_letterbox(self, wanted: bool | None) -> DeviceLetterbox | None:
        """The on-device letterbox, when wanted (default: on a GPU) and the model takes
        float32 (a float16 model keeps the host letterbox, which casts)."""
        if not (self.on_gpu if wanted is None else wanted):
            return None
        if self.input_dtype != np.float32:
            logger.info("device letterbox off: the model input is %s", self.input_dtype.__name__)
            return None
        # CUDA, not TensorRT, for the letterbox graph: its pixel input changes length every
        # batch, and TensorRT would build an engine per shape
        providers = provider_options(
            [p for p in self.providers if p != "TensorrtExecutionProvider"], self.device_id
        )
        device = ("cuda", self.device_id) if self.on_gpu else ("cpu", 0)
        return DeviceLetterbox(
            self.session, providers, self.input_hw, device=device, batch=self.run_batch
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Detector:
        on_gpu = gpu_runtime(settings.onnx_providers)
        return cls(
            settings.model_path,
            providers=settings.onnx_providers,
            intra_threads=ort_intra_threads(settings, on_gpu),
            inter_threads=settings.ort_inter_threads,
            imgsz=settings.imgsz,
            conf=settings.conf_threshold,
            iou=settings.iou_threshold,
            max_det=settings.max_detections,
            pad_to=settings.max_batch,
            pad=settings.pad_batch,
            device_id=settings.cuda_device or 0,
            device_preprocess=settings.device_preprocess,
            solo_threads=ort_solo_threads(settings, on_gpu),
            solo_min_run_ms=settings.ort_solo_min_run_ms,
            rect=settings.rect,
            scaleup=settings.scaleup,
        )

    # --- loading -------------------------------------------------------------------------

    def _open(
        self, providers: list[Any], intra: int, inter: int, spin: bool = False
    ) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra
        options.inter_op_num_threads = inter
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's idle intra-op threads spin by default; between runs a worker decodes, reads
        # payloads and talks to Kafka on the same cores, and the spinning took them (measured:
        # bench/README.md, "Serving"). The solo session (``spin``) runs only while the other
        # workers are idle, and its threads spin between the graph's nodes: a run of the
        # YOLOv8n-sized graph on 2 threads took 61 ms without, 51 ms with (1 thread: 79 ms)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        if spin:  # ... and stop spinning as soon as the run returns
            options.add_session_config_entry("session.force_spinning_stop", "1")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(str(self.model_path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own (non-exported) types
            raise ModelError(f"cannot load ONNX model {self.model_path}: {exc}") from exc

    def _input_size(
        self, shape: Sequence[object], meta: Mapping[str, str], imgsz: int | None
    ) -> tuple[int, int]:
        if len(shape) != 4:
            raise ModelError(f"model input must be [B, 3, H, W], got {list(shape)}")
        fixed_h, fixed_w = _fixed(shape[2]), _fixed(shape[3])
        if fixed_h and fixed_w:
            if imgsz and (imgsz, imgsz) != (fixed_h, fixed_w):
                logger.warning(
                    "model input is fixed, ignoring imgsz=%d input=%dx%d", imgsz, fixed_w, fixed_h
                )
            return (fixed_h, fixed_w)
        if imgsz:
            return input_hw(imgsz)
        return parse_imgsz(meta.get("imgsz")) or (DEFAULT_IMGSZ, DEFAULT_IMGSZ)

    def _find_layout(self, meta: Mapping[str, str], nc_hint: int | None) -> Layout:
        """Layout from the output shape; runs one blank image (padded like every run) if its
        dims are symbolic."""
        shape = list(self.session.get_outputs()[0].shape)
        if not all(_fixed(d) for d in shape[1:]):
            blank = np.full((1, 3, *self.input_hw), 114 / 255, self.input_dtype)
            shape = list(self.infer(blank).shape)  # padded on a GPU: warms that shape up
        self._output_shape = [int(d) if _fixed(d) else 1 for d in shape]
        if parse_literal(meta.get("end2end")) is True:
            return "end2end"
        return detect_layout(shape, nc_hint, imgsz=max(self.input_hw))

    # --- stages --------------------------------------------------------------------------

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[Letterbox]]:
        """Letterbox BGR uint8 images into one NCHW batch the model takes."""
        batch, metas = letterbox_batch(
            images, self.input_hw, self.stride, rect=self.rect, scaleup=self.scaleup
        )
        return batch.astype(self.input_dtype, copy=False), metas

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """The raw ``output0`` of a batch.

        One run, or — for a model with a fixed batch, or when padding (``pad_to``) — runs
        of exactly ``run_batch`` images, the last one padded, so the session sees one shape.
        """
        if len(batch) == 0:
            return np.empty((0, *self._output_shape[1:]), np.float32)
        size = self.run_batch
        if size is None or len(batch) == size:
            return self._run(batch)
        outs = []
        for start in range(0, len(batch), size):
            chunk = batch[start : start + size]
            n = len(chunk)
            if n < size:  # pad the last chunk up to the run size
                chunk = np.concatenate([chunk, np.zeros((size - n, *chunk.shape[1:]), chunk.dtype)])
            outs.append(self._run(chunk)[:n])
        return np.concatenate(outs)

    def postprocess(
        self,
        raw: np.ndarray,
        metas: Sequence[Letterbox],
        conf: float | Sequence[float | None] | None = None,
    ) -> list[Detections]:
        """Decode, NMS, rescale. ``conf`` is one threshold or one per image."""
        if conf is None:
            conf = self.conf
        elif not isinstance(conf, float | int) and self.conf is not None:
            conf = [self.conf if c is None else c for c in conf]
        return (
            postprocess_batch_vectorized(  # = postprocess_batch, batch-wide (core.vision.batch_nms)
                raw, self.layout, metas, conf=conf, iou=self.iou, max_det=self.max_det
            )
        )

    def run_images(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[Letterbox]]:
        """Letterbox and infer: the raw output and each image's letterbox, on the device
        (:attr:`letterbox`) or on the host (:meth:`preprocess` then :meth:`infer`)."""
        if self.letterbox is not None:
            return self.letterbox.run(images)
        batch, metas = self.preprocess(images)
        return self.infer(batch), metas

    def predict(
        self, images: Sequence[np.ndarray], conf: float | Sequence[float | None] | None = None
    ) -> list[Detections]:
        raw, metas = self.run_images(images)
        return self.postprocess(raw, metas, conf)

    @property
    def default_thresholds(self) -> tuple[float, float | None]:
        """(conf, iou) in effect when a call gives none."""
        conf, iou = LAYOUT_DEFAULTS[self.layout]
        return (
            conf if self.conf is None else self.conf,
            iou if self.iou is None or self.layout == "end2end" else self.iou,
        )

    def _lone_run_ms(self, runs: int = 3) -> float:
        """A lone image of the full input size on the worker's own session: the best of
        ``runs`` timed runs after an untimed one (the best: another process starting on
        the same cores only ever adds to a run)."""
        shape = (self.fixed_batch or 1, 3, *self.input_hw)
        blank = np.full(shape, 114 / 255, self.input_dtype)
        feed = {self.input_name: blank}
        self.session.run(None, feed)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self.session.run(None, feed)
            times.append((time.perf_counter() - start) * 1000)
        return min(times)

    def _warm_up(self) -> None:
        """One blank run of the padded shape, so the first real batch is not the slow one."""
        start = time.perf_counter()
        assert self.run_batch is not None
        self._run(np.full((self.run_batch, 3, *self.input_hw), 114 / 255, self.input_dtype))
        if self.letterbox is not None:
            self.letterbox.run([np.full((self.stride, self.stride, 3), 114, np.uint8)])
        ms = (time.perf_counter() - start) * 1000
        logger.info("detector warmed up batch=%d ms=%.0f", self.run_batch, ms)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        try:
            session = self.session
            # a lone image takes more threads, unless another worker here is running
            lone = self.solo_session is not None and len(batch) == 1
            self.lone_runs += lone
            if lone and (self.busy is None or self.busy.others_idle()):
                session = self.solo_session
                self.solo_runs += 1
            out = session.run(None, {self.input_name: batch})[0]
        except Exception as exc:  # onnxruntime's errors are not exported as types
            raise ModelError(f"ONNX Runtime failed on a batch of {len(batch)}: {exc}") from exc
        logger.debug("inference batch=%d ms=%.1f", len(batch), (time.perf_counter() - start) * 1000)
        return np.asarray(out, dtype=np.float32)
