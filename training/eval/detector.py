"""Evaluate qrsight's detector against zxing-cpp and OpenCV on labelled photos.

    python -m training.eval.detector ../shared/data/qr-real-dev [--model M] [--out DIR] [--speed]

Reads ``manifest.jsonl`` (one JSON per image: ``path``, ``texts``, ``kind`` =
``qr|negative``, ``corners_ref`` = list of 4-corner lists or null). For each method on
the same decoded images (``core.vision.images.decode``, BGR):

- **qrsight**: ``core.vision.detector.Detector`` at its default threshold, then
  ``core.vision.pipeline.Pipeline.check`` as the pipeline runs it: payloads read from the crops
  (then the whole image), the crop verifier's judgement (``core.vision.verifier``; ``--verifier
  off`` = without), harder reads of the plausible unread boxes, the verifier's keep rule;
  a row of the detector alone (no verifier) is added when a verifier is on;
- **zxing-cpp**: ``core.vision.payload.read_whole`` on the whole image (its corners give boxes);
- **OpenCV**: ``cv2.QRCodeDetectorAruco().detectAndDecodeMulti``.

Metrics: *image recall* — a QR image counts as found when every reference box (the
bounding box of a ``corners_ref`` quad) has a detection with IoU ≥ 0.5; images whose
``corners_ref`` is null count as found with ≥ 1 detection anywhere. *FP images* —
negatives with ≥ 1 detection. *Mean IoU* — best IoU per reference box, 0 when missed.
*Decode rate* — QR images where every expected text was read. *ms/img* — wall time per
image of the method (qrsight: detection + payload reading + verification). The recall /
FP curve over the detector's threshold is given for the detector alone and with the
verifier (its judgement at its threshold; there no payload read overrides it). Writes ``eval.md``,
``eval.json`` and ``recall_vs_conf.png`` to ``--out``. ``--speed`` adds ORT timings at
320 and 640 (2 threads, batch 1) of the model and of a YOLOv8n-sized reference graph.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from core.runtime.settings import DEFAULT_MODEL, DEFAULT_VERIFIER, REPO_ROOT, load_settings
from core.vision.detections import Detections
from core.vision.detector import Detector
from core.vision.images import ImageLimits, decode
from core.vision.payload import read_whole
from core.vision.pipeline import Pipeline, qr_class
from core.vision.postprocess import box_iou
from core.vision.verifier import Verifier, load_verifier

logger = logging.getLogger("eval_detector")

IOU_MATCH = 0.5
LIMITS = ImageLimits(max_bytes=50 * 1024 * 1024, max_side=16384, max_pixels=100_000_000)
THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)


@dataclass
class Item:
    path: Path
    kind: str
    texts: list[str]
    refs: list[np.ndarray] | None  # reference boxes xyxy, None = unknown position


@dataclass
class Outcome:
    """What one method returned for one image."""

    boxes: np.ndarray
    scores: np.ndarray
    texts: list[str]
    ms: float


@dataclass
class Summary:
    name: str
    recall: float = 0.0
    fp_images: int = 0
    n_neg: int = 0
    n_qr: int = 0
    mean_iou: float = 0.0
    decode_rate: float = 0.0
    ms: float = 0.0
    missed: list[str] = field(default_factory=list)
    fp_paths: list[str] = field(default_factory=list)


def load_manifest(arg: Path) -> list[Item]:
    manifest = arg / "manifest.jsonl" if arg.is_dir() else arg
    if not manifest.is_file():
        raise SystemExit(f"no manifest at {manifest} (expected manifest.jsonl)")
    items = []
    for line in manifest.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        refs = None
        if row.get("corners_ref"):
            refs = [quad_box(np.asarray(q, np.float32)) for q in row["corners_ref"]]
        path = (manifest.parent / row["path"]).resolve()
        items.append(Item(path, row["kind"], list(row["texts"]), refs))
    return items


def quad_box(quad: np.ndarray) -> np.ndarray:
    q = quad.reshape(-1, 2)
    return np.array([q[:, 0].min(), q[:, 1].min(), q[:, 0].max(), q[:, 1].max()], np.float32)


# --------------------------------------------------------------------------- methods
def run_qrsight(pipeline: Pipeline, img: np.ndarray) -> Outcome:
    """Default-threshold outcome (timed): the detector, then ``Pipeline.check`` (payloads,
    the verifier's judgement, harder reads, its keep rule), as ``core.vision.pipeline`` runs it."""
    t0 = time.perf_counter()
    d = pipeline.check(img, pipeline.detector.predict([img])[0])
    ms = (time.perf_counter() - t0) * 1000
    texts = [t for t in (d.text or []) if t is not None]
    return Outcome(d.xyxy, d.confidence, texts, ms)


def low_detections(
    det: Detector, img: np.ndarray, verifier: Verifier | None
) -> tuple[Detections, np.ndarray]:
    """Detections at conf 0.01 for the curve, and which of them the verifier confirms
    (all without a verifier)."""
    low = det.predict([img], conf=0.01)[0]
    ok = np.ones(len(low), bool)
    if verifier is not None and len(low):
        ok = verifier.judge(img, low, qr_class(det.info.labels)) >= verifier.threshold
    return low, ok


def run_zxing(img: np.ndarray) -> Outcome:
    t0 = time.perf_counter()
    found = read_whole(img)
    ms = (time.perf_counter() - t0) * 1000
    boxes = np.array([quad_box(c) for _, c in found], np.float32).reshape(-1, 4)
    return Outcome(boxes, np.ones(len(boxes), np.float32), [t for t, _ in found], ms)


def run_opencv(cv: cv2.QRCodeDetectorAruco, img: np.ndarray) -> Outcome:
    t0 = time.perf_counter()
    ok, infos, points, _ = cv.detectAndDecodeMulti(img)
    ms = (time.perf_counter() - t0) * 1000
    if not ok or points is None:
        return Outcome(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), [], ms)
    boxes = np.array([quad_box(p) for p in points], np.float32).reshape(-1, 4)
    return Outcome(boxes, np.ones(len(boxes), np.float32), [t for t in infos if t], ms)


