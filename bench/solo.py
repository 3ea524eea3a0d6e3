"""A lone image with one ONNX Runtime thread or in a second session with more
(``QRSIGHT_ORT_SOLO_THREADS``): latency and CPU of ``Pipeline.run`` on one image.

    python -m bench.solo [--images ../shared/data/qr-real-dev] [--count 40] [--solo 2]
                         [--ref]

What a ``make up`` worker (one intra-op thread) does with a batch of one image, against
the same worker with a solo session of ``--solo`` threads, interleaved image by image in
one process: wall-time p50 (the c = 1 latency in-process) and CPU-ms per image. With
``--ref`` the YOLOv8n-sized graph of ``training/yolov8n_ref.py`` (payloads off) runs
as well, where the model's own time dominates. Wall time needs idle cores to mean
anything: on a shared machine read the ratio, and the load average printed with it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.stages import DEFAULT_IMAGES, dev_photos
from core.runtime.settings import load_settings
from core.vision.pipeline import ImageJob, Pipeline


def measure(
    model: Path | None, images: Sequence[bytes], solo: int, *, read: bool
) -> dict[str, dict[str, float]]:
    """p50 wall ms and mean CPU ms per image of ``Pipeline.run`` on each image alone,
    without and with the solo session, interleaved."""
    configs = {"1 thread": "0", f"solo session, {solo} threads": str(solo)}
    pipes = {}
    for label, threads in configs.items():
        env = {
            "QRSIGHT_ORT_INTRA_THREADS": "1",
            "QRSIGHT_ORT_SOLO_THREADS": threads,
            "QRSIGHT_DECODE_PAYLOADS": str(read).lower(),
        }
        if model is not None:
            env["QRSIGHT_MODEL_PATH"] = str(model)
            env["QRSIGHT_VERIFIER_PATH"] = "off"  # the verifier belongs to the shipped model
        pipes[label] = Pipeline(load_settings(env))
    wall: dict[str, list[float]] = {k: [] for k in pipes}
    cpu: dict[str, list[float]] = {k: [] for k in pipes}
    try:
        for pipe in pipes.values():
            pipe.run([ImageJob("warm", images[0])])
        for i, data in enumerate(images):
            for label, pipe in pipes.items():
                c0, w0 = time.process_time(), time.perf_counter()
                pipe.run([ImageJob(f"i{i}", data)])
                wall[label].append((time.perf_counter() - w0) * 1000)
                cpu[label].append((time.process_time() - c0) * 1000)
    finally:
        for pipe in pipes.values():
            pipe.close()
    return {
        k: {"p50_ms": float(np.median(wall[k])), "cpu_ms": float(np.mean(cpu[k]))} for k in pipes
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--solo", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--ref", action="store_true", help="the YOLOv8n-sized graph too")
    args = parser.parse_args(argv)
    photos = [s.data for s in dev_photos(args.images)][: args.count]
    runs: list[tuple[str, Path | None, bool]] = [("shipped model", None, True)]
    if args.ref:
        from bench.serving import MODEL_CACHE, reference_model

        runs.append(("YOLOv8n-sized graph", reference_model(MODEL_CACHE), False))
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| model | config | p50 wall ms (c = 1, in-process) | CPU-ms per image |")
    print("|---|---|---|---|")
    for name, model, read in runs:
        for label, r in measure(model, photos, args.solo, read=read).items():
            print(f"| {name} | {label} | {r['p50_ms']:.1f} | {r['cpu_ms']:.1f} |", flush=True)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
