"""The default pipeline on synthetic test families: FP rate, recall and reads per family.

    python -m training.eval.synthetic [--n 100] [--verifier PATH|off] [--out DIR] [--label NAME]

Every image of ``training.families`` (seed 6,000,001: a stream no training, selection or
threshold step uses) is encoded as a JPEG (quality 92, as a phone writes it) and goes
through ``core.vision.pipeline.Pipeline`` with the default settings (``--model``/``--verifier``
override them), exactly as ``qrsight-detect`` runs it. Per family:

- negatives (texture close-ups, other symbologies): the share of images with any box;
- positives (one QR code each, a hard condition per family): *recall* — the code has a
  box with IoU >= 0.5 or a box that read its payload; *read* — its payload was read;
  *extra* — boxes on no code;
- per image, ``post_ms`` of the pipeline (NMS, payload reading, verification) and the
  whole ``total_ms``, with the mean of ``infer_ms`` as a same-run baseline (the machine
  may be shared: compare ratios, not milliseconds).

It also prints the reliability of the reported ``confidence`` over all boxes of all
families: of the boxes scored in each 0.1 bin, how many are on a QR code (unread boxes
separately: they are the ones whose confidence is a claim; ``--all-judged`` reports the
boxes below the verifier's threshold too, for the whole range). Writes ``synthetic.md`` and
``synthetic.json`` to ``--out``; images are cached under ``--cache`` (generated once).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from core.runtime.settings import Settings, load_settings
from core.vision.images import decode
from core.vision.pipeline import ImageJob, Pipeline
from core.vision.postprocess import box_iou
from training.eval.detector import LIMITS
from training.families import ALL_POSITIVE, FAMILIES, NEGATIVE, scene

EVAL_SEED = 6_000_001
BINS = np.round(np.arange(0.0, 1.01, 0.1), 1)


@dataclass
class Case:
    family: str
    index: int
    jpeg: bytes
    boxes: np.ndarray
    texts: list[str]


@dataclass
class FamilyRow:
    family: str
    n: int = 0
    hit: int = 0  # negatives: images with a box; positives: codes found
    read: int = 0
    extra: int = 0
    exact: int = 0  # positives: the code found and no other box
    post_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    infer_ms: list[float] = field(default_factory=list)


def cases(family: str, n: int, seed: int, cache: Path | None) -> list[Case]:
    """The first ``n`` images of ``family`` as JPEG bytes with their codes (cached)."""
    out = []
    for i in range(n):
        path = cache / family / f"{i:04d}" if cache else None
        if path is not None and path.with_suffix(".json").is_file():
            meta = json.loads(path.with_suffix(".json").read_text())
            jpeg = path.with_suffix(".jpg").read_bytes()
        else:
            s = scene(seed, i, family)
            ok, buf = cv2.imencode(
                ".jpg", cv2.cvtColor(s.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92]
            )
            assert ok
            jpeg = buf.tobytes()
            meta = {"boxes": s.boxes.tolist(), "texts": s.texts}
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.with_suffix(".jpg").write_bytes(jpeg)
                path.with_suffix(".json").write_text(json.dumps(meta))
        boxes = np.array(meta["boxes"], np.float32).reshape(-1, 4)
        out.append(Case(family, i, jpeg, boxes, list(meta["texts"])))
    return out


def shrunk(case: Case, sides: tuple[int, int], seed: int) -> Case:
    """``case`` scaled down (never up) so its longer side is a size drawn from ``sides``
    (seeded by the case): the small photos a phone app or a thumbnail sends."""
    image = cv2.imdecode(np.frombuffer(case.jpeg, np.uint8), cv2.IMREAD_COLOR)
    rng = np.random.default_rng([seed, case.index, sum(map(ord, case.family))])
    side = int(rng.integers(sides[0], sides[1] + 1))
    f = min(1.0, side / max(image.shape[:2]))
    size = (max(1, round(image.shape[1] * f)), max(1, round(image.shape[0] * f)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return Case(case.family, case.index, buf.tobytes(), case.boxes * np.float32(f), case.texts)


def score(
    case: Case, result: dict[str, Any], row: FamilyRow, boxes: list, min_conf: float = 0.0
) -> None:
    """Add one image's result to its family row and its boxes to the reliability data
    (the row counts only boxes at ``min_conf`` or above: what the pipeline reports when
    the verifier's threshold was set to 0 to see every judged box)."""
    dets = result["detections"]
    xyxy = np.array([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in dets], np.float32)
    texts = [d.get("text") for d in dets]
    row.n += 1
    t = result["timings"]
    row.post_ms.append(t["post_ms"])
    row.total_ms.append(t["total_ms"])
    row.infer_ms.append(t["infer_ms"])
    on_code = np.zeros(len(dets), bool)
    if len(case.boxes) and len(dets):
        on_code = box_iou(xyxy, case.boxes).max(1) >= 0.5
    on_code |= np.array([t is not None and t in case.texts for t in texts], bool)
    for d, ok in zip(dets, on_code, strict=True):
        boxes.append((float(d["confidence"]), bool(ok), d.get("text") is not None))
    shown = np.array([d["confidence"] >= min_conf for d in dets], bool)
    dets, texts, on_code = (
        [d for d, s in zip(dets, shown, strict=True) if s],
        [t for t, s in zip(texts, shown, strict=True) if s],
        on_code[shown],
    )
    if case.family in NEGATIVE:
        row.hit += int(len(dets) > 0)
        row.extra += len(dets)
        return
    # every code of the image boxed (IoU >= 0.5) or read (the nested family has two)
    boxed = np.zeros(len(case.boxes), bool)
    if len(case.boxes) and dets:
        shown_xyxy = np.array([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in dets], np.float32)
        boxed = box_iou(case.boxes, shown_xyxy).max(1) >= 0.5
    boxed |= np.array([t in texts for t in case.texts], bool)
    found = bool(len(boxed)) and bool(boxed.all())
    row.hit += int(found)
    row.read += int(all(t in texts for t in case.texts))
    row.extra += int((~on_code).sum())
    row.exact += int(found and not (~on_code).any())


def reliability(boxes: list[tuple[float, bool, bool]], unread_only: bool) -> list[str]:
    chosen = [(c, ok) for c, ok, read in boxes if not (unread_only and read)]
    lines = ["| confidence | boxes | on a code | share |", "|---|---|---|---|"]
    for lo, hi in itertools.pairwise(BINS):
        inside = [ok for c, ok in chosen if lo <= c < hi or (hi == 1.0 and c == 1.0)]
        share = f"{np.mean(inside):.2f}" if inside else "-"
        lines.append(f"| {lo:.1f}-{hi:.1f} | {len(inside)} | {sum(inside)} | {share} |")
    return lines


def table(rows: list[FamilyRow]) -> list[str]:
    lines = [
        "| family | images | FP images / recall | read | exact | extra boxes | post ms "
        "| total ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = r.hit / max(r.n, 1)
        read = "-" if r.family in NEGATIVE else f"{r.read / max(r.n, 1):.2f}"
        exact = "-" if r.family in NEGATIVE else f"{r.exact / max(r.n, 1):.2f}"
        lines.append(
            f"| {r.family} | {r.n} | {rate:.2f} | {read} | {exact} | {r.extra} "
            f"| {np.mean(r.post_ms):.1f} | {np.mean(r.total_ms):.1f} |"
        )
    return lines


def timing(args: argparse.Namespace, settings: Settings) -> int:
    """ms of ``Pipeline.check`` per image (payloads, verifier, harder reads) for the
    default and the baselines, on the same decoded images and detections, interleaved."""
    default = Pipeline(settings)
    configs = {"default": default}
    plain = Pipeline(settings.model_copy(update={"verifier_path": None}), detector=default.detector)
    plain.hard_attempts = ()
    configs["baseline: no verifier, standard reads"] = plain
    configs["without the other-symbol read"] = Pipeline(
        settings.model_copy(update={"other_symbols": False}), detector=default.detector
    )
    configs["without the other-symbol read and the structure check"] = Pipeline(
        settings.model_copy(update={"structure_cap": 1.0, "other_symbols": False}),
        detector=default.detector,
    )
    if args.before_verifier:
        before = Pipeline(
            settings.model_copy(update={"verifier_path": Path(args.before_verifier)}),
            detector=default.detector,
        )
        before.hard_attempts = ()
        configs["before: that verifier, standard reads"] = before
    ms: dict[str, dict[str, list[float]]] = {name: {"neg": [], "pos": []} for name in configs}
    detect: list[float] = []
    for family in args.families:
        kind = "neg" if family in NEGATIVE else "pos"
        for k, case in enumerate(cases(family, args.n, args.seed, args.cache)):
            img = decode(case.jpeg, LIMITS)
            t0 = time.perf_counter()
            found = default.detector.predict([img])[0]
            detect.append((time.perf_counter() - t0) * 1000)
            names = list(configs) if k % 2 == 0 else list(reversed(configs))
            for name in names:
                t0 = time.perf_counter()
                configs[name].check(img, found)
                ms[name][kind].append((time.perf_counter() - t0) * 1000)
    base = float(np.mean(detect))
    lines = [
        f"detector (letterbox + ONNX + NMS) {base:.1f} ms per image, same run",
        "",
        "| Pipeline.check | ms/img negatives | ms/img positives | x detector |",
        "|---|---|---|---|",
    ]
    for name, parts in ms.items():
        both = parts["neg"] + parts["pos"]
        lines.append(
            f"| {name} | {np.mean(parts['neg']) if parts['neg'] else 0:.1f} "
            f"| {np.mean(parts['pos']) if parts['pos'] else 0:.1f} | {np.mean(both) / base:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "timing.md").write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100, help="images per family")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--model", default=None, help="detector .onnx (default: the shipped one)")
    p.add_argument("--verifier", default=None, help="verifier .onnx, or off")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/synthetic"))
    p.add_argument("--cache", type=Path, default=Path("runs/synthetic-cache"))
    p.add_argument("--label", default="qrsight default")
    p.add_argument(
        "--timing",
        action="store_true",
        help="only time Pipeline.check per image: the default against a baseline (no "
        "verifier, no harder reads; and --before-verifier without harder reads), interleaved",
    )
    p.add_argument(
        "--structure-cap",
        type=float,
        default=None,
        help="QRSIGHT_STRUCTURE_CAP (1 = no structure check; default: the settings' default)",
    )
    p.add_argument(
        "--other-symbols",
        choices=("on", "off"),
        default=None,
        help="QRSIGHT_OTHER_SYMBOLS (off = no other-symbol veto; default: the settings' default)",
    )
    p.add_argument(
        "--structure-veto",
        choices=("on", "off"),
        default=None,
        help="QRSIGHT_STRUCTURE_VETO (default: the settings' default)",
    )
    for name, setting in (("rect", "QRSIGHT_RECT"), ("scaleup", "QRSIGHT_SCALEUP")):
        p.add_argument(
            f"--{name}",
            choices=("on", "off"),
            default=None,
            help=f"{setting} (default: the settings' default)",
        )
    p.add_argument(
        "--shrink",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=None,
        help="scale each image down so its longer side is MIN..MAX pixels (seeded), "
        "boxes with it: small photos",
    )
    p.add_argument("--before-verifier", default=None, help="with --timing: an earlier verifier")
    p.add_argument(
        "--all-judged",
        action="store_true",
        help="report every box the verifier judged (its threshold set to 0) in the "
        "reliability tables, for the whole range; the family rows count the boxes at the "
        "threshold, as the pipeline reports them",
    )
    args = p.parse_args(argv)
    cv2.setNumThreads(1)
    overrides: dict[str, Any] = {"ort_intra_threads": args.threads, "decode_threads": 1}
    if args.model:
        overrides["model_path"] = args.model
    if args.verifier:
        overrides["verifier_path"] = args.verifier
    if args.structure_cap is not None:
        overrides["structure_cap"] = args.structure_cap
    if args.structure_veto is not None:
        overrides["structure_veto"] = args.structure_veto == "on"
    if args.other_symbols is not None:
        overrides["other_symbols"] = args.other_symbols == "on"
    for name in ("rect", "scaleup"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name) == "on"
    settings = load_settings({}, **overrides)
    if args.timing:
        return timing(args, settings)
    rows: list[FamilyRow] = []
    boxes: list[tuple[float, bool, bool]] = []
    start = time.time()
    with Pipeline(settings) as pipeline:
        min_conf = 0.0
        if args.all_judged and pipeline.verifier is not None:
            min_conf, pipeline.verifier.threshold = pipeline.verifier.threshold, 0.0
        for family in args.families:
            row = FamilyRow(family)
            for raw in cases(family, args.n, args.seed, args.cache):
                case = shrunk(raw, args.shrink, args.seed) if args.shrink else raw
                (result,) = pipeline.run([ImageJob(f"{family}-{case.index}", case.jpeg)])
                if result["status"] != "OK":
                    raise SystemExit(f"{family} {case.index}: {result['error']}")
                score(case, result, row, boxes, min_conf)
            rows.append(row)
            print(table([row])[-1], f"({time.time() - start:.0f} s)", flush=True)
    neg = [r for r in rows if r.family in NEGATIVE]
    pos = [r for r in rows if r.family in ALL_POSITIVE]
    lines = [f"{args.label}: {settings.model_path.name}, verifier {settings.verifier_path}", ""]
    lines += table(neg + pos)
    if neg:
        lines += ["", f"negatives: {sum(r.hit for r in neg)}/{sum(r.n for r in neg)} FP images"]
    if pos:
        n = sum(r.n for r in pos)
        recall, read = sum(r.hit for r in pos) / n, sum(r.read for r in pos) / n
        lines += [f"positives: recall {recall:.3f}, read {read:.3f}"]
    infer = np.mean([m for r in rows for m in r.infer_ms])
    post = np.mean([m for r in rows for m in r.post_ms])
    lines += [f"mean infer_ms {infer:.1f}, post_ms {post:.1f} (ratio {post / infer:.2f})"]
    lines += ["", "Reliability, all boxes:", "", *reliability(boxes, False)]
    lines += ["", "Reliability, boxes without a payload:", "", *reliability(boxes, True)]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "synthetic.md").write_text(text)
    (args.out / "synthetic.json").write_text(
        json.dumps(
            {"rows": [r.__dict__ for r in rows], "boxes": boxes, "label": args.label}, indent=1
        )
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
