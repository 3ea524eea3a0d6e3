"""Which extra ways of reading an unread box pay for their time, on synthetic hard codes.

    python -m training.eval.payload_attempts [--n 40] [--negatives 10] [--out DIR]

On the positive families of ``training.families`` (blur, small, glare, perspective,
curved, noisy, ... ; seed 6,100,003, a stream of its own, *not* the one
``training.eval.synthetic`` reports on) the shipped detector boxes each code and
``core.vision.payload.read_payloads`` reads the boxes the standard way. For the boxes on a code
that stay unread, every attempt of ``core.vision.payload.CANDIDATE_ATTEMPTS`` is tried alone
(success = the code's payload, exactly); on boxes that are not on a code (negative
families: texture close-ups and other symbologies) only its time is measured, since
there every attempt fails and costs its full time.

Prints per attempt: codes read, ms per box on codes and on non-codes; then the greedy
order (most new reads per ms first, stopping when an attempt adds no read) with the
cumulative reads and the time it adds per unread box, next to the standard reading's
time per box measured in the same run (the machine may be shared: use the ratio).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

from core.runtime.settings import DEFAULT_MODEL
from core.vision.detector import Detector
from core.vision.images import decode
from core.vision.payload import (
    CANDIDATE_ATTEMPTS,
    HARD_ATTEMPTS,
    _gray,
    read_box_with,
    read_payloads,
)
from core.vision.postprocess import box_iou
from training.eval.detector import LIMITS
from training.eval.synthetic import cases
from training.families import NEGATIVE, POSITIVE

TUNE_SEED = 6_100_003


def unread_boxes(
    det: Detector, families: list[str], n: int, cache: Path
) -> tuple[list[tuple[np.ndarray, np.ndarray, str]], list[tuple[np.ndarray, np.ndarray]], float]:
    """(gray, box, payload) of unread boxes on codes, (gray, box) of boxes on no code, and
    the standard reading's ms per box."""
    on_code, off_code = [], []
    std_ms, std_boxes = 0.0, 0
    for family in families:
        for case in cases(family, n, TUNE_SEED, cache):
            img = decode(case.jpeg, LIMITS)
            d = det.predict([img])[0]
            t0 = time.perf_counter()
            read = read_payloads(img, d)
            std_ms += (time.perf_counter() - t0) * 1000
            std_boxes += len(d)
            gray = _gray(img)
            ious = box_iou(d.xyxy, case.boxes) if len(case.boxes) else np.zeros((len(d), 0))
            assert read.text is not None
            for k, text in enumerate(read.text):
                if text is not None:
                    continue
                if ious.shape[1] and ious[k].max() >= 0.5:
                    on_code.append((gray, d.xyxy[k], case.texts[int(ious[k].argmax())]))
                else:
                    off_code.append((gray, d.xyxy[k]))
    return on_code, off_code, std_ms / max(std_boxes, 1)


def measure(
    on_code: list[tuple[np.ndarray, np.ndarray, str]],
    off_code: list[tuple[np.ndarray, np.ndarray]],
    only: list[str] | None = None,
) -> dict[str, dict]:
    out = {}
    for name, attempt in CANDIDATE_ATTEMPTS.items():
        if only and name not in only:
            continue
        ok, t_on, t_off = [], [], []
        for gray, box, text in on_code:
            t0 = time.perf_counter()
            code = read_box_with(gray, box, attempt)
            t_on.append((time.perf_counter() - t0) * 1000)
            ok.append(code is not None and code.text == text)
        for gray, box in off_code:
            t0 = time.perf_counter()
            read_box_with(gray, box, attempt)
            t_off.append((time.perf_counter() - t0) * 1000)
        out[name] = {"ok": ok, "ms_on": t_on, "ms_off": t_off}
        print(
            f"  {name:18s} reads {sum(ok):3d}/{len(ok)}  ms/box on codes {np.mean(t_on):6.1f}"
            f"  off codes {np.mean(t_off) if t_off else 0:6.1f}",
            flush=True,
        )
    return out


def _gain(r: dict, left: frozenset[int]) -> float:
    """New reads per ms of one attempt's results on the boxes still unread."""
    new = sum(1 for i in left if r["ok"][i])
    cost = np.mean(r["ms_on"] + r["ms_off"]) if r["ms_on"] or r["ms_off"] else 1.0
    return float(new / max(cost, 1e-3))


def greedy(results: dict[str, dict], n_on: int) -> list[tuple[str, int, float]]:
    """Attempts in order of new reads per ms; (name, cumulative reads, ms per unread box)."""
    left = set(range(n_on))
    order, total_ms = [], 0.0
    names = set(results)
    while names and left:
        still = frozenset(left)
        best = max(sorted(names), key=lambda name: _gain(results[name], still))
        new = {i for i in left if results[best]["ok"][i]}
        if not new:
            break
        left -= new
        names.discard(best)
        total_ms += float(np.mean(results[best]["ms_on"] + results[best]["ms_off"]))
        order.append((best, n_on - len(left), total_ms))
    return order


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=40, help="images per positive family")
    p.add_argument("--negatives", type=int, default=10, help="images per negative family")
    p.add_argument("--out", type=Path, default=Path("runs/payload-attempts"))
    p.add_argument("--cache", type=Path, default=Path("runs/payload-attempts-cache"))
    p.add_argument(
        "--only", nargs="+", default=None, choices=sorted(CANDIDATE_ATTEMPTS), help="these alone"
    )
    args = p.parse_args(argv)
    cv2.setNumThreads(1)
    det = Detector(DEFAULT_MODEL, ["CPUExecutionProvider"], intra_threads=2)
    on_code, _, std_ms = unread_boxes(det, list(POSITIVE), args.n, args.cache)
    _, off_code, _ = unread_boxes(det, list(NEGATIVE), args.negatives, args.cache)
    print(
        f"unread boxes on codes {len(on_code)}, boxes on no code {len(off_code)}; "
        f"standard reading {std_ms:.1f} ms per box"
    )
    results = measure(on_code, off_code, args.only)
    order = greedy(results, len(on_code))
    lines = [
        f"standard reading: {std_ms:.1f} ms per box (same run)",
        "",
        "| attempt | reads alone | ms/box on codes | ms/box on no code |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {sum(r['ok'])}/{len(r['ok'])} | {np.mean(r['ms_on']):.1f} "
            f"| {np.mean(r['ms_off']) if r['ms_off'] else 0:.1f} |"
        )
    lines += [
        "",
        "| greedy order | cumulative reads | ms per unread box (all fail) |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {k}/{len(on_code)} | {ms:.1f} |" for name, k, ms in order]
    shipped = [a.name for a in HARD_ATTEMPTS]
    ok = [any(results[a]["ok"][i] for a in shipped) for i in range(len(on_code))]
    cost = sum(float(np.mean(results[a]["ms_on"] + results[a]["ms_off"])) for a in shipped)
    lines += [
        "",
        f"shipped HARD_ATTEMPTS {shipped}: {sum(ok)}/{len(on_code)} reads, "
        f"{cost:.1f} ms per unread box when all fail ({cost / max(std_ms, 1e-3):.1f}x "
        "the standard reading of a box)",
    ]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attempts.md").write_text(text)
    (args.out / "attempts.json").write_text(
        json.dumps(
            {
                k: {"reads": sum(v["ok"]), "ms_on": float(np.mean(v["ms_on"])) if v["ms_on"] else 0}
                for k, v in results.items()
            },
            indent=1,
        )
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
