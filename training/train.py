"""Train qrsight's QR detector on synthetic data and export it to ONNX.

``python -m training.train --out models/`` reproduces the shipped model (seeded);
``--smoke`` runs a few steps of a tiny model, exports it and loads it in ONNX Runtime.
Two phases: ``--steps`` of the main recipe at ``--imgsz``, then ``--finetune-steps`` of the
fine-tune mix (more close-ups, dense codes, lattice backgrounds, low-resolution sources)
alternating between ``--finetune-sizes``, so codes larger than the training canvas are seen
at the sizes the detector runs at. Checkpoints, the log and intermediate exports go to
``--run-dir`` (default ``runs/train-seed<seed>``); the best checkpoint of the current phase
by its *synthetic* validation set is exported to ``<out>/qrsight-qr-v<version>.onnx`` every
time it improves, so a run can be stopped at any time. At the end ``training.select``
picks the inference size and threshold, and ``training.verify`` trains the crop verifier
on the exported detector's boxes (``<out>/qrsight-qrverify-v2.onnx``; ``--no-verifier``
skips it).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from training.evaluate import best_operating_point, predict_val
from training.export import MODEL_NAME, MODEL_VERSION, export_onnx
from training.loss import detection_loss
from training.model import ModelConfig, QRDet, anchor_points, count_macs, n_params
from training.select import main as select_main
from training.synth import BASE, FINETUNE, Mix, make_sample
from training.verify import main as verify_main

logger = logging.getLogger(__name__)

WEIGHT_DECAY = 0.05
VAL_SEED_OFFSET = 1_000_003


class SynthDataset(Dataset):
    """Map-style view of the synthetic stream: item ``i`` is ``make_sample(seed, i, ...)``.

    Item ``i`` belongs to step ``i // batch``: the first ``steps`` steps use the main recipe
    at ``imgsz``; the fine-tune steps after them use :data:`FINETUNE` at
    ``ft_sizes[step % len(ft_sizes)]`` (one size per batch).
    """

    def __init__(
        self, seed: int, *, batch: int, steps: int, ft_steps: int, imgsz: int, ft_sizes: list[int]
    ) -> None:
        self.seed, self.batch, self.steps, self.imgsz = seed, batch, steps, imgsz
        self.ft_sizes, self.length = ft_sizes, (steps + ft_steps) * batch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        step = i // self.batch
        if step < self.steps:
            s = make_sample(self.seed, i, self.imgsz)
        else:
            s = make_sample(self.seed, i, self.ft_sizes[step % len(self.ft_sizes)], FINETUNE)
        return s.image, s.boxes, s.hard


def collate(batch: list) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Images ``[B, 3, H, W]`` uint8, QR boxes per image, hard-negative regions per image."""
    images = torch.from_numpy(np.stack([b[0] for b in batch])).permute(0, 3, 1, 2)
    return (
        images.contiguous(),
        [torch.from_numpy(b[1]) for b in batch],
        [torch.from_numpy(b[2]) for b in batch],
    )


class EMA:
    """Exponential moving average of the weights (and a copy of the buffers)."""

    def __init__(self, model: torch.nn.Module, decay: float, tau: float) -> None:
        self.model = copy.deepcopy(model).eval()
        self.decay, self.tau, self.updates = decay, tau, 0
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        msd = model.state_dict()
        for k, v in self.model.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            else:
                v.copy_(msd[k])


def lr_at(step: int, steps: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))


def _split(params: list[torch.nn.Parameter], wd: float) -> list[dict]:
    decay = [p for p in params if p.ndim == 4]
    no_decay = [p for p in params if p.ndim != 4]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    """Conv weights with weight decay, the rest without; the context blocks (added when the
    fine-tune grows the model) in two groups of their own, after the others — the order
    in which :func:`grow` adds them, so a grown run resumes with the same groups."""
    named = list(model.named_parameters())
    base = [p for name, p in named if not name.startswith("ctx")]
    ctx = [p for name, p in named if name.startswith("ctx")]
    return _split(base, wd) + (_split(ctx, wd) if ctx else [])


