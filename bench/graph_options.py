"""The detector's inference alone, per graph and ONNX Runtime option: CPU and wall ms per image.

    python -m bench.graph_options [MODEL ...] [--rounds 60] [--batches 1,8]

For each model (default: the shipped FP32 detector and, if present, its INT8 version from
``python -m training.quantize``), each batch size, intra-op threads 1 and 2, and graph
optimisation ``ORT_ENABLE_ALL`` (the detector's: with the NCHWc layout transform) and
``ORT_ENABLE_EXTENDED`` (without it), one session each, run on the same random
input at the model's input size, interleaved round by round so the machine's load falls
on all alike. Prints the median per image of each; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from core.runtime.settings import DEFAULT_MODEL
from core.vision.detector import Detector

LEVELS = {
    "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}


def session(model: Path, threads: int, level: str) -> ort.InferenceSession:
    """A session as :class:`core.vision.detector.Detector` opens one, at ``level``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = LEVELS[level]
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def measure(models: Sequence[Path], batches: Sequence[int], rounds: int) -> list[str]:
    rows = [
        "| model | batch | ORT threads | graph level | CPU-ms per image | wall ms per image |",
        "|---|---|---|---|---|---|",
    ]
    hw = Detector(models[0], ["CPUExecutionProvider"], intra_threads=1).input_hw
    for batch in batches:
        x = np.random.default_rng(0).random((batch, 3, *hw), np.float32)
        sessions = {
            (m.name, threads, level): session(m, threads, level)
            for m in models
            for threads in (1, 2)
            for level in LEVELS
        }
        cpu: dict[tuple[str, int, str], list[float]] = {k: [] for k in sessions}
        wall: dict[tuple[str, int, str], list[float]] = {k: [] for k in sessions}
        for s in sessions.values():
            s.run(None, {"images": x})
        for _ in range(max(3, rounds // batch)):
            for key, s in sessions.items():
                c0, w0 = time.process_time(), time.perf_counter()
                s.run(None, {"images": x})
                wall[key].append((time.perf_counter() - w0) * 1000 / batch)
                cpu[key].append((time.process_time() - c0) * 1000 / batch)
        for key in sessions:
            name, threads, level = key
            rows.append(
                f"| {name} | {batch} | {threads} | {level} | {np.median(cpu[key]):.2f} | "
                f"{np.median(wall[key]):.2f} |"
            )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args(argv)
    models = list(args.models)
    if not models:
        int8 = DEFAULT_MODEL.with_name(f"{DEFAULT_MODEL.stem}-int8.onnx")
        models = [DEFAULT_MODEL, *([int8] if int8.is_file() else [])]
    batches = [int(b) for b in args.batches.split(",")]
    print("\n".join(measure(models, batches, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
