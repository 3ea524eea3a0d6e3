"""Two settings of the serving path, A/B in one run. ``--compare partitioner`` (the
default): ``QRSIGHT_API_PARTITIONER`` = ``least-loaded`` (the default, ``api/routing.py``)
against ``key`` (librdkafka's partitioner on the random request id). ``--compare solo``:
``QRSIGHT_ORT_SOLO_THREADS`` = the host's cores (`make up`'s default: a lone image on the
wide session while the other workers are idle, ``core/runtime/busy.py``) against 0 (off).

    python -m bench.routing [--compare partitioner|solo] [--models ref,default]
                            [--concurrency 1,2,4,8] [--seconds 20] [--repeats 2] [--out DIR]

For each model: one broker, then ``make up``'s stack (two workers, the API) once per
setting and repetition, the order of the two settings swapped in every other repetition
(a machine that slows down during the run favours neither); at each level a closed loop
of ``c`` clients posting the development photos. Prints per setting the img/s and p50 of
each repetition, the ratio of the summed img/s (second / first setting) and the
difference of the p50s (the medians over the repetitions), and writes ``routing.json``
and ``routing.md`` to ``--out``. With random partitions two workers share ``c`` requests
unevenly (all on one worker about 2/5 of the time at c = 4), so the partitioner's ratio
shows most at c = 2-8 and fades with more in flight; the solo session's gain is the p50
at c = 1, its risk the img/s at c >= 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from bench import serving
from bench.stages import DEFAULT_IMAGES
from core.runtime.settings import env_name

Setting = tuple[str, dict[str, str]]  # (name, the stack's extra environment)
COMPARISONS: dict[str, tuple[Setting, Setting]] = {
    "partitioner": (
        ("key", {env_name("api_partitioner"): "key"}),
        ("least-loaded", {env_name("api_partitioner"): "least-loaded"}),
    ),
    "solo": (
        ("solo-off", {env_name("ort_solo_threads"): "0"}),
        ("solo", {env_name("ort_solo_threads"): str(os.cpu_count() or 2)}),
    ),
}


def run(
    model_keys: Sequence[str],
    levels: Sequence[int],
    *,
    settings: tuple[Setting, Setting],
    seconds: float,
    repeats: int,
    out: Path,
    images_dir: Path = DEFAULT_IMAGES,
) -> dict[str, list[dict[str, object]]]:
    images = serving.load_images(images_dir)
    found: dict[str, list[dict[str, object]]] = {}
    for model in serving.models(model_keys, serving.MODEL_CACHE):
        rows: list[dict[str, object]] = []
        with serving.broker() as (bootstrap, _pids):
            for rep in range(repeats):
                order = settings if rep % 2 == 0 else settings[::-1]
                for setting, env in order:
                    name = f"{model.key}-{setting}-{rep}"
                    with serving.qrsight(model, bootstrap, out, env_extra=env, name=name) as (
                        url,
                        roots,
                        _workers,
                    ):
                        serving.warm_up(url, images, 40 if model.decode else 8)
                        for c in levels:
                            level = serving.closed_loop(
                                url, images, c, duration_s=seconds, roots=roots, design=setting
                            )
                            rows.append({"repeat": rep, **asdict(level)})
                            serving.say(
                                f"{model.key} repeat {rep} {setting:12s} c = {c}: "
                                f"{level.img_s:.1f} img/s, p50 {level.p50_ms:.1f} ms, "
                                f"{level.errors} error(s)"
                            )
        found[model.label] = rows
    return found


def table(
    rows: Sequence[dict[str, object]], levels: Sequence[int], names: Sequence[str]
) -> list[str]:
    """Per level: each setting's repeats, the second's summed img/s over the first's, and
    the second's median p50 minus the first's."""
    first, second = names

    def of(setting: str, c: int) -> list[dict[str, object]]:
        return [r for r in rows if r["design"] == setting and r["concurrency"] == c]

    lines = [
        f"| c | {first}: img/s (p50 ms) per repeat | {second}: img/s (p50 ms) per repeat "
        f"| {second} / {first}, img/s | {second} - {first}, p50 | errors |",
        "|---|---|---|---|---|---|",
    ]
    for c in levels:
        cells, totals, p50s, errors = [], [], [], 0
        for setting in names:
            got = of(setting, c)
            cells.append(", ".join(f"{r['img_s']:.1f} ({r['p50_ms']:.0f})" for r in got))
            totals.append(sum(float(r["img_s"]) for r in got))  # type: ignore[arg-type]
            p50s.append(statistics.median([float(r["p50_ms"]) for r in got]))  # type: ignore[arg-type]
            errors += sum(int(r["errors"]) for r in got)  # type: ignore[call-overload]
        ratio = totals[1] / totals[0] if totals[0] else float("nan")
        lines.append(
            f"| {c} | {cells[0]} | {cells[1]} | **{ratio:.2f}** "
            f"| {p50s[1] - p50s[0]:+.1f} ms | {errors} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="partitioner")
    parser.add_argument("--models", default="ref,default", help="ref and/or default")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--seconds", type=float, default=20.0, help="per level")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--out", type=Path, default=serving.ROOT / "bench" / "results" / "routing")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    settings = COMPARISONS[args.compare]
    found = run(
        args.models.split(","),
        levels,
        settings=settings,
        seconds=args.seconds,
        repeats=args.repeats,
        out=args.out,
        images_dir=args.images,
    )
    load_end = os.getloadavg()
    lines = [
        f"load average at start {' '.join(f'{x:.2f}' for x in load_start)}, "
        f"at end {' '.join(f'{x:.2f}' for x in load_end)}; {args.seconds:g} s per level, "
        f"{args.repeats} repeat(s), the order of the two settings swapped every other repeat",
    ]
    names = [name for name, _ in settings]
    for label, rows in found.items():
        lines += ["", f"### {label}", "", *table(rows, levels, names)]
    text = "\n".join(lines) + "\n"
    print(text)
    (args.out / "routing.md").write_text(text)
    (args.out / "routing.json").write_text(json.dumps(found, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