# --------------------------------------------------------------------------- scoring
def found(item: Item, boxes: np.ndarray) -> tuple[bool, list[float]]:
    if item.refs is None:
        return len(boxes) > 0, []
    ious = box_iou(np.array(item.refs), boxes)
    best = [float(v) for v in ious.max(1)] if len(boxes) else [0.0] * len(item.refs)
    return all(v >= IOU_MATCH for v in best), best


def shown(path: Path) -> str:
    """``path`` as ``eval.json`` records it: relative to the repository (``../shared/...``
    for a data folder beside it), so results name no directory of the machine they ran on."""
    return os.path.relpath(Path(path).resolve(), REPO_ROOT)


def summarize(name: str, items: list[Item], outs: list[Outcome]) -> Summary:
    s = Summary(name)
    hits = decoded = 0
    ious: list[float] = []
    for item, out in zip(items, outs, strict=True):
        if item.kind == "negative":
            s.n_neg += 1
            if len(out.boxes):
                s.fp_images += 1
                s.fp_paths.append(shown(item.path))
            continue
        s.n_qr += 1
        ok, best = found(item, out.boxes)
        hits += ok
        ious += best
        if not ok:
            s.missed.append(shown(item.path))
        decoded += all(t in out.texts for t in item.texts)
    s.recall = hits / max(s.n_qr, 1)
    s.mean_iou = float(np.mean(ious)) if ious else 0.0
    s.decode_rate = decoded / max(s.n_qr, 1)
    s.ms = float(np.mean([o.ms for o in outs])) if outs else 0.0
    return s


def curve(
    items: list[Item], lows: list[tuple[Detections, np.ndarray]], verified: bool = False
) -> tuple[list[float], list[int]]:
    """Image recall and FP images at each detector threshold (``verified``: only the
    boxes the verifier confirms)."""
    recalls, fps = [], []
    for t in THRESHOLDS:
        hit = n = fp = 0
        for item, (d, ok) in zip(items, lows, strict=True):
            keep = d.confidence >= t
            if verified:
                keep &= ok
            boxes = d.xyxy[keep]
            if item.kind == "negative":
                fp += int(len(boxes) > 0)
            else:
                n += 1
                hit += found(item, boxes)[0]
        recalls.append(hit / max(n, 1))
        fps.append(fp)
    return recalls, fps


