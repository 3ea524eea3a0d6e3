"""API soak: mixed good and bad traffic for a while; memory, waiters and metric files must
stay flat.

    make soak-api [SOAK_API_S=300]      # = python -m tests.chaos.soak_api --duration 300

Starts, on fresh topics of a real broker (``QRSIGHT_KAFKA_BOOTSTRAP`` if set, else one of
its own), one detection worker and the API under gunicorn (2 worker processes, auth on, a
per-client rate limit, a small in-flight cap), then runs client threads for ``--duration``
seconds, each sending one kind of request over and over (the bursts fill the in-flight
cap now and then, so any request that gets past auth may also meet 503 ``overloaded``):

=========== ================================================ =================
kind        request                                          expected answer
=========== ================================================ =================
ok          a QR image with a valid token                    200
corrupt     a truncated PNG with a valid token               400
no-token    a QR image without a token / with a bad one      401
too-large   a body over ``QRSIGHT_MAX_IMAGE_BYTES``          413
greedy      one subject sending faster than its limit        200, then 429
burst       18 uploads at once every few seconds, past the   200 or 503
            in-flight cap (6 per process)
too-short   ``timeout_ms=1``: no reply can come in time      504
=========== ================================================ =================

Every second it samples each gunicorn worker's RSS, the number of files in the
Prometheus multiprocess directory and the reply waiters. It fails (exit 1) when an answer
is outside the table (a 500, a 503 other than ``overloaded``), when RSS grows by 5 % or
more between the first and the last fifth of the time after warm-up, when a waiter is left
once the clients stop, or when the metric files keep growing. It writes ``soak.png``
(p50/p99 latency of the 200s, answers per second by status, RSS over time),
``samples.json``, ``summary.txt`` and the API's and the worker's logs to ``--out``
(default ``runs/soak-api/<time>/``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests

from core.runtime.settings import REPO_ROOT
from tests.integration.api_stack import (
    SECRET,
    Stack,
    broker,
    make_stack,
    metric,
    qr_png,
    token,
    warm_up,
)

# 503 is always "overloaded" (the in-flight cap, which the bursts fill now and then)
EXPECTED = {
    "ok": {200, 503},
    "corrupt": {400, 503},
    "no-token": {401},
    "too-large": {413},
    "greedy": {200, 429, 503},
    "burst-member": {200, 503},
    "too-short": {504, 503},
}
KINDS = ["ok", "corrupt", "no-token", "too-large", "greedy", "burst", "too-short"]
RATE_LIMIT_PER_MINUTE = 240  # an "ok" client sends at most 200/minute
GREEDY_THREADS = 3  # one subject, no pause: past the limit
IN_FLIGHT_CAP = 6
MAX_IMAGE_BYTES = 2_000_000
GROWTH_LIMIT = 0.05


@dataclass
class Answer:
    at: float
    kind: str
    status: int
    code: str
    ms: float


@dataclass
class Sample:
    at: float
    rss_mib: dict[str, float]
    metric_files: int
    waiters: float


@dataclass
class Run:
    answers: list[Answer] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, answer: Answer) -> None:
        with self.lock:
            self.answers.append(answer)


def payloads() -> dict[str, bytes]:
    good = [qr_png(f"soak-{i}")[0] for i in range(4)]
    return {
        "good0": good[0],
        "good1": good[1],
        "good2": good[2],
        "good3": good[3],
        "corrupt": good[0][: len(good[0]) // 2],
        "too-large": b"\x89PNG\r\n\x1a\n" + b"\x00" * (MAX_IMAGE_BYTES + 100_000),
    }


class Client:
    """One client thread of one kind."""

    def __init__(self, stack: Stack, kind: str, images: dict[str, bytes], run: Run, n: int):
        self.stack, self.kind, self.images, self.run, self.n = stack, kind, images, run, n
        self.session = requests.Session()
        self.rng = random.Random(f"{kind}-{n}")
        self.auth = token("greedy" if kind == "greedy" else f"{kind}-{n}", SECRET)
        self.burst = (
            [Client(stack, "burst-member", images, run, i) for i in range(IN_FLIGHT_CAP * 3)]
            if kind == "burst"
            else []
        )

    def post(self, data: bytes, headers: dict[str, str], query: str = "") -> int:
        started = time.monotonic()
        code = "-"
        # a burst member opens a fresh connection each time: an idle kept-alive one may be
        # closed by the server (gunicorn's keepalive) just as the next burst reuses it
        poster = requests.post if self.kind == "burst-member" else self.session.post
        try:
            response = poster(
                f"{self.stack.url}/api/v1/detect{query}",
                data=data,
                headers={"Content-Type": "image/png", **headers},
                timeout=60,
            )
            status = response.status_code
            if status >= 400:
                code = str(response.json()["error"]["code"])
        except (requests.RequestException, ValueError, KeyError) as exc:
            status, code = 0, type(exc).__name__  # outside the table: fails the run
        elapsed = (time.monotonic() - started) * 1000
        self.run.add(Answer(time.time(), self.kind, status, code, elapsed))
        return status

    def good(self) -> bytes:
        return self.images[f"good{self.rng.randrange(4)}"]

    def once(self) -> None:
        match self.kind:
            case "ok" | "greedy":
                self.post(self.good(), self.auth)
            case "corrupt":
                self.post(self.images["corrupt"], self.auth)
            case "no-token":
                bad = {} if self.rng.random() < 0.5 else {"Authorization": "Bearer a.b.c"}
                self.post(self.good(), bad)
            case "too-large":
                self.post(self.images["too-large"], self.auth)
            case "too-short":
                self.post(self.good(), self.auth, "?timeout_ms=1")
            case "burst":
                # each burst request on its own connection, as its own client
                with ThreadPoolExecutor(len(self.burst)) as pool:
                    for client in self.burst:
                        pool.submit(client.post, self.good(), client.auth)

    def pause(self) -> float:
        return {"greedy": 0.02, "burst": 3.0, "too-large": 1.0}.get(self.kind, 0.3)

    def loop(self, until: float) -> None:
        while time.time() < until:
            self.once()
            time.sleep(self.pause() * self.rng.uniform(0.5, 1.5))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def sampler(stack: Stack, run: Run, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        try:
            waiters = metric(stack.metrics(), "qrsight_api_reply_waiters")
        except requests.RequestException:
            waiters = float("nan")
        run.samples.append(
            Sample(
                time.time(),
                {str(pid): rss_mib(pid) for pid in stack.api_worker_pids()},
                len(list(stack.metrics_dir.glob("*.db"))),
                waiters,
            )
        )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def rss_total(sample: Sample) -> float:
    return sum(sample.rss_mib.values())


def verdict(run: Run, start: float, warm: float, end: float, waiters_left: float) -> list[str]:
    """What went wrong (empty when the soak passed)."""
    problems = []
    by_kind: dict[str, Counter[int]] = defaultdict(Counter)
    for answer in run.answers:
        by_kind[answer.kind][answer.status] += 1
    for kind, statuses in sorted(by_kind.items()):
        wrong = {s: n for s, n in statuses.items() if s not in EXPECTED[kind]}
        if wrong:
            codes = Counter(a.code for a in run.answers if a.kind == kind and a.status in wrong)
            problems.append(f"{kind}: unexpected statuses {wrong} ({dict(codes)})")
    codes_503 = Counter(a.code for a in run.answers if a.status == 503)
    if set(codes_503) - {"overloaded"}:
        problems.append(f"503s other than overloaded: {dict(codes_503)}")
    seen = {a.status for a in run.answers}
    missing = sorted(set().union(*EXPECTED.values()) - seen)
    if missing:
        problems.append(f"statuses never seen: {missing}")
    steady = [s for s in run.samples if s.at >= warm]
    if len(steady) >= 10:
        fifth = max(2, len(steady) // 5)
        first = statistics.mean(rss_total(s) for s in steady[:fifth])
        last = statistics.mean(rss_total(s) for s in steady[-fifth:])
        if (last - first) / first >= GROWTH_LIMIT:
            problems.append(
                f"RSS grew {100 * (last - first) / first:.1f} % ({first:.0f} -> {last:.0f} MiB)"
            )
        files = [s.metric_files for s in steady]
        if files[-1] > files[0]:
            problems.append(f"metric files grew from {files[0]} to {files[-1]}")
    else:
        problems.append("too few samples after warm-up: run longer")
    if waiters_left != 0:
        problems.append(f"{waiters_left} reply waiters left after the clients stopped")
    return problems


def report(run: Run, start: float, warm: float, problems: list[str], waiters_left: float) -> str:
    counts = Counter((a.kind, a.status) for a in run.answers)
    lines = [
        f"{len(run.answers)} answers in {run.answers[-1].at - start:.0f} s"
        if run.answers
        else "no answers"
    ]
    lines += [f"  {kind:<10} {status}: {n}" for (kind, status), n in sorted(counts.items())]
    ok_ms = [a.ms for a in run.answers if a.status == 200 and a.at >= warm]
    if ok_ms:
        p50, p99 = percentile(ok_ms, 0.5), percentile(ok_ms, 0.99)
        lines.append(f"200 latency after warm-up: p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    steady = [s for s in run.samples if s.at >= warm]
    if steady:
        first, last = rss_total(steady[0]), rss_total(steady[-1])
        top = max(rss_total(s) for s in steady)
        lines.append(
            f"RSS of the API workers after warm-up: {first:.0f} -> {last:.0f} MiB (max {top:.0f}); "
            f"metric files {steady[0].metric_files} -> {steady[-1].metric_files}; "
            f"reply waiters left at the end: {waiters_left:g}"
        )
    lines.append("PASS" if not problems else "FAIL: " + "; ".join(problems))
    return "\n".join(lines)


def plot(run: Run, start: float, warm: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_second: dict[int, list[float]] = defaultdict(list)
    for a in run.answers:
        if a.status == 200:
            per_second[int(a.at - start)].append(a.ms)
    seconds = sorted(per_second)
    rates: dict[int, Counter[int]] = defaultdict(Counter)
    for a in run.answers:
        rates[a.status][int(a.at - start)] += 1
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    top.plot(seconds, [percentile(per_second[s], 0.5) for s in seconds], label="p50")
    top.plot(seconds, [percentile(per_second[s], 0.99) for s in seconds], label="p99")
    top.set_ylabel("200 latency (ms)")
    top.set_yscale("log")
    top.legend()
    last = int(max(a.at for a in run.answers) - start) if run.answers else 0
    for status, per in sorted(rates.items()):  # a second without such an answer: a gap
        xs = list(range(last + 1))
        ys = [per[x] if per[x] else float("nan") for x in xs]
        middle.plot(xs, ys, label=str(status), linewidth=0.8)
    middle.set_ylabel("answers / s")
    middle.set_yscale("log")
    middle.legend(ncol=7, fontsize="small")
    pids = sorted({pid for s in run.samples for pid in s.rss_mib})
    for pid in pids:
        points = [(s.at - start, s.rss_mib[pid]) for s in run.samples if pid in s.rss_mib]
        bottom.plot([p[0] for p in points], [p[1] for p in points], label=f"API worker {pid}")
    bottom.set_ylabel("RSS (MiB)")
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("seconds")
    bottom.legend()
    for axis in (top, middle, bottom):
        axis.axvline(warm - start, color="grey", linestyle=":")
    fig.suptitle("qrsight API soak: mixed 200/400/401/413/429/503/504 traffic")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def soak(stack: Stack, duration: float, warmup: float, out: Path) -> int:
    images = payloads()
    run = Run()
    start = time.time()
    warm = start + warmup
    until = start + duration
    stop = threading.Event()
    watcher = threading.Thread(target=sampler, args=(stack, run, stop), daemon=True)
    watcher.start()
    copies = {"ok": 2, "greedy": GREEDY_THREADS}
    clients = [
        Client(stack, kind, images, run, n) for kind in KINDS for n in range(copies.get(kind, 1))
    ]
    with ThreadPoolExecutor(len(clients)) as pool:
        for client in clients:
            pool.submit(client.loop, until)
        next_report = start + 30
        while time.time() < until:
            time.sleep(1)
            if time.time() >= next_report:
                next_report += 30
                print(f"  {time.time() - start:.0f} s: {len(run.answers)} answers", flush=True)
    time.sleep(2)  # the last replies and their metric updates
    stop.set()
    watcher.join()
    waiters_left = metric(stack.metrics(), "qrsight_api_reply_waiters")
    problems = verdict(run, start, warm, until, waiters_left)
    text = report(run, start, warm, problems, waiters_left)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.txt").write_text(text + "\n")
    (out / "samples.json").write_text(
        json.dumps(
            {
                "answers": [asdict(a) for a in run.answers],
                "samples": [asdict(s) for s in run.samples],
            }
        )
    )
    plot(run, start, warm, out / "soak.png")
    print(text)
    print(f"plot: {out / 'soak.png'}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of traffic")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds left out (default: a fifth, at least 10)",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "runs" / "soak-api" / time.strftime("%Y%m%d-%H%M%S")
    )
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else max(10.0, args.duration / 5)
    print(
        f"API soak: {args.duration:.0f} s (warm-up {warmup:.0f} s), results in {args.out}",
        flush=True,
    )
    with broker() as bootstrap, tempfile.TemporaryDirectory(prefix="qrsight-soak-") as tmp:
        stack = make_stack(
            bootstrap,
            Path(tmp),
            api_workers=2,
            detection_workers=1,
            api_threads=16,
            api_max_in_flight=IN_FLIGHT_CAP,
            max_image_bytes=MAX_IMAGE_BYTES,
            auth_enabled=True,
            auth_jwt_secret=SECRET,
            rate_limit=f"{RATE_LIMIT_PER_MINUTE}/minute",
            log_level="WARNING",
        )
        try:
            warm_up(stack, token("warm-up", SECRET))
            return soak(stack, args.duration, warmup, args.out)
        finally:
            stack.stop()
            args.out.mkdir(parents=True, exist_ok=True)
            for log in (stack.api_log, stack.workers_log):
                if log is not None and log.exists():
                    shutil.copy(log, args.out / f"{log.name.split('-')[0]}.log")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
