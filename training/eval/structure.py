"""The structure check on the boxes the pipeline leaves unread: scores per family and cost.

    python -m training.eval.structure [--n 30] [--dev ../shared/data/qr-real-dev]

Runs the default pipeline with the structure check off and the verifier's threshold at 0
(every unread QR box is reported with its calibrated ``P(code)``), then scores each unread
box with ``core.vision.structure.box_structure`` on the decoded image, and prints, per
family (and for the development photos when ``--dev`` is given), how many unread boxes on
a code and on no code reach each structure level, with the check's time per box. This is
the table the cap rule of ``core.vision.verifier.cap_unstructured`` was chosen from
(synthetic stream 6,100,003 by default: not the test stream of ``training.eval.synthetic``).
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
from core.vision.structure import box_structure
from training.eval.detector import LIMITS
from training.eval.synthetic import cases
from training.families import FAMILIES

TUNE_SEED = 6_100_003
LEVELS = 5


def unread_boxes(
    pipeline: Pipeline, jpeg: bytes, boxes: np.ndarray, texts: list[str]
) -> list[tuple[float, bool, int, float]]:
    """(P(code), on a code, structure level, ms) of each unread box of one image."""
    (result,) = pipeline.run([ImageJob("s", jpeg)])
    dets = [d for d in result.get("detections", []) if d.get("text") is None]
    if not dets:
        return []
    gray = cv2.cvtColor(decode(jpeg, LIMITS), cv2.COLOR_BGR2GRAY)
    xyxy = np.array([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in dets], np.float32)
    on = np.zeros(len(dets), bool)
    if len(boxes):
        on = box_iou(xyxy, boxes).max(1) >= 0.5
    out = []
    for d, box, ok in zip(dets, xyxy, on, strict=True):
        t = time.perf_counter()
        level = box_structure(gray, box)
        out.append((float(d["confidence"]), bool(ok), level, (time.perf_counter() - t) * 1e3))
    return out


def dev_cases(folder: Path) -> list[tuple[str, bytes, np.ndarray, list[str]]]:
    """The development photos with the bounding boxes of their reference corners."""
    out = []
    for line in (folder / "manifest.jsonl").read_text().splitlines():
        item: dict[str, Any] = json.loads(line)
        refs = item.get("corners_ref") or []
        boxes = np.array(
            [[*np.min(c, axis=0), *np.max(c, axis=0)] for c in refs], np.float32
        ).reshape(-1, 4)
        name = "dev-" + str(item["kind"])
        if item["kind"] == "qr" and not refs:
            name = "dev-qr-noref"
        out.append((name, (folder / item["path"]).read_bytes(), boxes, list(item["texts"])))
    return out


def table(rows: dict[str, list[tuple[float, bool, int, float]]]) -> list[str]:
    head = " | ".join(f"L{k} code/not" for k in range(LEVELS))
    lines = [
        f"| group | unread boxes | P >= 0.5 | {head} | ms/box |",
        "|---" * (LEVELS + 4) + "|",
    ]
    for name, items in rows.items():
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
    settings = load_settings({}, ort_intra_threads=2, decode_threads=1, structure_check=False)
    rows: dict[str, list[tuple[float, bool, int, float]]] = defaultdict(list)
    with Pipeline(settings) as pipeline:
        assert pipeline.verifier is not None
        pipeline.verifier.threshold = 0.0
        for family in args.families:
            for case in cases(family, args.n, args.seed, args.cache):
                rows[family] += unread_boxes(pipeline, case.jpeg, case.boxes, case.texts)
            print(table({family: rows[family]})[-1], flush=True)
        if args.dev is not None:
            for name, jpeg, boxes, texts in dev_cases(args.dev):
                rows[name] += unread_boxes(pipeline, jpeg, boxes, texts)
    lines = ["Unread boxes with P(code) >= 0.5 by structure level (on a code / not)", ""]
    lines += table(dict(rows))
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structure.md").write_text(text)
    (args.out / "structure.json").write_text(json.dumps(rows))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
