"""ONNX Runtime execution providers: CPU vs CUDA vs TensorRT, FP32 vs FP16, batch sizes.

    python -m bench.providers [IMAGES_DIR_OR_MANIFEST] [--model M] [--imgsz 416 640]
                              [--batches 1 8 32 64] [--runs 20] [--reference] [--out DIR]

Everything goes through ``core.vision.detector.Detector`` — the class the workers use — on
real photos (default ``../shared/data/qr-real-dev``), so the figures include the
host→device copies and the provider choice a worker makes. One run measures:

1. **Providers**: what this onnxruntime offers, what ``choose_providers()`` (TensorRT →
   CUDA → CPU) picks, and for each configuration the providers the session really got
   (a provider whose libraries are missing falls back: this shows it).
2. **Inference** (``Detector.infer`` on letterboxed real photos): median ms per batch and
   images/s per configuration, imgsz and batch size; the baseline is the CPU provider
   (all cores) at batch 1 in the same run, and every row prints its ratio to it.
3. **Agreement**: ``Detector.predict`` at the default threshold on every photo, each
   configuration against CPU FP32: images whose detection count differs, the largest
   score difference and the smallest IoU of matched boxes. A GPU path that is fast and
   wrong shows here.
4. **End to end** (``core.vision.pipeline.Pipeline.run`` over the JPEG/PNG bytes: decode →
   letterbox → inference → NMS → payload reading, built from settings as a worker does)
   per configuration and ``max_batch``: images/s and the mean stage times, i.e. where
   the time goes once inference is cheap. GPU FP32 runs twice, with the default batch
   padding (``QRSIGHT_PAD_BATCH`` unset) and without it.

Configurations: ``cpu`` always; ``cuda`` and ``cuda-fp16`` (the model converted with
``onnxruntime.transformers.float16``, float16 input and output, written to ``--out``)
when ``CUDAExecutionProvider`` is available; ``tensorrt`` when
``TensorrtExecutionProvider`` is (and its libraries load: a configuration whose session
falls back to another provider is reported and skipped). ``--reference`` adds the
YOLOv8n-sized graph of ``training/yolov8n_ref.py`` (needs torch) to section 2.
Writes ``providers.md`` and ``providers.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from core.runtime.settings import DEFAULT_MODEL, load_settings
from core.vision.detections import Detections
from core.vision.detector import Detector, choose_providers
from core.vision.images import decode
from core.vision.pipeline import ImageJob, Pipeline
from core.vision.postprocess import box_iou
from training.eval.detector import LIMITS, load_manifest

logger = logging.getLogger("bench.providers")

DEFAULT_IMAGES = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "qr-real-dev"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


@dataclass
class Config:
    """One way to run the model: providers in order and the .onnx file."""

    name: str
    providers: list[str]
    model: Path
    got: list[str] = field(default_factory=list)


# --- inputs -------------------------------------------------------------------------------------
def image_files(source: Path) -> list[Path]:
    """The photos of a ``manifest.jsonl`` (or a folder holding one), else of a folder."""
    if source.is_dir() and not (source / "manifest.jsonl").is_file():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [item.path for item in load_manifest(source)]


def to_fp16(model: Path, out: Path) -> Path:
    """``model`` with float16 weights, activations, input and output (for CUDA/TensorRT)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(onnx.load(str(model)), keep_io_types=False)
    target = out / f"{model.stem}-fp16.onnx"
    onnx.save(half, str(target))
    return target


def usable(cfgs: Sequence[Config]) -> tuple[list[Config], dict[str, list[str]]]:
    """The configurations whose first provider the session really got; the others' fallbacks."""
    kept, fell_back = [], {}
    for cfg in cfgs:
        cfg.got = Detector(cfg.model, providers=cfg.providers).providers
        first = cfg.providers[0]
        if first in cfg.got:
            kept.append(cfg)
        else:
            fell_back[cfg.name] = cfg.got
            print(f"  {cfg.name}: asked for {first}, the session got {cfg.got}: skipped")
    return kept, fell_back


