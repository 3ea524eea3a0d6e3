# ruff: noqa: E402  (the repo root goes on sys.path before the project imports)
"""Reduced-scale JPEG decoding (``QRSIGHT_REDUCED_DECODE``): speed, recall and payload reads.

    python bench/reduced_decode.py [../shared/data/qr-real-dev] [--upscale 4] [--quality 90]

The development photos are at most 640x480, so none of them is decoded reduced as it is.
To see what a large phone photo costs, each photo is upscaled (``--upscale``, bicubic;
4 gives 2560x1920, about a 5 MP photo) and re-encoded as a JPEG (``--quality``), then
``Pipeline.run`` processes the same bytes twice, once with ``reduced_decode`` off (full
decode) and once on (the detector sees the JPEG decoded at 1/2..1/8, boxes are read from
full-resolution crops). Printed per setting: ms per image (median, in this process,
one image per run), the decode stage alone, QR images with at least one detection,
negatives with a detection, and expected payloads read. Evaluation only: nothing here is
tuned on these photos. The upscaled photos are smoother than a real 5 MP photo of the
same scene; the speed figures hold for any JPEG of that size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cv2

from bench.eval_detector import load_manifest
from core.runtime.settings import load_settings
from core.vision.pipeline import ImageJob, Pipeline

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "qr-real-dev"


def enlarged(path: Path, factor: float, quality: int) -> bytes:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    big = cv2.resize(img, None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
    ok, buf = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def measure(reduced: bool, items: list, data: list[bytes], passes: int) -> dict[str, float]:
    settings = load_settings({}, reduced_decode=reduced)
    ms: list[float] = []
    decode_ms: list[float] = []
    hits = fps = read = expected = 0
    with Pipeline(settings) as pipeline:
        pipeline.run([ImageJob("warm", data[0])])
        for p in range(passes):
            for k, (item, blob) in enumerate(zip(items, data, strict=True)):
                started = time.perf_counter()
                result = pipeline.run([ImageJob(f"{p}-{k}", blob)])[0]
                ms.append((time.perf_counter() - started) * 1000)
                decode_ms.append(result["timings"]["decode_ms"])
                if p:
                    continue
                dets = result["detections"]
                texts = {d["text"] for d in dets if d["text"]}
                if item.kind == "qr":
                    hits += bool(dets)
                    expected += len(item.texts)
                    read += sum(t in texts for t in item.texts)
                else:
                    fps += bool(dets)
    return {
        "ms": statistics.median(ms),
        "decode_ms": statistics.median(decode_ms),
        "qr_images_detected": hits,
        "negatives_with_detection": fps,
        "payloads_read": read,
        "payloads_expected": expected,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="?", default=DEFAULT_DATA)
    parser.add_argument("--upscale", type=float, default=4.0)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--passes", type=int, default=2, help="timing passes over the set")
    parser.add_argument("--limit", type=int, default=None, help="first N photos only")
    args = parser.parse_args(argv)
    items = load_manifest(args.data)[: args.limit]
    data = [enlarged(item.path, args.upscale, args.quality) for item in items]
    img = cv2.imdecode(cv2.imencode(".jpg", cv2.imread(str(items[0].path)))[1], 1)
    print(
        f"{len(items)} photos x{args.upscale:g} (e.g. {img.shape[1] * args.upscale:.0f}x"
        f"{img.shape[0] * args.upscale:.0f}), JPEG q{args.quality}, "
        f"mean {sum(map(len, data)) / len(data) / 1024:.0f} KiB",
        flush=True,
    )
    n_qr = sum(i.kind == "qr" for i in items)
    n_neg = len(items) - n_qr
    rows = {}
    for reduced in (False, True):
        r = measure(reduced, items, data, args.passes)
        rows[reduced] = r
        print(
            f"reduced_decode={str(reduced).lower():<5} {r['ms']:6.1f} ms/img "
            f"(decode {r['decode_ms']:5.1f} ms) | QR images detected "
            f"{r['qr_images_detected']}/{n_qr} | negatives with a detection "
            f"{r['negatives_with_detection']}/{n_neg} | payloads read "
            f"{r['payloads_read']}/{r['payloads_expected']}",
            flush=True,
        )
    print(
        f"speed-up {rows[False]['ms'] / rows[True]['ms']:.2f}x per image, "
        f"decode {rows[False]['decode_ms'] / rows[True]['decode_ms']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
