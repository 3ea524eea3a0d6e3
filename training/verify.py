"""Train the crop verifier (``core/verifier.py``) on synthetic crops, choose its threshold, export.

    python -m training.verify --detector models/qrsight-qr-v3.onnx --out models/ [--smoke]

1. **Crops** (seed 5,000,011, one sample per index, native canvases of 224-640 px, the
   main and fine-tune mixes alternating): the shipped detector runs on each image at
   conf 0.05; its boxes that overlap a code (IoU ≥ 0.5) are positives, those that overlap
   none (IoU < 0.25) negatives; every code's own box (jittered ±12 %) is a positive and
   every placed hard negative (Data Matrix, Aztec, barcodes, grids, dots...; jittered) a
   negative, so the verifier also learns the cases the detector happens to get right.
2. **Model**: seven 3x3 conv-BN-ReLU layers (stride 2 four times, 80 → 5 px) and a
   two-layer head on the flattened 5 x 5 map (the position of the finder patterns
   matters), 362 k parameters; each crop is standardised (mean, std) inside the graph.
   AdamW, one-cycle lr 2e-3, 6 epochs of random 90° rotations and mirror images.
3. **Threshold** on a separate stream (seed 5,000,012, 300 images): the detector at its
   default threshold, then the verifier at each threshold of a grid; the one with the
   best image recall - FP-image rate + 0.1 precision (the detector's rule) goes into the
   metadata. No real photo is used.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
import onnx
import torch
from torch import nn

from core.detector import Detector
from core.postprocess import box_iou
from core.verifier import DEFAULT_MARGIN, Verifier, crop_patches, file_sha256
from training.evaluate import image_metrics, operating_score
from training.export import save_with_metadata, torch_export
from training.synth import BASE, FINETUNE, make_sample

logger = logging.getLogger(__name__)

VERIFY_SEED = 5_000_011
SELECT_SEED = 5_000_012
VERSION = "1"
MODEL_NAME = f"qrsight-qrverify-v{VERSION}.onnx"
SIZE = 80
MINE_CONF = 0.05  # detector boxes at least this confident become training crops
GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95

Crops = tuple[np.ndarray, np.ndarray]  # (N, SIZE, SIZE) uint8, (N,) labels 0/1

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


def sample_crops(seed: int, i: int, size: int = SIZE) -> Crops:
    """The labelled crops of sample ``i`` (see the module docstring)."""
    detector = _worker["detector"]
    bgr, gt, hard = verify_sample(seed, i)
    rng = np.random.default_rng([seed, i, 11])
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
        box = region
        if (box[2] - box[0]) * (box[3] - box[1]) > 0.6 * h * w:  # a full-frame lattice
            side = rng.uniform(0.15, 0.5) * min(h, w)
            x, y = rng.uniform(0, w - side), rng.uniform(0, h - side)
            box = np.array([x, y, x + side, y + side], np.float32)
        if len(gt) and box_iou(box[None], gt).max() > 0.1:
            continue
        boxes.append(_jitter(rng, box))
        labels.append(0)
    if not boxes:
        return np.zeros((0, size, size), np.uint8), np.zeros(0, np.int64)
    return crop_patches(gray, np.array(boxes), size, DEFAULT_MARGIN), np.array(labels, np.int64)


def _crops_of(args: tuple[int, int, int]) -> Crops:
    seed, i, size = args
    return sample_crops(seed, i, size)


def gather(detector: Path, seed: int, n: int, size: int, workers: int) -> Crops:
    """Crops of samples ``0..n-1`` of ``seed`` (``workers`` processes; 0 = this one)."""
    start = time.time()
    jobs = [(seed, i, size) for i in range(n)]
    parts: list[Crops] = []

    def progress(it: Iterator[Crops]) -> None:
        for k, part in enumerate(it, 1):
            parts.append(part)
            if k % 500 == 0 or k == n:
                logger.info("crops samples=%d/%d s=%.0f", k, n, time.time() - start)

    if workers:
        with Pool(workers, initializer=_open_detector, initargs=(str(detector), 1)) as pool:
            progress(pool.imap(_crops_of, jobs, chunksize=16))
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


def choose_threshold(
    detector: Detector, model: VerifierNet, seed: int, n: int
) -> tuple[float, dict[str, float], dict[str, float]]:
    """(threshold, metrics with it, metrics of the detector alone) on ``n`` fresh images."""
    preds, gts = [], []
    for i in range(n):
        bgr, gt, _ = verify_sample(seed, i)
        d = detector.predict([bgr])[0]
        gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        crops = crop_patches(gray, d.xyxy, model.size, DEFAULT_MARGIN)
        preds.append((d.xyxy, predict(model, crops) if len(d) else np.zeros(0, np.float32)))
        gts.append(gt)
    alone = image_metrics([(b, np.ones(len(b))) for b, _ in preds], gts, 0.5)
    best = max(GRID, key=lambda t: operating_score(image_metrics(preds, gts, t)) - 1e-9 * t)
    return best, image_metrics(preds, gts, best), alone


class _Export(nn.Module):
    def __init__(self, net: VerifierNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(crops))


def export(
    model: VerifierNet, path: Path, threshold: float, detector: Path, version: str = VERSION
) -> Path:
    """Write ``path`` (metadata ``task=verify``, ``imgsz``, ``margin``, ``threshold``,
    ``detector_sha256`` of the ``detector`` file it was trained for) and check that ONNX
    Runtime, through :class:`core.verifier.Verifier`, matches torch."""
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
        "date": time.strftime("%Y-%m-%d"),
        "version": version,
        "task": "verify",
        "imgsz": f"[{size}, {size}]",
        "margin": f"{DEFAULT_MARGIN}",
        "threshold": f"{threshold:.2f}",
        "detector": detector.name,
        "detector_sha256": file_sha256(detector),
    }
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
    p.add_argument("--samples", type=int, default=5000, help="synthetic images for crops")
    p.add_argument("--select", type=int, default=300, help="images for the threshold")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="processes making crops (0 = none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few images, a tiny model (CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.samples, args.select, args.epochs, args.width, args.workers = 6, 4, 1, 4, 0
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    start = time.time()
    x, y = gather(args.detector, VERIFY_SEED, args.samples, SIZE, args.workers)
    model = train(x, y, epochs=args.epochs, width=args.width, seed=args.seed)
    params = sum(p.numel() for p in model.parameters())
    detector = Detector(args.detector, ["CPUExecutionProvider"], intra_threads=args.threads)
    threshold, with_v, alone = choose_threshold(detector, model, SELECT_SEED, args.select)
    fmt = lambda m: " ".join(f"{k}={v:.4f}" for k, v in m.items())  # noqa: E731
    logger.info("selection detector alone %s score=%.4f", fmt(alone), operating_score(alone))
    logger.info(
        "selection with verifier threshold=%.2f %s score=%.4f",
        threshold,
        fmt(with_v),
        operating_score(with_v),
    )
    export(model, args.out / MODEL_NAME, threshold, args.detector)
    logger.info("verifier params=%d minutes=%.1f", params, (time.time() - start) / 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