def plot(path: Path, recalls: list[float], fps: list[int], others: list[Summary], conf: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(THRESHOLDS, recalls, "o-", label="qrsight image recall")
    for s, style in zip(others, ["--", ":"], strict=False):
        ax.axhline(s.recall, linestyle=style, color="gray", label=f"{s.name} recall")
    ax.axvline(conf, color="red", alpha=0.4, label=f"default threshold {conf:g}")
    ax.set_xlabel("confidence threshold")
    ax.set_ylabel("image recall (IoU ≥ 0.5)")
    ax.set_ylim(0, 1.02)
    ax2 = ax.twinx()
    ax2.bar(THRESHOLDS, fps, width=0.02, alpha=0.3, color="orange", label="FP images")
    ax2.set_ylabel("false-positive images (negatives)")
    lines = ax.get_legend_handles_labels()
    bars = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + bars[0], lines[1] + bars[1], loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- speed
def ort_ms(path: Path, imgsz: int, runs: int = 20, threads: int = 2) -> float:
    """Median ms of one batch-1 ``imgsz`` run in ONNX Runtime (CPU, ``threads``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    for _ in range(3):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def speed_table(model: Path) -> list[str]:
    """ms/img at 320/640 and GFLOPs of the model and of a YOLOv8n-sized graph."""
    from training.model import count_macs
    from training.yolov8n_ref import YOLOv8n, export_reference

    macs_ref = count_macs(YOLOv8n().eval(), 640)
    tmp = export_reference(Path(tempfile.mkdtemp()) / "yolov8n_ref.onnx")
    rows = [
        "| graph | GFLOPs @640 (2 x MACs) | ms/img @320 | ms/img @640 |",
        "|---|---|---|---|",
    ]
    for name, path, macs in [
        (model.name, model, onnx_macs(model)),
        ("YOLOv8n-sized reference (80 classes, random weights)", tmp, macs_ref),
    ]:
        m320, m640 = ort_ms(path, 320), ort_ms(path, 640)
        rows.append(f"| {name} | {2 * macs / 1e9:.2f} | {m320:.1f} | {m640:.1f} |")
    return rows


def onnx_macs(path: Path, imgsz: int = 640) -> int:
    """Conv MACs of an ONNX graph at ``imgsz`` from its inferred shapes."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path))
    inp = model.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(inp, [1, 3, imgsz, imgsz], strict=True):
        d.ClearField("dim_param")
        d.dim_value = v
    model = shape_inference.infer_shapes(model)
    shapes = {
        vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
        for vi in list(model.graph.value_info) + list(model.graph.output)
    }
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        w = inits[node.input[1]]  # [out, in/groups, kh, kw]
        out = shapes.get(node.output[0])
        if not out or 0 in out:
            raise SystemExit(f"cannot infer the output shape of {node.name} in {path}")
        total += int(np.prod(out[1:])) * w[1] * w[2] * w[3]
    return total


# --------------------------------------------------------------------------- main
def table(rows: list[Summary]) -> list[str]:
    out = [
        "| method | image recall | FP images | mean IoU | decode rate | ms/img |",
        "|---|---|---|---|---|---|",
    ]
    for s in rows:
        out.append(
            f"| {s.name} | {s.recall:.3f} ({round(s.recall * s.n_qr)}/{s.n_qr}) "
            f"| {s.fp_images}/{s.n_neg} | {s.mean_iou:.3f} | {s.decode_rate:.3f} "
            f"({round(s.decode_rate * s.n_qr)}/{s.n_qr}) | {s.ms:.1f} |"
        )
    return out


def shorten(paths: list[str], n: int = 12) -> str:
    if not paths:
        return "-"
    return ", ".join(paths[:n]) + (f", … (+{len(paths) - n})" if len(paths) > n else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="manifest.jsonl or the folder holding it")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument(
        "--verifier", default=str(DEFAULT_VERIFIER), help="crop verifier .onnx (off = none)"
    )
    p.add_argument("--out", type=Path, default=Path("runs/eval"))
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--imgsz", type=int, default=None, help="override the model's imgsz")
    p.add_argument("--speed", action="store_true", help="also time 320/640 vs YOLOv8n-sized")
    p.add_argument(
        "--rect",
        action="store_true",
        help="QRSIGHT_RECT: each image at the smallest stride multiple that holds it",
    )
    p.add_argument(
        "--structure-cap",
        type=float,
        default=None,
        help="QRSIGHT_STRUCTURE_CAP (1 = no structure check; default: the settings' default)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    cv2.setNumThreads(args.threads)

    items = load_manifest(args.data)
    root = (args.data if args.data.is_dir() else args.data.parent).resolve()
    det = Detector(
        args.model,
        ["CPUExecutionProvider"],
        intra_threads=args.threads,
        imgsz=args.imgsz,
        rect=args.rect,
    )
    conf = det.default_thresholds[0]
    # the pipeline's rule: "off" = none; left out (with a warning) for another detector
    base = {
        "model_path": args.model,
        "ort_intra_threads": args.threads,
        "decode_threads": 1,
        "rect": args.rect,
    }
    if args.structure_cap is not None:
        base["structure_cap"] = args.structure_cap
    settings = load_settings({}, verifier_path=args.verifier, read_whole_image=False, **base)
    ver = load_verifier(settings, args.model)
    crops_only = Pipeline(settings, detector=det, verifier=ver)
    piped_default = Pipeline(
        load_settings({}, verifier_path=args.verifier, read_whole_image=True, **base),
        detector=det,
        verifier=ver,
    )
    no_verifier = Pipeline(
        load_settings({}, verifier_path="off", read_whole_image=False, **base), detector=det
    )
    cvdet = cv2.QRCodeDetectorAruco()
    ours, piped, alone, zx, ocv, lows = [], [], [], [], [], []
    for item in items:
        img = decode(item.path.read_bytes(), LIMITS)
        ours.append(run_qrsight(crops_only, img))
        piped.append(run_qrsight(piped_default, img))
        if ver is not None:
            alone.append(run_qrsight(no_verifier, img))
        lows.append(low_detections(det, img, ver))
        zx.append(run_zxing(img))
        ocv.append(run_opencv(cvdet, img))
    what = f"{args.model.name} + {ver.model_path.name}" if ver else args.model.name
    rows = [
        summarize(f"qrsight ({what}, conf {conf:g}, imgsz {det.input_hw[0]})", items, ours),
        summarize("qrsight pipeline default (+ whole-image reads)", items, piped),
    ]
    if ver is not None:
        rows.append(summarize("qrsight detector alone (no verifier)", items, alone))
    others = [
        summarize("zxing-cpp (whole image)", items, zx),
        summarize("OpenCV QRCodeDetectorAruco", items, ocv),
    ]
    rows += others
    alone_curve = curve(items, lows)
    recalls, fps = curve(items, lows, verified=True) if ver is not None else alone_curve
    args.out.mkdir(parents=True, exist_ok=True)
    plot(args.out / "recall_vs_conf.png", recalls, fps, others, conf)
    lines = [f"Data: `{args.data}` ({rows[0].n_qr} QR images, {rows[0].n_neg} negatives)", ""]
    lines += table(rows)
    lines += ["", "Recall / FP images of qrsight by the detector's threshold:", ""]
    lines += ["| conf | " + " | ".join(f"{t:g}" for t in THRESHOLDS) + " |"]
    lines += ["|---" * (len(THRESHOLDS) + 1) + "|"]
    curves = [("", alone_curve)]
    if ver is not None:
        curves = [(" (detector alone)", alone_curve), (" (+ verifier)", (recalls, fps))]
    for label, (rec, fp) in curves:
        lines += [f"| recall{label} | " + " | ".join(f"{r:.3f}" for r in rec) + " |"]
        lines += [f"| FP images{label} | " + " | ".join(str(f) for f in fp) + " |"]
    for s in rows:
        if s.missed or s.fp_paths:
            missed = [
                str(Path(m).relative_to(root)) if root in Path(m).parents else m for m in s.missed
            ]
            fps_ = [
                str(Path(m).relative_to(root)) if root in Path(m).parents else m for m in s.fp_paths
            ]
            lines += [
                "",
                f"{s.name}: missed {len(missed)} {shorten(missed)}; FP {len(fps_)} {shorten(fps_)}",
            ]
    if args.speed:
        lines += ["", f"ONNX Runtime CPU, {args.threads} threads, batch 1, median of 20:", ""]
        lines += speed_table(args.model)
    text = "\n".join(lines) + "\n"
    (args.out / "eval.md").write_text(text)
    (args.out / "eval.json").write_text(
        json.dumps(
            {
                "rows": [s.__dict__ for s in rows],
                "thresholds": THRESHOLDS.tolist(),
                "recall": recalls,
                "fp_images": fps,
                "verifier": shown(ver.model_path) if ver else None,
            },
            indent=1,
        )
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
