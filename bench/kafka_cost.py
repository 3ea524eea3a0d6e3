"""What the Kafka path costs per image, and what a configuration change saves: variants of
the broker (JVM flags, server properties) and of the clients compared in one run.

    python -m bench.kafka_cost [--variants before,shipped] [--rev main] [--concurrency 8,1]
                               [--rounds 3] [--duration 20] [--warm 60] [--images DIR]

Each variant is a whole qrsight stack as `make up` runs it (``bench/serving.py``: API
under gunicorn, the workers, a broker of its own started by ``deploy/local/kafka.sh``),
driven closed-loop by the same load generator. Every stack and broker is started first
and warmed up under load (``--warm`` seconds each: models loaded, partitions assigned,
most of the broker's JIT compilation done); then, round after round, each variant is
measured in turn at every concurrency (the order rotates each round), so a busy machine
spreads its noise over all variants alike. Reported per variant: img/s, p50/p99, and the
CPU milliseconds per image of the broker (split by its threads: request handling,
JIT compiler, GC, group coordinator, other), the API, the workers and the load
generator, from ``/proc``; the median of the rounds with every round's value.

Variants (``--variants``, comma-separated; see ``VARIANTS``): ``shipped`` is this
checkout as it is; ``before`` starts the broker with the settings it had before the
small-host tuning (Kafka's default thread counts, G1 with tiered compilation);
``--rev REV`` adds a variant running *the code and broker settings of git revision REV*
(``git archive`` into ``runs/kafka-cost/REV``), for a before/after of client changes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import serving

ROOT = Path(__file__).resolve().parent.parent

CLK_TCK = os.sysconf("SC_CLK_TCK")
# Java thread names (the kernel keeps their first 15 characters) → what they do.
THREAD_KINDS = (
    ("requests", ("data-plane-kafk", "kafka-request-h")),
    ("jit", ("C1 CompilerThre", "C2 CompilerThre")),
    ("gc", ("GC Thread", "G1 ", "VM Thread", "VM Periodic")),
    ("coordinator", ("group-coordinat", "transaction-", "TxnMarkerSender")),
)
ROLES = ("broker", "api", "workers", "client")


@dataclass(frozen=True)
class Variant:
    """A stack to compare: broker environment for kafka.sh, qrsight settings, code root."""

    name: str
    broker_env: dict[str, str] = field(default_factory=dict)
    client_env: dict[str, str] = field(default_factory=dict)
    root: Path = ROOT
    about: str = ""


# The broker as deploy/local/kafka.sh started it before the small-host tuning.
BEFORE_BROKER = {
    "KAFKA_JVM_PERFORMANCE_OPTS": "-XX:+UseG1GC -XX:MaxGCPauseMillis=20",
    "KAFKA_OVERRIDES": "num.network.threads=3 num.io.threads=8",
}
VARIANTS = {
    "shipped": Variant("shipped", about="this checkout as it is"),
    "before": Variant("before", BEFORE_BROKER, about="broker: Kafka's thread defaults, G1"),
    "threads": Variant(
        "threads",
        {**BEFORE_BROKER, "KAFKA_OVERRIDES": "num.network.threads=1 num.io.threads=2"},
        about="broker: 1 network + 2 I/O threads, G1",
    ),
    "c1": Variant(
        "c1",
        {
            "KAFKA_JVM_PERFORMANCE_OPTS": "-XX:+UseG1GC -XX:MaxGCPauseMillis=20 "
            "-XX:TieredStopAtLevel=1",
            "KAFKA_OVERRIDES": BEFORE_BROKER["KAFKA_OVERRIDES"],
        },
        about="broker: C1 JIT only",
    ),
    "serial": Variant(
        "serial",
        {**BEFORE_BROKER, "KAFKA_JVM_PERFORMANCE_OPTS": "-XX:+UseSerialGC"},
        about="broker: serial GC",
    ),
    "small": Variant(
        "small",
        {
            "KAFKA_JVM_PERFORMANCE_OPTS": "-XX:+UseSerialGC",
            "KAFKA_OVERRIDES": "num.network.threads=1 num.io.threads=2",
        },
        about="broker: serial GC, 1 network + 2 I/O threads",
    ),
    "small-sockbuf": Variant(
        "small-sockbuf",
        {
            "KAFKA_JVM_PERFORMANCE_OPTS": "-XX:+UseSerialGC",
            "KAFKA_OVERRIDES": "num.network.threads=1 num.io.threads=2 "
            "socket.receive.buffer.bytes=-1 socket.send.buffer.bytes=-1",
        },
        about="broker: small + the OS's socket buffer autotuning",
    ),
    "nagle-off": Variant(
        "nagle-off",
        client_env={"QRSIGHT_KAFKA__SOCKET_NAGLE_DISABLE": "true"},
        about="clients: socket.nagle.disable=true",
    ),
    "parallel": Variant(
        "parallel",
        {
            "KAFKA_JVM_PERFORMANCE_OPTS": "-XX:+UseParallelGC",
            "KAFKA_OVERRIDES": "num.network.threads=1 num.io.threads=2",
        },
        about="broker: parallel GC, 1 network + 2 I/O threads",
    ),
}


def thread_kind(name: str) -> str:
    for kind, prefixes in THREAD_KINDS:
        if name.startswith(prefixes):
            return kind
    return "other"


def broker_threads(pid: int) -> dict[str, float]:
    """CPU seconds so far of one process's threads, summed by :data:`THREAD_KINDS`."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            name = stat[stat.find(b"(") + 1 : stat.rfind(b")")].decode(errors="replace")
            fields = stat[stat.rfind(b")") + 2 :].split()
            kind = thread_kind(name)
            out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def revision_root(rev: str) -> Path:
    """The files of git revision ``rev`` in ``runs/kafka-cost/<rev>`` (the jars are shared)."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    dest = ROOT / "runs" / "kafka-cost" / f"rev-{sha}"
    if not (dest / "deploy" / "local" / "kafka.sh").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", "--format=tar", sha], cwd=ROOT, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


@dataclass
class Running:
    variant: Variant
    url: str
    roots: dict[str, list[int]]
    broker_pid: int


@contextlib.contextmanager
def start(variant: Variant, model: serving.Model, logs: Path) -> Iterator[Running]:
    with (
        serving.broker(variant.broker_env, variant.root) as (bootstrap, pids),
        serving.qrsight(
            model,
            bootstrap,
            logs,
            root=variant.root,
            env_extra=variant.client_env,
            name=variant.name,
        ) as (url, roots, _workers),
    ):
        roots["broker"] = pids
        yield Running(variant, url, roots, pids[0])


def measure(run: Running, images: Sequence[serving.Image], c: int, seconds: float) -> dict:
    threads0 = broker_threads(run.broker_pid)
    level = serving.closed_loop(
        run.url, images, c, duration_s=seconds, roots=run.roots, design=run.variant.name
    )
    threads1 = broker_threads(run.broker_pid)
    n = max(level.images, 1)
    kinds = {k: (threads1.get(k, 0.0) - threads0.get(k, 0.0)) / n for k in threads1}
    return {
        "img_s": level.img_s,
        "p50_ms": level.p50_ms,
        "p99_ms": level.p99_ms,
        "errors": level.errors,
        "cpu_ms": {k: v * 1000 for k, v in level.cpu_s_per_image.items()},
        "broker_ms": {k: v * 1000 for k, v in kinds.items()},
        "load": os.getloadavg()[0],
    }


def idle(run: Running, seconds: float) -> dict[str, float]:
    """CPU milliseconds per second of each role while nothing is sent (polls, heartbeats)."""
    cpu0, t0 = serving.tree_cpu(run.roots), time.perf_counter()
    time.sleep(seconds)
    cpu1, elapsed = serving.tree_cpu(run.roots), time.perf_counter() - t0
    return {role: (cpu1[role] - cpu0[role]) * 1000 / elapsed for role in run.roots}


def table(results: dict[str, dict[int, list[dict]]], levels: Sequence[int]) -> str:
    kinds = [k for k, _ in THREAD_KINDS] + ["other"]
    head = ["variant", "c", "img/s", "p50 / p99 ms", *ROLES, "total"]
    head += [f"broker: {k}" for k in kinds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, per_level in results.items():
        for c in levels:
            rounds = per_level.get(c, [])
            if not rounds:
                continue

            def med(get: Any, rounds: list[dict] = rounds) -> float:
                return statistics.median(get(r) for r in rounds)

            def cell(get: Any, rounds: list[dict] = rounds) -> str:
                every = " ".join(f"{get(r):.2f}" for r in rounds)
                return f"**{statistics.median(get(r) for r in rounds):.2f}** ({every})"

            cells = [
                name,
                str(c),
                f"{med(lambda r: r['img_s']):.1f}",
                f"{med(lambda r: r['p50_ms']):.1f} / {med(lambda r: r['p99_ms']):.0f}",
                *[cell(lambda r, k=k: r["cpu_ms"].get(k, 0.0)) for k in ROLES],
                cell(lambda r: sum(r["cpu_ms"].values())),
                *[f"{med(lambda r, k=k: r['broker_ms'].get(k, 0.0)):.2f}" for k in kinds],
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def idle_table(idle_ms: dict[str, list[dict[str, float]]]) -> str:
    roles = ("broker", "api", "workers")
    lines = ["| variant (idle) | " + " | ".join(f"{r} CPU ms/s" for r in roles) + " |"]
    lines.append("|---|" + "---|" * len(roles))
    for name, rows in idle_ms.items():
        if rows:
            cells = [f"{statistics.median(r.get(k, 0.0) for r in rows):.1f}" for k in roles]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="before,shipped")
    parser.add_argument("--rev", default=None, help="also run the code of this git revision")
    parser.add_argument("--concurrency", default="8,1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per window")
    parser.add_argument("--warm", type=float, default=60.0, help="warm-up seconds per stack")
    parser.add_argument(
        "--idle", type=float, default=10.0, help="seconds of idle CPU per stack and round"
    )
    parser.add_argument("--images", type=Path, default=serving.DEFAULT_IMAGES)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v and v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}: choose from {sorted(VARIANTS)}")
    variants = [VARIANTS[v] for v in args.variants.split(",") if v]
    if args.rev:
        root = revision_root(args.rev)
        variants.append(Variant(f"rev {args.rev}", root=root, about=f"code of {args.rev}"))
    levels = [int(c) for c in args.concurrency.split(",")]
    out = args.out or ROOT / "runs" / "kafka-cost" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    images = serving.load_images(args.images, args.max_images)
    model = serving.models(["default"], serving.MODEL_CACHE)[0]
    results: dict[str, dict[int, list[dict]]] = {v.name: {c: [] for c in levels} for v in variants}
    idle_ms: dict[str, list[dict[str, float]]] = {v.name: [] for v in variants}
    serving.say(
        f"{len(variants)} variant(s), c = {levels}, {args.rounds} round(s) of "
        f"{args.duration:.0f} s; load average {os.getloadavg()[0]:.2f}; results in {out}"
    )
    with contextlib.ExitStack() as stack:
        running = []
        for v in variants:
            run = stack.enter_context(start(v, model, out))
            serving.warm_up(run.url, images, 4)
            serving.closed_loop(
                run.url, images, max(levels), duration_s=args.warm, roots=run.roots, design="warm"
            )
            serving.say(f"  {v.name} ({v.about}) started and warmed up")
            running.append(run)
        for r in range(args.rounds):
            order = running[r % len(running) :] + running[: r % len(running)]
            for run in order:
                if args.idle > 0:
                    idle_ms[run.variant.name].append(idle(run, args.idle))
                    serving.say(
                        f"  round {r + 1} {run.variant.name} idle: CPU ms/s "
                        + " ".join(f"{k} {v:.1f}" for k, v in idle_ms[run.variant.name][-1].items())
                    )
                for c in levels:
                    row = measure(run, images, c, args.duration)
                    results[run.variant.name][c].append(row)
                    cpu = " ".join(f"{k} {row['cpu_ms'].get(k, 0):.2f}" for k in ROLES)
                    serving.say(
                        f"  round {r + 1} {run.variant.name} c={c}: {row['img_s']:.1f} img/s "
                        f"p50 {row['p50_ms']:.0f} ms | CPU ms/img {cpu} | load {row['load']:.1f}"
                    )
            (out / "kafka_cost.json").write_text(
                json.dumps(
                    {
                        "variants": {v.name: v.about for v in variants},
                        "results": results,
                        "idle_ms_per_s": idle_ms,
                    },
                    indent=1,
                )
            )
    text = table(results, levels) + "\n\n" + idle_table(idle_ms)
    (out / "kafka_cost.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
