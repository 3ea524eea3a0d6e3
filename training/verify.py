"""Train the crop verifier (``core/vision/verifier.py``) and its calibration on synthetic
data; export.

    python -m training.verify --detector models/qrsight-qr-v3.onnx --out models/ [--smoke]

1. **Crops.** (a) The mix (seed 5,000,011, one sample per index, native canvases of
   224-640 px, the main and fine-tune mixes alternating): the shipped detector runs on
   each image at conf 0.05; its boxes that overlap a code (IoU ≥ 0.5) are positives,
   those that overlap none (IoU < 0.25) negatives; every code's own box (jittered ±12 %)
   is a positive and every placed hard negative (Data Matrix, Aztec, barcodes, grids,
   dots...; jittered) a negative. (b) The families of ``training.families`` (seed
   5,200,003, long side 416-1024 px; :data:`FAMILY_RECIPE`): texture close-ups (carpet,
   gravel, sand, foliage, fabric, asphalt, 1/f noise — the detector's boxes on them, a
   box over most of the frame and one over a part of it, all negatives), other
   symbologies filling the frame (PDF417, Aztec, Data Matrix, MaxiCode, 1-D; the
   detector's boxes and the label's box, negatives) and hard QR codes (blur, small,
   glare, perspective, curved, close-up, dense, on a texture...; labelled like the mix).
2. **Model**: seven 3x3 conv-BN-ReLU layers (stride 2 four times, 96 → 6 px) and a
   two-layer head on the flattened 6 x 6 map (the position of the finder patterns
   matters), each crop standardised (mean, std) inside the graph. AdamW, one-cycle lr
   2e-3, random 90° rotations and mirror images.
3. **Calibration** on separate streams (the mix at seed 5,000,012 and the families at
   seed 5,300,007): the boxes the pipeline checks — the detector at its default
   threshold, payloads read the pipeline's way (``core.vision.payload``: the standard reads,
   then ``HARD_ATTEMPTS``) — that stay unread; a logistic regression of "on a code"
   (IoU ≥ 0.5) on (logit detector score, logit verifier score) gives ``P(code)``; the
   threshold on it with the best image recall - FP-image rate + 0.1 precision (the
   detector's rule) goes into the metadata with the three coefficients. No real photo is
   used.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
import zlib
from collections.abc import Iterator
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
import onnx
import torch
from torch import nn

from core.vision.detector import Detector
from core.vision.payload import HARD_ATTEMPTS, read_harder, read_payloads
from core.vision.postprocess import box_iou
from core.vision.verifier import (
    DEFAULT_MARGIN,
    Verifier,
    calibrated,
    crop_patches,
    file_sha256,
    logit,
)
from training.evaluate import image_metrics, operating_score
from training.export import save_with_metadata, torch_export
from training.families import POSITIVE, SYMBOLS, TEXTURES, scene
from training.synth import BASE, FINETUNE, make_sample

logger = logging.getLogger(__name__)

VERIFY_SEED = 5_000_011
FAMILY_SEED = 5_200_003
SELECT_SEED = 5_000_012
SELECT_FAMILY_SEED = 5_300_007
FAMILY_SIZES = (416, 1024)  # long side of the family images used here
VERSION = "2"
MODEL_NAME = f"qrsight-qrverify-v{VERSION}.onnx"
SIZE = 96
MINE_CONF = 0.05  # detector boxes at least this confident become training crops
GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95
# images per family for the training crops (and a tenth of that for the calibration)
FAMILY_RECIPE: tuple[tuple[str, int], ...] = (
    *((f, 250) for f in TEXTURES),
    *((f, 200) for f in SYMBOLS),
    *((f, 80) for f in POSITIVE),
)

Crops = tuple[np.ndarray, np.ndarray]  # (N, SIZE, SIZE) uint8, (N,) labels 0/1
Job = tuple[str, int, int, int]  # source ("mix" or a family), seed, index, crop size

_worker: dict[str, Detector] = {}  # the detector of this (pool) process


def _open_detector(path: str, threads: int) -> None:
    _worker["detector"] = Detector(path, ["CPUExecutionProvider"], intra_threads=threads)


def _jitter(rng: np.random.Generator, box: np.ndarray, amount: float = 0.12) -> np.ndarray:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    s = rng.uniform(1 - amount, 1 + amount)
    cx = (x1 + x2) / 2 + rng.uniform(-amount, amount) * w / 2
    cy = (y1 + y2) / 2 + rng.uniform(-amount, amount) * h / 2
    return np.array([cx - s * w / 2, cy - s * h / 2, cx + s * w / 2, cy + s * h / 2], np.float32)


def verify_sample(seed: int, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample ``i`` of ``seed`` as a BGR image of a native size of 224-640 px, its QR
    boxes and its hard-negative regions."""
    rng = np.random.default_rng([seed, i, 7])
    native = int(rng.integers(224 // 32, 640 // 32 + 1)) * 32
    s = make_sample(seed, i, native, FINETUNE if i % 2 else BASE)
    return np.ascontiguousarray(s.image[..., ::-1]), s.boxes, s.hard


def source_image(source: str, seed: int, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image ``i`` of ``source`` ("mix" or a family) as BGR, its QR boxes, its hard regions."""
    if source == "mix":
        return verify_sample(seed, i)
    s = scene(seed, i, source, FAMILY_SIZES)
    return np.ascontiguousarray(s.image[..., ::-1]), s.boxes, s.hard


def _square(rng: np.random.Generator, h: int, w: int, lo: float, hi: float) -> np.ndarray:
    side = rng.uniform(lo, hi) * min(h, w)
    x, y = rng.uniform(0, max(w - side, 0)), rng.uniform(0, max(h - side, 0))
    return np.array([x, y, x + side, y + side], np.float32)


def labelled_crops(
    detector: Detector,
    *,
    bgr: np.ndarray,
    gt: np.ndarray,
    hard: np.ndarray,
    rng: np.random.Generator,
    size: int,
) -> Crops:
    """The detector's boxes labelled by IoU, the codes' boxes (positives) and the hard
    regions (negatives), jittered; a full-frame hard region (a lattice or a texture)
    gives a box over part of it and one over most of it."""
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    h, w = gray.shape
    d = detector.predict([bgr], conf=MINE_CONF)[0]
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    if len(d):
        best = box_iou(d.xyxy, gt).max(1) if len(gt) else np.zeros(len(d))
        for box, iou in zip(d.xyxy, best, strict=True):
            if iou >= 0.5 or iou < 0.25:
                boxes.append(box)
                labels.append(int(iou >= 0.5))
    for box in gt:
        boxes.append(_jitter(rng, box))
        labels.append(1)
    for region in hard:
        regions = [region]
        if (region[2] - region[0]) * (region[3] - region[1]) > 0.6 * h * w:  # the frame
            regions = [_square(rng, h, w, 0.15, 0.5)]
            if not len(gt):  # a texture close-up: also most of the frame
                regions.append(_square(rng, h, w, 0.7, 1.0))
        for box in regions:
            if len(gt) and box_iou(box[None], gt).max() > 0.1:
                continue
            boxes.append(_jitter(rng, box))
            labels.append(0)
    if not boxes:
        return np.zeros((0, size, size), np.uint8), np.zeros(0, np.int64)
    return crop_patches(gray, np.array(boxes), size, DEFAULT_MARGIN), np.array(labels, np.int64)


def _crops_of(job: Job) -> Crops:
    source, seed, i, size = job
    bgr, gt, hard = source_image(source, seed, i)
    # the mix keeps v1's stream of jitters; each family draws its own
    key = [seed, i, 11] if source == "mix" else [seed, i, 11, zlib.crc32(source.encode())]
    rng = np.random.default_rng(key)
    return labelled_crops(_worker["detector"], bgr=bgr, gt=gt, hard=hard, rng=rng, size=size)


def training_jobs(samples: int, family_scale: float, size: int) -> list[Job]:
    """The mix's ``samples`` images, then ``family_scale`` x :data:`FAMILY_RECIPE`."""
    jobs: list[Job] = [("mix", VERIFY_SEED, i, size) for i in range(samples)]
    for family, n in FAMILY_RECIPE:
        jobs += [(family, FAMILY_SEED, i, size) for i in range(round(n * family_scale))]
    return jobs


def gather(detector: Path, jobs: list[Job], workers: int) -> Crops:
    """The labelled crops of ``jobs`` (``workers`` processes; 0 = this one)."""
    start = time.time()
    parts: list[Crops] = []
    n = len(jobs)

    def progress(it: Iterator[Crops]) -> None:
        for k, part in enumerate(it, 1):
            parts.append(part)
            if k % 500 == 0 or k == n:
                logger.info("crops images=%d/%d s=%.0f", k, n, time.time() - start)

    if workers:
        with Pool(workers, initializer=_open_detector, initargs=(str(detector), 1)) as pool:
            progress(pool.imap(_crops_of, jobs, chunksize=8))
    else:
        _open_detector(str(detector), 2)
        progress(map(_crops_of, jobs))
    x = np.concatenate([p for p, _ in parts])
    y = np.concatenate([q for _, q in parts])
    logger.info("crops n=%d positives=%d s=%.0f", len(y), int(y.sum()), time.time() - start)
    return x, y


class VerifierNet(nn.Module):
    """Crop classifier: ``[B, 1, S, S]`` grey 0..255 → logit ``[B]``."""

    def __init__(self, size: int = SIZE, width: int = 16) -> None:
        super().__init__()
        self.size, w = size, width

        def cbr(i: int, o: int, s: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        layers = [(1, w, 2), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 4 * w, 2)]
        layers += [(4 * w, 4 * w, 1), (4 * w, 6 * w, 2), (6 * w, 6 * w, 1)]
        self.features = nn.Sequential(*[m for spec in layers for m in cbr(*spec)])
        cells = (size // 16) ** 2
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(6 * w * cells, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean((2, 3), keepdim=True)
        std = x.std((2, 3), keepdim=True)
        return self.head(self.features((x - mean) / (std + 8.0)))[:, 0]


def train(x: np.ndarray, y: np.ndarray, *, epochs: int, width: int, seed: int) -> VerifierNet:
    torch.manual_seed(seed)
    size = x.shape[-1]
    model = VerifierNet(size, width)
    xs = torch.from_numpy(x)[:, None]
    ys = torch.from_numpy(y).float()
    bs = min(128, len(xs))
    per_epoch = max(len(xs) // bs, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * per_epoch)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xs), generator=gen)
        total = 0.0
        for s in range(per_epoch):
            idx = perm[s * bs : (s + 1) * bs]
            batch = xs[idx].float()
            k = int(torch.randint(0, 4, (), generator=gen))
            batch = torch.rot90(batch, k, (2, 3))
            if torch.rand((), generator=gen) < 0.5:
                batch = torch.flip(batch, (3,))
            loss = nn.functional.binary_cross_entropy_with_logits(model(batch), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        logger.info(
            "verifier epoch=%d/%d loss=%.4f s=%.0f",
            epoch + 1,
            epochs,
            total / per_epoch,
            time.time() - start,
        )
    return model.eval()


@torch.no_grad()
def predict(model: VerifierNet, crops: np.ndarray) -> np.ndarray:
    out = [
        torch.sigmoid(model(torch.from_numpy(crops[s : s + 512])[:, None].float())).numpy()
        for s in range(0, len(crops), 512)
    ]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


Checked = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _checked_boxes(job: Job) -> Checked:
    """What the pipeline checks in one image: its code boxes, the detector's boxes at the
    default threshold, their scores, whether each was read (standard reads, then
    ``HARD_ATTEMPTS``) and the crops of all of them."""
    source, seed, i, size = job
    bgr, gt, _ = source_image(source, seed, i)
    d = read_payloads(bgr, _worker["detector"].predict([bgr])[0])
    assert d.text is not None
    d = read_harder(bgr, d, [k for k, t in enumerate(d.text) if t is None], HARD_ATTEMPTS)
    assert d.text is not None
    read = np.array([t is not None for t in d.text], bool)
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    crops = crop_patches(gray, d.xyxy, size, DEFAULT_MARGIN)
    return gt, d.xyxy, d.confidence, read, crops


def calibration_jobs(samples: int, family_scale: float, size: int) -> list[Job]:
    jobs: list[Job] = [("mix", SELECT_SEED, i, size) for i in range(samples)]
    for family, n in FAMILY_RECIPE:
        jobs += [(family, SELECT_FAMILY_SEED, i, size) for i in range(round(n * family_scale))]
    return jobs


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, steps: int = 50) -> np.ndarray:
    """Weights ``w`` (last = bias) of P(y=1) = sigmoid([x, 1] @ w), by Newton's method."""
    xb = np.concatenate([x, np.ones((len(x), 1))], 1)
    w = np.zeros(xb.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(xb @ w)))
        grad = xb.T @ (p - y) + l2 * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + l2 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return w


def calibrate(
    model: VerifierNet, detector: Path, jobs: list[Job], workers: int
) -> tuple[tuple[float, float, float], float, dict[str, float], dict[str, float]]:
    """(calibration a, b, c; threshold on P(code); metrics with it; metrics of the
    detector alone) on the boxes the pipeline checks in ``jobs`` (see the module doc)."""
    if workers:
        with Pool(workers, initializer=_open_detector, initargs=(str(detector), 1)) as pool:
            checked = list(pool.imap(_checked_boxes, jobs, chunksize=8))
    else:
        _open_detector(str(detector), 2)
        checked = [_checked_boxes(j) for j in jobs]
    feats, labels = [], []
    for gt, boxes, conf, read, crops in checked:
        if not len(boxes) or read.all():
            continue
        on_code = box_iou(boxes, gt).max(1) >= 0.5 if len(gt) else np.zeros(len(boxes), bool)
        v = predict(model, crops[~read])
        feats.append(np.stack([logit(conf[~read]), logit(v)], 1))
        labels.append(on_code[~read])
    if not feats:  # nothing left unread (a smoke run): the plain product of the odds
        logger.warning("calibration: no unread box in %d images; using [1, 1, 0]", len(jobs))
        feats, labels = [np.zeros((0, 2))], [np.zeros(0, bool)]
    x, y = np.concatenate(feats), np.concatenate(labels).astype(np.float64)
    a, b, c = (float(v) for v in fit_logistic(x, y)) if len(y) else (1.0, 1.0, 0.0)
    logger.info(
        "calibration unread=%d on_code=%d a=%.4f b=%.4f c=%.4f", len(y), int(y.sum()), a, b, c
    )
    preds, gts = [], []
    for gt, boxes, conf, read, crops in checked:
        p = np.ones(len(boxes))
        if (~read).any():
            v = predict(model, crops[~read])
            p[~read] = calibrated((a, b, c), conf[~read], v)
        preds.append((boxes, p))
        gts.append(gt)
    alone = image_metrics([(bx, np.ones(len(bx))) for bx, _ in preds], gts, 0.5)
    best = max(GRID, key=lambda t: operating_score(image_metrics(preds, gts, t)) - 1e-9 * t)
    return (a, b, c), best, image_metrics(preds, gts, best), alone


class _Export(nn.Module):
    def __init__(self, net: VerifierNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(crops))


def export(
    model: VerifierNet,
    path: Path,
    threshold: float,
    detector: Path,
    *,
    calibration: tuple[float, float, float] | None = None,
    version: str = VERSION,
) -> Path:
    """Write ``path`` (metadata ``task=verify``, ``imgsz``, ``margin``, ``threshold``,
    ``calibration`` and ``detector_sha256`` of the ``detector`` file it was trained for)
    and check that ONNX Runtime, through :class:`core.vision.verifier.Verifier`, matches torch."""
    size = model.size
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.rand(2, 1, size, size) * 255
    wrapper = _Export(model).eval()
    torch_export(
        wrapper,
        dummy,
        path,
        inputs=["crops"],
        outputs=["score"],
        dynamic_axes={"crops": {0: "batch"}, "score": {0: "batch"}},
    )
    meta = {
        "description": "qrsight QR crop verifier (synthetic data)",
        "author": "qrsight",
        "version": version,  # no date: the same recipe gives the same bytes on any day
        "task": "verify",
        "imgsz": f"[{size}, {size}]",
        "margin": f"{DEFAULT_MARGIN}",
        "threshold": f"{threshold:.2f}",
        "detector": detector.name,
        "detector_sha256": file_sha256(detector),
    }
    if calibration is not None:
        meta["calibration"] = "[" + ", ".join(f"{v:.6f}" for v in calibration) + "]"
    save_with_metadata(onnx.load(str(path)), path, meta)
    loaded = Verifier(path, intra_threads=2)
    x = dummy.numpy().astype(np.float32)
    got = loaded.session.run(None, {loaded.input_name: x})[0]
    with torch.no_grad():
        want = wrapper(dummy).numpy()
    if not np.allclose(got, want, atol=1e-4):
        raise RuntimeError(f"{path}: ONNX Runtime and torch differ ({np.abs(got - want).max()})")
    logger.info("exported path=%s bytes=%d threshold=%.2f", path, path.stat().st_size, threshold)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--detector", type=Path, required=True, help="the exported detector")
    p.add_argument("--out", type=Path, default=Path("models"), help="where the .onnx goes")
    p.add_argument("--samples", type=int, default=5000, help="mix images for crops")
    p.add_argument("--families", type=float, default=1.0, help="x FAMILY_RECIPE for crops")
    p.add_argument("--select", type=int, default=300, help="mix images for the calibration")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="processes making crops (0 = none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few images, a tiny model (CI)")
    p.add_argument("--crops", type=Path, default=None, help="keep the crops in this .npz (reused)")
    args = p.parse_args(argv)
    family_scale, select_scale = args.families, args.families / 10
    if args.smoke:
        args.samples, args.select, args.epochs, args.width, args.workers = 6, 4, 1, 4, 0
        family_scale, select_scale = 0.005, 0.005  # one image of each family
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    start = time.time()
    jobs = training_jobs(args.samples, family_scale, SIZE)
    if args.crops is not None and args.crops.is_file():
        with np.load(args.crops) as kept:
            x, y = kept["x"], kept["y"]
        logger.info("crops from %s n=%d", args.crops, len(y))
    else:
        x, y = gather(args.detector, jobs, args.workers)
        if args.crops is not None:
            args.crops.parent.mkdir(parents=True, exist_ok=True)
            np.savez(args.crops, x=x, y=y)
    model = train(x, y, epochs=args.epochs, width=args.width, seed=args.seed)
    params = sum(p.numel() for p in model.parameters())
    select = calibration_jobs(args.select, select_scale, SIZE)
    calibration, threshold, with_v, alone = calibrate(model, args.detector, select, args.workers)
    fmt = lambda m: " ".join(f"{k}={v:.4f}" for k, v in m.items())  # noqa: E731
    logger.info("selection detector alone %s score=%.4f", fmt(alone), operating_score(alone))
    logger.info(
        "selection calibrated threshold=%.2f %s score=%.4f",
        threshold,
        fmt(with_v),
        operating_score(with_v),
    )
    export(model, args.out / MODEL_NAME, threshold, args.detector, calibration=calibration)
    used = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in used)
    # on a shared machine the wall time grows with the others' load; the CPU time does not
    logger.info(
        "verifier params=%d minutes=%.1f cpu_minutes=%.1f",
        params,
        (time.time() - start) / 60,
        cpu / 60,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
