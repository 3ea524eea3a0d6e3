"""Peak RSS of one API process under N concurrent uploads of the largest allowed image.

    python -m bench.api_upload_rss [--uploads 32] [--rounds 3] [--multipart]

Starts, on fresh topics of a real broker (``QRSIGHT_KAFKA_BOOTSTRAP`` if set, else one of
its own), the API under gunicorn with one worker process and no detection worker, so
every upload is read, checked, encoded, produced to Kafka and then waits for a reply
that does not come (504 after ``--timeout-ms``): the most an upload ever holds. Each
round sends ``--uploads`` images of just under ``QRSIGHT_MAX_IMAGE_BYTES`` (PNG noise,
10 MiB by default) at once, each on its own connection, after resetting the process's
peak-RSS mark (``/proc/PID/clear_refs``).

Prints the idle RSS, the peak RSS (``VmHWM``) of each round, the RSS once the round is
over, and the ratio of the peak growth to the bytes uploaded in the round (1.0 = the
process held every upload at once; the design holds each at most briefly). The baseline,
measured in the same run, is the same API with glibc's malloc defaults
(``QRSIGHT_API_MALLOC_TUNING=false``): the last line gives the ratios of the two.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import requests

from tests.integration.api_stack import broker, make_stack

REPO = Path(__file__).resolve().parent.parent

MIB = 1024 * 1024


def noise_png(max_bytes: int) -> bytes:
    """A valid PNG of random pixels just under ``max_bytes`` (noise does not compress)."""
    side = int((max_bytes / 3) ** 0.5) - 8
    rng = np.random.default_rng(7)
    while True:
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        ok, buf = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        assert ok
        if len(buf) <= max_bytes:
            return buf.tobytes()
        side -= 16


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def upload(url: str, image: bytes, multipart: bool, timeout_ms: int) -> str:
    target = f"{url}/api/v1/detect?timeout_ms={timeout_ms}"
    if multipart:
        response = requests.post(target, files={"image": ("n.png", image, "image/png")}, timeout=60)
    else:
        response = requests.post(
            target, data=image, headers={"Content-Type": "image/png"}, timeout=60
        )
    if response.status_code == 200:
        return "200"
    return f"{response.status_code} {response.json()['error']['code']}"


def run_rounds(
    bootstrap: str, image: bytes, args: argparse.Namespace, tuned: bool
) -> tuple[float, float]:
    """(max peak RSS, RSS after the last round) in MiB, over ``args.rounds`` rounds."""
    max_bytes = int(args.max_image_mib * MIB)
    peaks, after = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        stack = make_stack(
            bootstrap,
            Path(tmp),
            api_workers=1,
            detection_workers=0,
            api_threads=args.uploads + 8,
            api_max_in_flight=args.uploads,
            max_image_bytes=max_bytes,
            api_produce_timeout_ms=args.produce_timeout_ms,
            api_malloc_tuning=tuned,
            rate_limit="off",
            log_level="WARNING",
        )
        try:
            (pid,) = stack.api_worker_pids()
            # one upload first: imports, librdkafka buffers and the first arena are warm
            upload(stack.url, image, args.multipart, 200)
            time.sleep(1)
            idle = status_kb(pid, "VmRSS") / 1024
            print(f"idle RSS {idle:.0f} MiB (pid {pid})")
            for round_no in range(1, args.rounds + 1):
                reset_peak(pid)
                started = time.perf_counter()
                with ThreadPoolExecutor(args.uploads) as pool:
                    statuses = list(
                        pool.map(
                            lambda _: upload(stack.url, image, args.multipart, args.timeout_ms),
                            range(args.uploads),
                        )
                    )
                took = time.perf_counter() - started
                peak = status_kb(pid, "VmHWM") / 1024
                time.sleep(1)
                after = status_kb(pid, "VmRSS") / 1024
                peaks.append(peak)
                uploaded = args.uploads * len(image) / MIB
                counts = {s: statuses.count(s) for s in sorted(set(statuses))}
                print(
                    f"round {round_no}: {counts} in {took:.1f} s; peak RSS {peak:.0f} MiB "
                    f"(+{peak - idle:.0f} over idle, {(peak - idle) / uploaded:.2f} of the "
                    f"{uploaded:.0f} MiB uploaded); RSS after {after:.0f} MiB"
                )
        finally:
            stack.stop()
    return max(peaks), after


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=32, help="concurrent uploads per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-image-mib", type=float, default=10.0)
    parser.add_argument("--timeout-ms", type=int, default=3000, help="reply wait per upload")
    parser.add_argument(
        "--produce-timeout-ms", type=int, default=10000, help="QRSIGHT_API_PRODUCE_TIMEOUT_MS"
    )
    parser.add_argument("--multipart", action="store_true", help="multipart/form-data uploads")
    args = parser.parse_args(argv)
    image = noise_png(int(args.max_image_mib * MIB))
    print(f"image: {len(image) / MIB:.2f} MiB PNG; {args.uploads} concurrent uploads per round")
    results = {}
    with broker() as bootstrap:
        for label, tuned in (("glibc defaults", False), ("tuned malloc", True)):
            print(f"--- {label} (QRSIGHT_API_MALLOC_TUNING={tuned})")
            results[label] = run_rounds(bootstrap, image, args, tuned)
    base, tuned = results["glibc defaults"], results["tuned malloc"]
    print(
        f"max peak RSS: {tuned[0]:.0f} MiB tuned vs {base[0]:.0f} MiB with glibc defaults "
        f"(ratio {tuned[0] / base[0]:.2f}); RSS after the last round: {tuned[1]:.0f} vs "
        f"{base[1]:.0f} MiB (ratio {tuned[1] / base[1]:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
