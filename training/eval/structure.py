"""The structure check on the boxes the pipeline leaves unread: levels per family, cost.

    python -m training.eval.structure [--n 30] [--dev ../shared/data/qr-real-dev]

Runs the default pipeline with the structure check off and the verifier's threshold at 0
(every unread QR box is reported with its calibrated ``P(code)``), then scores each unread
box with ``core.vision.structure.box_structure`` on the decoded image. Prints, per family
(and for the development photos with ``--dev``), how many unread boxes at ``P >= 0.5``
on a code and on no code reach each structure level, the check's time per box, and the
reliability of the reported confidence (every box, read ones at 1.0) without the check and
with it (``capped``: what ``core.vision.structure.cap_unstructured`` makes of them). The
rule's level was chosen on this table at seed 6,100,003, not the test stream of
``training.eval.synthetic``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from core.runtime.settings import load_settings
from core.vision.images import decode
from core.vision.pipeline import ImageJob, Pipeline
from core.vision.postprocess import box_iou
from core.vision.structure import DEFAULT_CAP, MIN_LEVEL, box_structure
from training.eval.detector import LIMITS
from training.eval.synthetic import cases
from training.families import FAMILIES

TUNE_SEED = 6_100_003
LEVELS = 5


Box = tuple[float, bool, int, float]  # P(code) (1.0 read), on a code, level (-1 read), ms


def judged_boxes(
    pipeline: Pipeline, jpeg: bytes, boxes: np.ndarray | None, texts: list[str]
) -> list[Box]:
    """Every box of one image: read ones as (1.0, on a code, -1, 0), unread ones with
    their P(code), whether they are on a code (``boxes`` None: an image of one code with
    no reference box, every box counts as on it), their structure level and its ms."""
    (result,) = pipeline.run([ImageJob("s", jpeg)])
    dets = result.get("detections", [])
    if not dets:
        return []
    gray = cv2.cvtColor(decode(jpeg, LIMITS), cv2.COLOR_BGR2GRAY)
    xyxy = np.array([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in dets], np.float32)
    on = np.full(len(dets), boxes is None, bool)
    if boxes is not None and len(boxes):
        on = box_iou(xyxy, boxes).max(1) >= 0.5
    on |= np.array([d.get("text") is not None and d["text"] in texts for d in dets], bool)
    out: list[Box] = []
    for d, box, ok in zip(dets, xyxy, on, strict=True):
        if d.get("text") is not None:
            out.append((1.0, bool(ok), -1, 0.0))
            continue
        t = time.perf_counter()
        level = box_structure(gray, box)
        out.append((float(d["confidence"]), bool(ok), level, (time.perf_counter() - t) * 1e3))
    return out


def capped(
    items: list[Box], cap: float = DEFAULT_CAP, min_level: int = MIN_LEVEL, threshold: float = 0.5
) -> list[Box]:
    """The same boxes as the structure check reports them (``cap_unstructured``)."""
    return [
        (min(p, cap), ok, lv, ms) if 0 <= lv < min_level and p >= threshold else (p, ok, lv, ms)
        for p, ok, lv, ms in items
    ]


def reliability(items: list[Box]) -> list[str]:
    """Per 0.1 bin of confidence: boxes, on a code, share (unread boxes in brackets)."""
    lines = ["| confidence | boxes | on a QR code | share | unread: boxes, on a code |"]
    lines.append("|---|---|---|---|---|")
    for lo in np.round(np.arange(0, 1.0, 0.1), 1):
        hi = lo + 0.1
        inside = [(ok, lv) for p, ok, lv, _ in items if lo <= p < hi or (hi > 0.99 and p == 1)]
        n, on = len(inside), sum(ok for ok, _ in inside)
        un = [ok for ok, lv in inside if lv >= 0]
        share = f"{on / n:.2f}" if n else "-"
        lines.append(f"| {lo:.1f}-{hi:.1f} | {n} | {on} | {share} | {len(un)}, {sum(un)} |")
    return lines


def dev_cases(folder: Path) -> list[tuple[str, bytes, np.ndarray | None, list[str]]]:
    """The development photos with the bounding boxes of their reference corners."""
    out = []
    for line in (folder / "manifest.jsonl").read_text().splitlines():
        item: dict[str, Any] = json.loads(line)
        refs = item.get("corners_ref") or []
        boxes: np.ndarray | None = np.array(
            [[*np.min(c, axis=0), *np.max(c, axis=0)] for c in refs], np.float32
        ).reshape(-1, 4)
        name = "dev-" + str(item["kind"])
        if item["kind"] == "qr" and not refs:
            name, boxes = "dev-qr-noref", None
        out.append((name, (folder / item["path"]).read_bytes(), boxes, list(item["texts"])))
    return out


def table(rows: dict[str, list[Box]]) -> list[str]:
    head = " | ".join(f"L{k} code/not" for k in range(LEVELS))
    lines = [
        f"| group | unread boxes | P >= 0.5 | {head} | ms/box |",
        "|---" * (LEVELS + 4) + "|",
    ]
    for name, every in rows.items():
        items = [b for b in every if b[2] >= 0]
        cells = []
        for k in range(LEVELS):
            code = sum(1 for p, ok, lv, _ in items if lv == k and ok and p >= 0.5)
            other = sum(1 for p, ok, lv, _ in items if lv == k and not ok and p >= 0.5)
            cells.append(f"{code}/{other}")
        ms = f"{np.mean([m for *_, m in items]):.1f}" if items else "-"
        kept = sum(1 for p, *_ in items if p >= 0.5)
        lines.append(f"| {name} | {len(items)} | {kept} | {' | '.join(cells)} | {ms} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--seed", type=int, default=TUNE_SEED)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--dev", type=Path, default=None, help="development photos (folder)")
    p.add_argument("--cache", type=Path, default=Path("runs/structure-cache"))
    p.add_argument("--out", type=Path, default=Path("runs/structure"))
    args = p.parse_args(argv)
    cv2.setNumThreads(1)
    settings = load_settings({}, ort_intra_threads=2, decode_threads=1, structure_cap=1.0)
    rows: dict[str, list[Box]] = defaultdict(list)
    with Pipeline(settings) as pipeline:
        assert pipeline.verifier is not None
        pipeline.verifier.threshold = 0.0
        for family in args.families:
            for case in cases(family, args.n, args.seed, args.cache):
                rows[family] += judged_boxes(pipeline, case.jpeg, case.boxes, case.texts)
            print(table({family: rows[family]})[-1], flush=True)
        if args.dev is not None:
            for name, jpeg, boxes, texts in dev_cases(args.dev):
                rows[name] += judged_boxes(pipeline, jpeg, boxes, texts)
    lines = ["Unread boxes with P(code) >= 0.5 by structure level (on a code / not)", ""]
    lines += table(dict(rows))
    dev = [b for name, items in rows.items() if name.startswith("dev-") for b in items]
    syn = [b for name, items in rows.items() if not name.startswith("dev-") for b in items]
    for name, items in (("synthetic families", syn), ("development photos", dev)):
        if items:
            lines += ["", f"Reliability, {name}, without the structure check:", ""]
            lines += reliability(items)
            lines += ["", f"Reliability, {name}, with it (cap {DEFAULT_CAP}):", ""]
            lines += reliability(capped(items))
            lines += ["", f"Reliability, {name}, with it (cap 0.3: dropped):", ""]
            lines += reliability(capped(items, 0.3))
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structure.md").write_text(text)
    (args.out / "structure.json").write_text(json.dumps(rows))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
