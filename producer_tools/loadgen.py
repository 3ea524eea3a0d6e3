"""``qrsight-loadgen``: publish a steady stream of images to ``qr.images`` for load tests.

Images are variations (crop, scale, JPEG quality) of the files given, made up front
and reused, so the generator itself costs almost nothing per image. It reports the
achieved rate every few seconds; pair it with ``qrsight-results`` or the metrics.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

import cv2
import numpy as np

from core.runtime.errors import QrsightError
from core.runtime.logs import configure_from_settings
from core.runtime.settings import REPO_ROOT, load_settings
from core.runtime.telemetry import setup_tracing
from producer_tools.publish import Item, Publisher, expand

REPORT_EVERY_S = 5.0


def variations(paths: list[str], count: int, seed: int) -> list[bytes]:
    """``count`` JPEGs made from the images at ``paths`` (random crop, scale and quality)."""
    rng = np.random.default_rng(seed)
    images = [img for p in paths if (img := cv2.imread(p, cv2.IMREAD_COLOR)) is not None]
    if not images:
        raise FileNotFoundError(f"no readable image among {paths}")
    out = []
    for i in range(count):
        img = images[i % len(images)]
        h, w = img.shape[:2]
        cut = rng.uniform(0.0, 0.1, size=4)
        y0, y1 = int(h * cut[0]), h - int(h * cut[1])
        x0, x1 = int(w * cut[2]), w - int(w * cut[3])
        scale = rng.uniform(0.6, 1.0)
        crop = cv2.resize(img[y0:y1, x0:x1], None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        quality = int(rng.integers(70, 95))
        ok, jpeg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok:
            out.append(jpeg.tobytes())
    return out


def stream(images: list[bytes], total: int | None) -> Iterator[Item]:
    i = 0
    while total is None or i < total:
        yield Item(f"loadgen/{i % len(images)}", images[i % len(images)])
        i += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qrsight-loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", default=[str(REPO_ROOT / "samples")])
    parser.add_argument("--rate", type=float, default=50.0, help="images per second")
    parser.add_argument("--count", type=int, help="stop after this many images")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--variants", type=int, default=64, help="distinct images to cycle through")
    parser.add_argument("--raw", action="store_true", help="send raw bytes, not Avro")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        configure_from_settings(settings, "WARNING")
        setup_tracing("qrsight-loadgen")
        images = variations(list(expand(args.inputs)), args.variants, args.seed)
        publisher = Publisher(settings, raw=args.raw, source=None)
    except (QrsightError, FileNotFoundError) as exc:
        print(f"qrsight-loadgen: {exc}", file=sys.stderr)
        return 2
    started = last = time.monotonic()
    sent_at_last = 0
    try:
        for n, item in enumerate(stream(images, args.count)):
            now = time.monotonic()
            if args.duration is not None and now - started >= args.duration:
                break
            delay = started + n / args.rate - now
            if delay > 0:
                time.sleep(delay)
            publisher.publish(item)
            if now - last >= REPORT_EVERY_S:
                rate = (publisher.sent - sent_at_last) / (now - last)
                print(
                    f"sent={publisher.sent} rate={rate:.1f}/s delivered={publisher.delivered} "
                    f"failed={len(publisher.failures)}",
                    file=sys.stderr,
                    flush=True,
                )
                last, sent_at_last = now, publisher.sent
    except KeyboardInterrupt:
        pass
    finally:
        left = publisher.flush()
    elapsed = time.monotonic() - started
    print(
        f"done sent={publisher.sent} delivered={publisher.delivered} "
        f"failed={len(publisher.failures)} undelivered={left} "
        f"rate={publisher.sent / max(elapsed, 1e-9):.1f}/s",
        file=sys.stderr,
    )
    return 1 if publisher.failures or left else 0


if __name__ == "__main__":
    raise SystemExit(main())