def grow(model: QRDet, ema: EMA, opt: torch.optim.Optimizer, seed: int) -> None:
    """Add the context blocks to the model, its EMA copy and the optimizer (fine-tune).

    Their initial weights come from ``seed`` alone, so a fresh run and one resumed at the
    phase switch grow the same blocks.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        new = model.grow()
    ema.model.grow()
    for name in ("ctx4", "ctx3"):
        getattr(ema.model, name).load_state_dict(getattr(model, name).state_dict())
    for p in ema.model.parameters():
        p.requires_grad_(False)
    for group in _split(new, WEIGHT_DECAY):
        opt.add_param_group(group)
    macs = count_macs(model, 640)
    logger.info("grew context blocks params=%d macs640=%.3fG", n_params(model), macs / 1e9)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("models"), help="where the .onnx goes")
    p.add_argument("--run-dir", type=Path, default=None, help="checkpoints and log")
    p.add_argument("--smoke", action="store_true", help="a few steps of a tiny model (CI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=7000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--imgsz", type=int, default=320, help="training image size")
    p.add_argument("--export-imgsz", type=int, default=640, help="imgsz in the ONNX metadata")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--finetune-steps", type=int, default=1200)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument(
        "--finetune-sizes", type=int, nargs="+", default=[320, 416], help="canvas sizes, /32"
    )
    p.add_argument(
        "--finetune-hard-weight",
        type=float,
        default=1.0,
        help="class-loss weight of false positives on hard negatives in the fine-tune phase "
        "(1 = the shipped recipe; see models/README.md for 2 and 4)",
    )
    p.add_argument(
        "--finetune-context",
        action="store_true",
        help="grow dilated context blocks on P4/P3 at the start of the fine-tune phase",
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--val-size", type=int, default=192)
    p.add_argument("--resume", type=Path, default=None, help="checkpoint to continue from")
    p.add_argument("--version", default=MODEL_VERSION)
    p.add_argument("--no-select", action="store_true", help="skip the imgsz selection")
    p.add_argument("--no-verifier", action="store_true", help="skip the crop verifier")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.imgsz, args.export_imgsz = 6, 4, 128, 128
        args.finetune_steps, args.finetune_sizes = 2, [128, 160]
        args.val_every, args.val_size, args.workers = 6, 8, 0
    if args.run_dir is None:
        args.run_dir = args.out if args.smoke else Path("runs") / f"train-seed{args.seed}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handlers: list[logging.Handler] = [
        logging.StreamHandler(sys.stdout),
        logging.FileHandler(args.run_dir / "log"),
    ]
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        return run(args)
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()
        root.setLevel(old_level)


def run(args: argparse.Namespace) -> int:
    """The training loop (``main`` sets up logging around it)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cv2.setNumThreads(1)
    cfg = ModelConfig.tiny() if args.smoke else ModelConfig()
    model = QRDet(cfg).to(memory_format=torch.channels_last)
    macs = count_macs(model, 640)
    logger.info(
        "model params=%d macs640=%.3fG flops640=%.3fG cfg=%s",
        n_params(model),
        macs / 1e9,
        2 * macs / 1e9,
        cfg,
    )
    ema = EMA(model, decay=0.998, tau=200)
    opt = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=args.lr, betas=(0.9, 0.99))
    start_step, best = 0, -math.inf
    history: list[dict] = []
    if args.resume:
        ck = torch.load(args.resume, map_location="cpu", weights_only=False)
        if ck["cfg"].get("context") and not model.cfg.context:  # resuming a grown fine-tune
            grow(model, ema, opt, args.seed)
        model.load_state_dict(ck["model"])
        ema.model.load_state_dict(ck["ema"])
        ema.updates = ck["step"]
        opt.load_state_dict(ck["opt"])
        start_step, best = ck["step"], ck.get("best", -1.0)
        logged = args.run_dir / "history.json"
        if logged.is_file():  # keep the curve of the steps already done
            history = [h for h in json.loads(logged.read_text()) if h["step"] <= start_step]
        logger.info("resumed path=%s step=%d best=%.4f", args.resume, start_step, best)

    total = args.steps + args.finetune_steps
    dataset = SynthDataset(
        args.seed,
        batch=args.batch,
        steps=args.steps,
        ft_steps=args.finetune_steps,
        imgsz=args.imgsz,
        ft_sizes=args.finetune_sizes,
    )
    indices = list(range(start_step * args.batch, total * args.batch))
    loader = DataLoader(
        dataset,
        batch_size=args.batch,
        sampler=indices,
        num_workers=args.workers,
        collate_fn=collate,
        persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers > 0 else None,
    )
    val = validation_set(args, finetune=start_step > args.steps)
    points = {size: anchor_points(size) for size in {args.imgsz, *args.finetune_sizes}}
    t_start = time.time()
    seen = 0
    step = start_step
    model.train()
    for images, targets, hard in loader:
        if step == args.steps:  # the fine-tune phase: its own validation set and best
            val = validation_set(args, finetune=True)
            best = begin_finetune(args)
            if args.finetune_context and not model.cfg.context:
                grow(model, ema, opt, args.seed)
        if step < args.steps:
            lr = lr_at(step, args.steps, args.lr, warmup=min(150, args.steps // 10 + 1))
        else:
            ft_warmup = min(50, args.finetune_steps // 10 + 1)
            lr = lr_at(step - args.steps, args.finetune_steps, args.finetune_lr, ft_warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x = (images.float() / 255).contiguous(memory_format=torch.channels_last)
        boxes, logits = model(x)
        loss, parts = detection_loss(
            boxes,
            logits,
            targets,
            *points[int(images.shape[-1])],
            hard=hard,
            hard_weight=1.0 if step < args.steps else args.finetune_hard_weight,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        ema.update(model)
        step += 1
        seen += len(targets)
        if step % 10 == 0 or step == total:
            el = time.time() - t_start
            ips = seen / max(el, 1e-6)
            eta = (total - step) * args.batch / max(ips, 1e-6)
            logger.info(
                "step=%d/%d loss=%.4f cls=%.4f box=%.4f iou=%.3f pos=%d lr=%.2e img_s=%.1f "
                "eta_min=%.1f",
                step,
                total,
                float(loss.detach()),
                parts["cls"],
                parts["box"],
                parts["iou"],
                int(parts["pos"]),
                lr,
                ips,
                eta / 60,
            )
        if step % args.val_every == 0 or step in (args.steps, total):
            best = checkpoint(
                args, model, ema=ema, opt=opt, step=step, val=val, best=best, history=history
            )
            model.train()
    logger.info("done steps=%d minutes=%.1f best=%.4f", step, (time.time() - t_start) / 60, best)
    final = args.out / MODEL_NAME
    if args.smoke:
        smoke_check(final, args.export_imgsz)
    elif not args.no_select:
        # choose the shipped inference size on synthetic data, re-export the best weights
        select_main(
            [str(args.run_dir / "best.pt"), "--out", str(args.out), "--version", args.version]
        )
    if (args.smoke or not args.no_select) and not args.no_verifier:
        # the crop verifier learns from the exported detector's boxes (core/vision/verifier.py)
        verify_main(["--detector", str(final), "--out", str(args.out)] + ["--smoke"] * args.smoke)
    return 0


def dataset_item(seed: int, i: int, imgsz: int, mix: Mix = BASE) -> tuple[np.ndarray, np.ndarray]:
    s = make_sample(seed, i, imgsz, mix)
    return s.image, s.boxes


def validation_set(args: argparse.Namespace, *, finetune: bool) -> list:
    """The main recipe at ``--imgsz``; in the fine-tune phase also its mix at each size."""
    t0 = time.time()
    seed = args.seed + VAL_SEED_OFFSET
    val = [dataset_item(seed, i, args.imgsz) for i in range(args.val_size)]
    if finetune:
        n = max(1, args.val_size // 2)
        for k, size in enumerate(args.finetune_sizes):
            first = args.val_size + k * n
            val += [dataset_item(seed, i, size, FINETUNE) for i in range(first, first + n)]
    logger.info(
        "val set n=%d seed=%d finetune=%s secs=%.1f", len(val), seed, finetune, time.time() - t0
    )
    return val


def begin_finetune(args: argparse.Namespace) -> float:
    """Keep the main phase's best checkpoint aside; the fine-tune phase picks its own."""
    if (args.run_dir / "best.pt").is_file():
        shutil.copy(args.run_dir / "best.pt", args.run_dir / "best-main.pt")
    logger.info("fine-tune phase steps=%d sizes=%s", args.finetune_steps, args.finetune_sizes)
    return -math.inf


def checkpoint(
    args: argparse.Namespace,
    model: torch.nn.Module,
    *,
    ema: EMA,
    opt: torch.optim.Optimizer,
    step: int,
    val: list,
    best: float,
    history: list[dict],
) -> float:
    """Validate the EMA weights, save a checkpoint, export when the score improves."""
    t0 = time.time()
    phase = 1 if step <= args.steps else 2
    score, bias, metrics = best_operating_point(predict_val(ema.model, val), val)
    history.append({"step": step, "phase": phase, "score": score, "score_bias": bias, **metrics})
    (args.run_dir / "history.json").write_text(json.dumps(history, indent=1))
    state = {
        "model": model.state_dict(),
        "ema": ema.model.state_dict(),
        "opt": opt.state_dict(),
        "step": step,
        "phase": phase,
        "best": max(best, score),
        "score_bias": bias,
        "cfg": ema.model.cfg.__dict__,
    }
    torch.save(state, args.run_dir / "last.pt")
    improved = score > best
    if improved:
        shutil.copy(args.run_dir / "last.pt", args.run_dir / "best.pt")
        onnx_path = args.run_dir / "best.onnx"
        export_onnx(ema.model, onnx_path, args.export_imgsz, version=args.version, score_bias=bias)
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(onnx_path, args.out / MODEL_NAME)
    logger.info(
        "val step=%d score=%.4f conf=%.2f box_recall=%.4f image_recall=%.4f fp_images=%.4f "
        "precision=%.4f best=%s secs=%.1f",
        step,
        score,
        metrics["conf"],
        metrics["box_recall"],
        metrics["image_recall"],
        metrics["fp_images"],
        metrics["precision"],
        improved,
        time.time() - t0,
    )
    return max(best, score)


def smoke_check(path: Path, imgsz: int) -> None:
    """Load the export in ONNX Runtime and run one image."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"images": np.zeros((1, 3, imgsz, imgsz), np.float32)})[0]
    meta = sess.get_modelmeta().custom_metadata_map
    logger.info("smoke onnx=%s output=%s names=%s", path, out.shape, meta.get("names"))


if __name__ == "__main__":
    raise SystemExit(main())
