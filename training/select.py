"""Pick the shipped inference size on *synthetic* data, then export the checkpoint.

    python -m training.select runs/train-seed0/best.pt --out models/ [--sizes 320 416 512 640]

Builds a validation set at a 640 canvas (codes from ~1.5 px/module up to most of the
frame, the generator's full range; a stream the training never sees), runs the EMA
weights of the checkpoint at each candidate size (images resized like the detector's
letterbox) at every threshold of a grid, and exports with the size and threshold that
score best (image recall - FP-image rate + 0.1 precision; ties to the smaller size):
the size goes into the ONNX ``imgsz`` metadata and the threshold is moved to the core
detector's default 0.25 by a bias on the logits. No real photo is used.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from training.evaluate import best_operating_point, predict_val
from training.export import MODEL_NAME, MODEL_VERSION, export_onnx
from training.model import ModelConfig, QRDet
from training.synth import make_sample

logger = logging.getLogger(__name__)

SELECT_SEED = 2_000_029


def load_ema(path: Path) -> QRDet:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    model = QRDet(ModelConfig(**{**ck["cfg"], "depth": tuple(ck["cfg"]["depth"])}))
    model.load_state_dict(ck["ema"])
    return model.eval()


def resized(val: list[tuple[np.ndarray, np.ndarray]], size: int) -> list:
    out = []
    for img, boxes in val:
        s = size / img.shape[0]
        small = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
        out.append((small, boxes * s))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, default=Path("models"))
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 416, 512, 640])
    p.add_argument("--n", type=int, default=160)
    p.add_argument("--canvas", type=int, default=640)
    p.add_argument("--version", default=MODEL_VERSION)
    p.add_argument("--no-export", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    torch.set_num_threads(2)
    model = load_ema(args.checkpoint)
    val = [make_sample(SELECT_SEED, i, args.canvas) for i in range(args.n)]
    base = [(s.image, s.boxes) for s in val]
    best = (-np.inf, args.sizes[0], 0.0)
    for size in args.sizes:
        val_s = resized(base, size)
        score, bias, m = best_operating_point(predict_val(model, val_s), val_s)
        logger.info(
            "size=%d score=%.4f bias=%.3f %s",
            size,
            score,
            bias,
            " ".join(f"{k}={v:.4f}" for k, v in m.items()),
        )
        if score > best[0] + 1e-9:
            best = (score, size, bias)
    score, size, bias = best
    logger.info("selected imgsz=%d score_bias=%.4f score=%.4f", size, bias, score)
    if not args.no_export:
        export_onnx(model, args.out / MODEL_NAME, size, version=args.version, score_bias=bias)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