def configs(model: Path, out: Path) -> list[Config]:
    available = ort.get_available_providers()
    found = [Config("cpu", ["CPUExecutionProvider"], model)]
    if "CUDAExecutionProvider" in available:
        cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        found.append(Config("cuda", cuda, model))
        found.append(Config("cuda-fp16", cuda, to_fp16(model, out)))
    if "TensorrtExecutionProvider" in available:
        trt = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        found.append(Config("tensorrt", trt, model))
    return found


# --- measurements -------------------------------------------------------------------------------
def median_ms(fn: Any, runs: int) -> float:
    fn()  # warm-up: CUDA allocations, cuDNN algorithm search, TensorRT engine build
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def batch_of(images: Sequence[np.ndarray], det: Detector, size: int) -> np.ndarray:
    picked = [images[i % len(images)] for i in range(size)]
    batch, _ = det.preprocess(picked)
    return batch


def inference_rows(
    cfgs: Sequence[Config],
    images: Sequence[np.ndarray],
    imgszs: Sequence[int],
    batches: Sequence[int],
    runs: int,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for imgsz in imgszs:
        base: float | None = None
        for cfg in cfgs:
            det = Detector(cfg.model, providers=cfg.providers, imgsz=imgsz)
            for size in batches:
                batch = batch_of(images, det, size)
                ms = median_ms(lambda b=batch, d=det: d.infer(b), runs)
                per_img = ms / size
                if base is None:  # the first row: CPU at the first batch size
                    base = per_img
                rows.append(
                    {
                        "model": cfg.model.name,
                        "config": cfg.name,
                        "imgsz": imgsz,
                        "batch": size,
                        "ms_batch": round(ms, 3),
                        "img_s": round(1000 * size / ms, 1),
                        "speedup_vs_cpu_b1": round(base / per_img, 2),
                    }
                )
                print(
                    f"  {cfg.name:14s} imgsz {imgsz} batch {size:3d}: {ms:8.2f} ms/batch "
                    f"{1000 * size / ms:8.1f} img/s  x{base / per_img:.1f} vs cpu b1",
                    flush=True,
                )
    return rows


def agreement(
    ref: Sequence[Detections], other: Sequence[Detections]
) -> tuple[int, float, float, int]:
    """(images whose count differs, max |score diff|, min IoU, detections) over matches."""
    differ, max_diff, min_iou, n = 0, 0.0, 1.0, 0
    for a, b in zip(ref, other, strict=True):
        if len(a.xyxy) != len(b.xyxy):
            differ += 1
        if len(a.xyxy) == 0 or len(b.xyxy) == 0:
            continue
        iou = box_iou(a.xyxy, b.xyxy)
        best = iou.argmax(1)
        for i, j in enumerate(best):
            n += 1
            min_iou = min(min_iou, float(iou[i, j]))
            max_diff = max(max_diff, abs(float(a.confidence[i]) - float(b.confidence[j])))
    return differ, max_diff, min_iou, n


def agreement_rows(cfgs: Sequence[Config], images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
    results = {}
    for cfg in cfgs:
        det = Detector(cfg.model, providers=cfg.providers)
        results[cfg.name] = [det.predict([img])[0] for img in images]
    ref = results[cfgs[0].name]
    rows = []
    for cfg in cfgs[1:]:
        differ, max_diff, min_iou, n = agreement(ref, results[cfg.name])
        rows.append(
            {
                "config": cfg.name,
                "images": len(images),
                "count_differs": differ,
                "max_score_diff": round(max_diff, 4),
                "min_iou": round(min_iou, 4),
                "matched": n,
            }
        )
        print(
            f"  {cfg.name:14s} vs cpu: {differ} of {len(images)} images differ in count, "
            f"max score diff {max_diff:.4f}, min IoU {min_iou:.4f} ({n} boxes)",
            flush=True,
        )
    return rows


def pipeline_rows(
    cfgs: Sequence[Config], blobs: Sequence[bytes], batches: Sequence[int], rounds: int
) -> list[dict[str, Any]]:
    """``Pipeline(settings)`` as a worker builds it; GPU FP32 also without batch padding."""
    rows = []
    jobs = [ImageJob(f"p-{i}", data) for i, data in enumerate(blobs)]
    runs = [(cfg, None) for cfg in cfgs]
    runs += [(cfg, False) for cfg in cfgs if cfg.name in ("cuda", "tensorrt")]
    for cfg, pad in runs:
        name = cfg.name if pad is None else f"{cfg.name} (pad off)"
        for size in batches:
            settings = load_settings(
                model_path=cfg.model,
                onnx_providers=cfg.providers,
                max_batch=size,
                pad_batch=pad,
            )
            with Pipeline(settings) as pipeline:
                pipeline.run(jobs[:size])  # warm-up
                best, timings = 0.0, []
                for _ in range(rounds):
                    start = time.perf_counter()
                    out = pipeline.run(jobs)
                    best = max(best, len(jobs) / (time.perf_counter() - start))
                    timings = [r["timings"] for r in out if r["status"] == "OK"]
            mean = {k: float(np.mean([t[k] for t in timings])) for k in timings[0]}
            rows.append(
                {
                    "config": name,
                    "max_batch": size,
                    "img_s": round(best, 1),
                    **{k: round(v, 2) for k, v in mean.items() if k != "queue_ms"},
                }
            )
            print(
                f"  {name:20s} max_batch {size:3d}: {best:7.1f} img/s  "
                f"decode {mean['decode_ms']:.1f} ms/img, "
                f"letterbox+infer {mean['infer_ms']:.1f} ms/batch, "
                f"post {mean['post_ms']:.1f} ms/img (means)",
                flush=True,
            )
    return rows


# --- report -------------------------------------------------------------------------------------
def table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(none)\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "choose_providers": choose_providers(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        env["gpu"] = gpu.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["gpu"] = None
    return env


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("images", nargs="?", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--imgsz", type=int, nargs="+", default=[416, 640])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--pipeline-batches", type=int, nargs="+", default=[8, 32])
    p.add_argument("--runs", type=int, default=20, help="timed runs per row (median)")
    p.add_argument("--rounds", type=int, default=3, help="end-to-end passes (best)")
    p.add_argument("--reference", action="store_true", help="add the YOLOv8n-sized graph")
    p.add_argument("--out", type=Path, default=Path("runs/providers"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)

    files = image_files(args.images)
    blobs = [f.read_bytes() for f in files]
    images = [decode(b, LIMITS) for b in blobs]
    print(f"{len(images)} images from {args.images}", flush=True)
    env = environment()
    print(json.dumps(env, indent=1), flush=True)

    print("sessions (requested → got):", flush=True)
    cfgs, fell_back = usable(configs(args.model, args.out))
    env["sessions"] = {c.name: c.got for c in cfgs}
    env["fell_back"] = fell_back
    print(json.dumps(env["sessions"]), flush=True)
    print("inference (Detector.infer, median of --runs):", flush=True)
    infer = inference_rows(cfgs, images, args.imgsz, args.batches, args.runs)
    if args.reference:
        from training.yolov8n_ref import export_reference

        ref = export_reference(args.out / "yolov8n-sized.onnx")
        ref_cfgs = [Config(f"ref-{c.name}", c.providers, ref) for c in cfgs if "fp16" not in c.name]
        infer += inference_rows(ref_cfgs, images, args.imgsz, args.batches, args.runs)
    print("agreement with CPU FP32 (Detector.predict, default threshold):", flush=True)
    agree = agreement_rows(cfgs, images)
    print("end to end (Pipeline.run over the encoded files, best of --rounds):", flush=True)
    e2e = pipeline_rows(cfgs, blobs, args.pipeline_batches, args.rounds)

    report = {"env": env, "inference": infer, "agreement": agree, "pipeline": e2e}
    (args.out / "providers.json").write_text(json.dumps(report, indent=1))
    md = (
        f"# Providers — {args.model.name}, {len(images)} images\n\n"
        f"```\n{json.dumps(env, indent=1)}\n```\n\n## Inference\n\n{table(infer)}\n"
        f"## Agreement with CPU FP32\n\n{table(agree)}\n## End to end\n\n{table(e2e)}"
    )
    (args.out / "providers.md").write_text(md)
    print(f"wrote {args.out / 'providers.md'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
