"""``make soak``: workers at about 80 % of their measured capacity, for a set time.

    python -m tests.chaos.soak [--minutes 5] [--load 0.8] [--workers 1] [--out runs/soak]

1. start a broker of its own (or use ``QRSIGHT_KAFKA_BOOTSTRAP``), fresh topics, and one
   pod (``qrsight-consumer``, the shipped detector and verifier, default settings);
2. measure capacity: publish a backlog of the mix and time its drain (images per second);
3. soak: publish the mix at ``--load`` x capacity for ``--minutes``: real photos from
   ``samples/``, generated QR scenes, and 10 % poison (tests/poison_corpus.py);
4. every 5 s sample throughput (results/s), lag (sent minus results) and the workers' RSS.

It passes when nothing is missing, no worker restarted, RSS grew < 5 % between the first
and the last minute after warm-up, and the lag stayed bounded (below 10 s of capacity, and
not rising over the run). It writes ``soak.png`` (throughput, lag, RSS over time) and
``soak.md`` (the figures) to ``--out``, and exits 1 when a criterion fails.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from core.runtime.settings import REPO_ROOT, Settings
from producer_tools.topics import create_topics
from schemas import names
from tests.chaos.harness import Message, Pod, Publisher, Tracker, log
from tests.integration.conftest import KAFKA_SH, _free_port
from tests.integration.kafka_topics import fresh_settings
from tests.poison_corpus import cases
from tests.unit.qr_factory import CodeSpec, scene

SAMPLE_S = 5.0
BAD_SHARE = 0.10
CAPACITY_IMAGES = 150
RSS_GROWTH_LIMIT = 0.05
LAG_LIMIT_S = 10.0  # lag must stay below this many seconds of capacity
# the poison whose point is the id itself: their results are keyed otherwise
ID_POISON = {"correlation-id-not-utf8", "correlation-id-100kb", "request-id-300-bytes"}


@dataclass
class Sample:
    t: float
    sent: int
    results: int
    lag: int
    rss_mb: float
    restarts: int


# --- input ------------------------------------------------------------------------------
def good_images(count: int = 24) -> list[bytes]:
    """The sample photos plus generated QR scenes (640 x 480, one to three codes)."""
    out = [p.read_bytes() for p in sorted((REPO_ROOT / "samples").glob("*.jpg"))]
    rng = np.random.default_rng(16)
    for i in range(count):
        specs = [
            CodeSpec(
                f"https://example.com/soak/{i}/{k}",
                (float(rng.uniform(120, 520)), float(rng.uniform(120, 360))),
                module_px=float(rng.uniform(2.5, 4.5)),
                angle=float(rng.uniform(-30, 30)),
            )
            for k in range(int(rng.integers(1, 3)))
        ]
        img, _ = scene(specs)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
        assert ok
        out.append(buf.tobytes())
    return out


def mix(settings: Settings) -> tuple[list[bytes], list[Message]]:
    bad = [
        (c.value, [(k, v) for k, v in c.headers if k != names.H_CORRELATION_ID])
        for c in cases(settings.topic_replies, settings.replies_partitions)
        if c.bad and c.name not in ID_POISON
    ]
    return good_images(), bad


def maker(good: list[bytes], bad: list[Message]) -> Callable[[int, str], Message]:
    every = round(1 / BAD_SHARE)

    def make(i: int, rid: str) -> Message:
        cid = [(names.H_CORRELATION_ID, rid.encode())]
        if i % every == every - 1:
            value, headers = bad[(i // every) % len(bad)]
            return value, [*headers, *cid]
        return good[i % len(good)], cid

    return make


# --- measuring ----------------------------------------------------------------------------
def rss_mb(pod: Pod) -> float:
    total = 0
    for pid in pod.workers():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def results(tracker: Tracker, ids: list[str]) -> int:
    with tracker._lock:
        return sum(1 for rid in ids if rid in tracker.arrivals)


def measure_capacity(
    settings: Settings, tracker: Tracker, make: Callable[[int, str], Message]
) -> float:
    publisher = Publisher(settings, CAPACITY_IMAGES, 10_000, "capacity", make)
    publisher.start()
    publisher.join(120)
    assert tracker.wait_for(publisher.ids, 600, linger_s=0), "capacity run did not drain"
    with tracker._lock:
        firsts = sorted(min(tracker.arrivals[rid]) for rid in publisher.ids)
    # from the 10th result on: the first ones include the workers' warm-up
    span = firsts[-1] - firsts[9]
    return (len(firsts) - 10) / span


def sampler(
    pod: Pod, tracker: Tracker, publisher: Publisher, stop: threading.Event
) -> list[Sample]:
    samples: list[Sample] = []
    started = time.monotonic()

    def loop() -> None:
        while not stop.wait(SAMPLE_S):
            done = results(tracker, publisher.ids)
            samples.append(
                Sample(
                    time.monotonic() - started,
                    publisher.sent,
                    done,
                    publisher.sent - done,
                    rss_mb(pod),
                    pod.restarts(),
                )
            )
            s = samples[-1]
            log(f"t={s.t:.0f}s sent={s.sent} results={s.results} lag={s.lag} rss={s.rss_mb:.0f}MB")

    threading.Thread(target=loop, daemon=True).start()
    return samples


# --- verdict and plot ---------------------------------------------------------------------
def verdict(samples: list[Sample], capacity: float, missing: int, warmup_s: float) -> dict:
    steady = [s for s in samples if s.t >= warmup_s]
    window = max(int(60 / SAMPLE_S), 2)
    first, last = steady[:window], steady[-window:]
    rss_first = statistics.median(s.rss_mb for s in first)
    rss_last = statistics.median(s.rss_mb for s in last)
    growth = (rss_last - rss_first) / rss_first
    lag_limit = capacity * LAG_LIMIT_S
    max_lag = max(s.lag for s in steady)
    lag_first = statistics.mean(s.lag for s in first)
    lag_last = statistics.mean(s.lag for s in last)
    figures = {
        "capacity_img_s": round(capacity, 1),
        "rss_first_minute_mb": round(rss_first, 1),
        "rss_last_minute_mb": round(rss_last, 1),
        "rss_growth_pct": round(100 * growth, 2),
        "max_lag": max_lag,
        "lag_limit": round(lag_limit),
        "mean_lag_first_minute": round(lag_first, 1),
        "mean_lag_last_minute": round(lag_last, 1),
        "missing": missing,
        "restarts": samples[-1].restarts,
    }
    checks = {
        "nothing missing": missing == 0,
        "no worker restart": samples[-1].restarts == 0,
        f"RSS growth after warm-up < {100 * RSS_GROWTH_LIMIT:.0f} %": growth < RSS_GROWTH_LIMIT,
        f"lag below {LAG_LIMIT_S:.0f} s of capacity": max_lag < lag_limit,
        "lag not rising": lag_last <= max(2 * lag_first, capacity * 2),
    }
    return {"figures": figures, "checks": checks}


def plot(samples: list[Sample], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t / 60 for s in samples]
    rate = [0.0] + [(b.results - a.results) / (b.t - a.t) for a, b in itertools.pairwise(samples)]
    sent = [0.0] + [(b.sent - a.sent) / (b.t - a.t) for a, b in itertools.pairwise(samples)]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(t, sent, label="sent", color="0.6")
    axes[0].plot(t, rate, label="results")
    axes[0].set_ylabel("images / s")
    axes[0].legend(loc="lower right")
    axes[1].plot(t, [s.lag for s in samples], color="tab:orange")
    axes[1].set_ylabel("lag (images)")
    axes[2].plot(t, [s.rss_mb for s in samples], color="tab:green")
    axes[2].set_ylim(0, 1.2 * max(s.rss_mb for s in samples))
    axes[2].set_ylabel("worker RSS (MB)")
    axes[2].set_xlabel("minutes")
    fig.suptitle(title)
    fig.tight_layout()
    path = out / "soak.png"
    fig.savefig(path, dpi=110)
    return path


# --- the run ------------------------------------------------------------------------------
def broker(workdir: Path) -> tuple[str, dict[str, str] | None]:
    external = os.environ.get("QRSIGHT_KAFKA_BOOTSTRAP")
    if external:
        return external, None
    env = {**os.environ, "KAFKA_HOME_DIR": str(workdir / "kafka")}
    env["QRSIGHT_KAFKA_PORT"] = str(_free_port())
    env.pop("KAFKA_CONTROLLER_PORT", None)
    log("starting a broker of its own")
    subprocess.run([str(KAFKA_SH), "up"], env=env, check=True, capture_output=True, timeout=600)
    return f"127.0.0.1:{env['QRSIGHT_KAFKA_PORT']}", env


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="qrsight-soak-"))
    bootstrap, kafka_env = broker(workdir)
    try:
        base = fresh_settings(bootstrap, uuid.uuid4().hex[:8], topic_partitions=6)
        create_topics(base)
        settings = base.model_copy(update={"metrics_port": 0, "state_dir": workdir / "state"})
        good, bad = mix(settings)
        make = maker(good, bad)
        tracker = Tracker(settings)
        tracker.start()
        pod = Pod(settings, "soak", args.workers, out)
        pod.wait_ready(args.workers, timeout_s=180)
        capacity = measure_capacity(settings, tracker, make)
        rate = args.load * capacity
        count = int(rate * args.minutes * 60)
        log(f"capacity {capacity:.1f} img/s; soaking at {rate:.1f} img/s for {args.minutes} min")
        publisher = Publisher(settings, count, rate, "soak", make)
        stop = threading.Event()
        samples = sampler(pod, tracker, publisher, stop)
        publisher.start()
        publisher.join(args.minutes * 60 + 600)
        drained = tracker.wait_for(publisher.ids, 300, linger_s=SAMPLE_S)
        stop.set()
        missing = len(publisher.ids) - results(tracker, publisher.ids)
        tracker.stop()
        pod.stop()
        warmup = (
            max(60.0, 0.2 * args.minutes * 60) if args.minutes >= 3 else 0.3 * args.minutes * 60
        )
        report = verdict(samples, capacity, missing, warmup)
        report["figures"].update(
            {
                "minutes": args.minutes,
                "load": args.load,
                "rate_img_s": round(rate, 1),
                "images": count,
                "bad_share": BAD_SHARE,
                "workers": args.workers,
                "drained": drained,
            }
        )
        title = (
            f"qrsight soak: {args.minutes} min at {rate:.1f} img/s "
            f"({100 * args.load:.0f} % of {capacity:.1f}), {100 * BAD_SHARE:.0f} % poison"
        )
        png = plot(samples, out, title)
        write_report(out, report, samples, png)
        return 0 if all(report["checks"].values()) else 1
    finally:
        if kafka_env is not None:
            subprocess.run([str(KAFKA_SH), "down"], env=kafka_env, capture_output=True, check=False)


def write_report(out: Path, report: dict, samples: list[Sample], png: Path) -> None:
    lines = ["| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["figures"].items()]
    lines += ["", "| check | passed |", "|---|---|"]
    lines += [f"| {k} | {'yes' if v else 'NO'} |" for k, v in report["checks"].items()]
    text = "\n".join(lines)
    (out / "soak.md").write_text(text + f"\n\nplot: {png.name}\n", encoding="utf-8")
    (out / "soak.json").write_text(
        json.dumps({**report, "samples": [asdict(s) for s in samples]}, indent=1), "utf-8"
    )
    print(text)
    print(f"plot: {png}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--load", type=float, default=0.8, help="share of measured capacity")
    parser.add_argument("--workers", type=int, default=1, help="worker processes in the pod")
    parser.add_argument("--out", default="runs/soak")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
