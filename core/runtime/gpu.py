"""Where a worker runs and how many there are: GPU placement and defaults from what is installed.

A GPU worker is CPU-bound unless its host work is small (``bench/README.md``, *GPU*): JPEG
decoding, letterboxing, NMS and payload reading took 6 ms of CPU per image against 0.3 ms
of model time on an H200. So on a GPU host several worker processes share each GPU, each
with one ONNX Runtime thread (the model runs on the device; only a few shape nodes stay on
the CPU), and every worker is pinned to one device. Everything here is plain logic on
settings, environment variables and ``/dev`` entries — no CUDA call — so it is unit-tested
on machines without a GPU.

- :func:`visible_gpus`: the GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` as the
  CUDA runtime reads it, else the ``/dev/nvidiaN`` device nodes (a container sees only the
  GPUs it was given).
- :func:`gpu_runtime`: whether this onnxruntime can run on a GPU at all, and was not told
  otherwise (``QRSIGHT_ONNX_PROVIDERS``).
- :func:`default_workers`, :func:`worker_device`, :func:`ort_intra_threads`,
  :func:`post_threads`: the defaults of ``QRSIGHT_WORKERS``, ``QRSIGHT_CUDA_DEVICE``,
  ``QRSIGHT_ORT_INTRA_THREADS`` and ``QRSIGHT_POST_THREADS`` when they are unset;
  :func:`ort_solo_threads`: ``QRSIGHT_ORT_SOLO_THREADS``, on the CPU only.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from core.runtime.settings import Settings

logger = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_DEV_NODE = re.compile(r"nvidia(\d+)")
_CUDA_ID = re.compile(r"(\d+|GPU-[0-9a-fA-F-]+|MIG-[0-9a-zA-Z/-]+)")


def visible_gpus(environ: Mapping[str, str] | None = None, dev: Path = Path("/dev")) -> int:
    """How many GPUs CUDA will enumerate for this process.

    ``CUDA_VISIBLE_DEVICES`` wins when set: the CUDA runtime takes its comma-separated
    entries (indices, ``GPU-<uuid>``, ``MIG-<uuid>``) up to the first invalid one, so
    ``""`` and ``-1`` mean none and ``0,-1,1`` means one. Else the ``/dev/nvidiaN`` nodes
    are counted (``nvidiactl``, ``nvidia-uvm`` are not GPUs).
    """
    env = os.environ if environ is None else environ
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        count = 0
        for entry in listed.split(","):
            if not _CUDA_ID.fullmatch(entry.strip()):
                break
            count += 1
        return count
    try:
        return sum(1 for p in dev.iterdir() if _DEV_NODE.fullmatch(p.name))
    except OSError:
        return 0


def gpu_runtime(
    requested: Sequence[str] | None = None, available: Sequence[str] | None = None
) -> bool:
    """Whether the detector will try a GPU: onnxruntime offers CUDA or TensorRT and
    ``QRSIGHT_ONNX_PROVIDERS`` (``requested``), if set, starts with one of them."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if requested:
        return requested[0] in GPU_PROVIDERS and requested[0] in available
    return any(p in available for p in GPU_PROVIDERS)


def default_workers(
    settings: Settings, *, gpus: int | None = None, on_gpu: bool | None = None
) -> int:
    """``QRSIGHT_WORKERS`` if set; else ``QRSIGHT_WORKERS_PER_GPU`` per visible GPU on a GPU
    host; else 1 (``make up`` sizes a CPU host itself: one worker per core). ``gpus`` and
    ``on_gpu`` default to :func:`visible_gpus` and :func:`gpu_runtime`."""
    if settings.workers is not None:
        return settings.workers
    if on_gpu is None:
        on_gpu = gpu_runtime(settings.onnx_providers)
    if gpus is None:
        gpus = visible_gpus() if on_gpu else 0
    if on_gpu and gpus > 0:
        return settings.workers_per_gpu * gpus
    return 1


def worker_device(settings: Settings, index: int, gpus: int) -> int:
    """The CUDA device of worker ``index``: ``QRSIGHT_CUDA_DEVICE`` if set, else the workers
    dealt round-robin over the visible GPUs (worker i on GPU i mod gpus)."""
    if settings.cuda_device is not None:
        return settings.cuda_device
    return index % gpus if gpus > 0 else 0


def ort_intra_threads(settings: Settings, on_gpu: bool) -> int:
    """``QRSIGHT_ORT_INTRA_THREADS`` if set; else 1 on a GPU (the few nodes left on the CPU
    are shape arithmetic; more threads only take cores from decoding and payload
    reading) and 0 (onnxruntime's default, one per core) on the CPU."""
    if settings.ort_intra_threads is not None:
        return settings.ort_intra_threads
    return 1 if on_gpu else 0


def ort_solo_threads(settings: Settings, on_gpu: bool) -> int:
    """``QRSIGHT_ORT_SOLO_THREADS`` on the CPU; 0 (no second session) on a GPU, whose
    model runs on the device and whose batches keep one padded shape."""
    return 0 if on_gpu else settings.ort_solo_threads


def post_threads(settings: Settings, workers: int, *, on_gpu: bool, cpus: int | None = None) -> int:
    """Threads reading payloads in one worker: ``QRSIGHT_POST_THREADS`` if set; on a GPU
    host this worker's share of the cores (:func:`host_cpus` / workers, at least 1); on the CPU 1 (a
    CPU host runs one worker per core, each busy with its own model runs). zxing-cpp and
    OpenCV release the GIL, so the reads of one batch run side by side."""
    if settings.post_threads is not None:
        return settings.post_threads
    if not on_gpu:
        return 1
    cores = cpus if cpus is not None else host_cpus()
    return max(1, cores // max(1, workers))


def host_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity, capped by the container's CPU
    limit (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), so a
    pod limited to 4 cores on a 64-core node counts 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota: float | None = None
    try:
        limit, period = (cgroup / "cpu.max").read_text().split()[:2]
        quota = None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        try:
            limit_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
            period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
            quota = limit_us / period_us if limit_us > 0 and period_us > 0 else None
        except (OSError, ValueError):
            quota = None
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def place_worker(
    settings: Settings, index: int, environ: Mapping[str, str] | None = None
) -> Settings:
    """The settings worker ``index`` runs with: its CUDA device, worker count and ORT
    threads filled in where they were unset (unchanged on a CPU host)."""
    on_gpu = gpu_runtime(settings.onnx_providers)
    gpus = visible_gpus(environ)
    if not (on_gpu and gpus > 0):
        return settings
    update = {
        "cuda_device": worker_device(settings, index, gpus),
        "workers": default_workers(settings, gpus=gpus, on_gpu=True),
        "ort_intra_threads": ort_intra_threads(settings, on_gpu=True),
    }
    logger.info(
        "gpu placement worker=%d gpus=%d cuda_device=%d workers=%d ort_intra_threads=%d",
        index,
        gpus,
        update["cuda_device"],
        update["workers"],
        update["ort_intra_threads"],
    )
    return settings.model_copy(update=update)
