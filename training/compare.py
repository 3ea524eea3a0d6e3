"""Compare checkpoints on a synthetic test stream no training or selection step uses.

    python -m training.compare runs/v2/best.pt runs/v3/best.pt [--imgsz 416] [--n 400]

Images come from the main recipe (seed 3,000,017) at a *native* canvas of 160-960 px
that is then letterboxed to ``--imgsz``, as the detector sees photos and screenshots of
any size (down- and up-scaled). Each checkpoint is scored at its own best threshold of
the grid (image recall - FP-image rate + 0.1 precision, as in training). The decision
rule for replacing the shipped model: the candidate must score higher here.

``--families N`` also shows, per hard-negative family, the share of N code-free images
(two symbols of that family each, seed 4,000,037) with a detection at ``--conf`` (the
threshold before the exported ``score_bias``; 0.45 for the shipped model).

``--verifier V.onnx`` scores the exported detector (``--detector``, through
``core.vision.detector``) on the same images without and with the crop verifier's judgement
(its calibrated probability, or a version 1 verifier's score) at its own threshold (no
payload is read here, so every box is judged), at the detector's default threshold and
at the best one of the grid (and, with ``--families``, the family rates at the default
threshold).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from core.runtime.settings import DEFAULT_MODEL
from core.vision.detector import Detector
from core.vision.verifier import Verifier
from training.evaluate import (
    CONF_GRID,
    best_operating_point,
    image_metrics,
    operating_score,
    predict_val,
    score_predictions,
)
from training.select import load_ema
from training.synth import NEG_FAMILIES, family_sample, make_sample

logger = logging.getLogger(__name__)

COMPARE_SEED = 3_000_017
FAMILY_SEED = 4_000_037


def native_sample(i: int, imgsz: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``i`` at a native size drawn from 160-960 px, letterboxed to ``imgsz``."""
    rng = np.random.default_rng([COMPARE_SEED, i, 1])
    native = int(rng.integers(5, 31)) * 32
    s = make_sample(COMPARE_SEED, i, native)
    scale = imgsz / native
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    img = cv2.resize(s.image, (imgsz, imgsz), interpolation=interp)
    return img, s.boxes * scale


def compare_verifier(
    detector: Detector, verifier: Verifier, test: list, families: dict[str, list]
) -> None:
    """Log the detector alone and with ``verifier`` on ``test`` (see the module doc)."""

    def run(images: list) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        out = []
        for img, _ in images:
            bgr = np.ascontiguousarray(img[..., ::-1])
            d = detector.predict([bgr], conf=0.05)[0]
            out.append((d.xyxy, d.confidence, verifier.judge(bgr, d, 0)))  # none read
        return out

    def at(preds: list, conf: float, vt: float, gts: list) -> dict[str, float]:
        kept = [(b[c >= conf], v[c >= conf]) for b, c, v in preds]
        return image_metrics(kept, gts, vt)

    gts = [b for _, b in test]
    preds = run(test)
    default = detector.default_thresholds[0]
    for name, vt in (("detector alone", 0.0), ("with verifier", verifier.threshold)):
        for label, conf in (
            ("default", default),
            ("best", max(CONF_GRID, key=lambda c: operating_score(at(preds, c, vt, gts)))),
        ):
            m = at(preds, conf, vt, gts)
            logger.info(
                "%s conf=%s(%.2f) score=%.4f %s",
                name,
                label,
                conf,
                operating_score(m),
                " ".join(f"{k}={v:.4f}" for k, v in m.items()),
            )
    for family, images in families.items():
        fp = run(images)
        none = [b for _, b in images]
        rates = [at(fp, default, vt, none)["fp_images"] for vt in (0.0, verifier.threshold)]
        logger.info("family=%s fp_images alone=%.2f verified=%.2f", family, *rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", type=Path, nargs="*")
    p.add_argument("--detector", type=Path, default=DEFAULT_MODEL, help="for --verifier")
    p.add_argument("--verifier", type=Path, default=None, help="an exported crop verifier")
    p.add_argument("--imgsz", type=int, default=416)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--families", type=int, default=0, help="images per negative family")
    p.add_argument("--conf", type=float, default=0.45, help="threshold for --families")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    torch.set_num_threads(2)
    test = [native_sample(i, args.imgsz) for i in range(args.n)]
    positives = sum(len(b) > 0 for _, b in test)
    logger.info("test n=%d positives=%d imgsz=%d", len(test), positives, args.imgsz)
    none = np.zeros((0, 4), np.float32)
    families = {
        f: [(family_sample(FAMILY_SEED, i, args.imgsz, f), none) for i in range(args.families)]
        for f in (NEG_FAMILIES if args.families else ())
    }
    if args.verifier is not None:
        detector = Detector(args.detector, ["CPUExecutionProvider"], intra_threads=2)
        compare_verifier(detector, Verifier(args.verifier, intra_threads=2), test, families)
    for path in args.checkpoints:
        model = load_ema(path)
        score, _, m = best_operating_point(predict_val(model, test), test)
        logger.info(
            "checkpoint=%s score=%.4f %s",
            path,
            score,
            " ".join(f"{k}={v:.4f}" for k, v in m.items()),
        )
        for family, images in families.items():
            fp = score_predictions(predict_val(model, images), images, args.conf)["fp_images"]
            logger.info("checkpoint=%s family=%s fp_images=%.2f", path, family, fp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
