"""How `make bench` judges the low-load goal from a run's own levels."""

from __future__ import annotations

from typing import Any

from bench.suite import low_load_line


def run(
    seed: dict[int, tuple[float, float]], qrsight: dict[int, tuple[float, float]]
) -> dict[str, Any]:
    levels = [
        {"design": design, "concurrency": c, "img_s": img_s, "p50_ms": p50}
        for design, table in (("seed", seed), ("qrsight", qrsight))
        for c, (img_s, p50) in table.items()
    ]
    return {"levels": levels}


def test_the_low_load_goal_needs_both_the_c1_latency_and_the_throughput() -> None:
    seed = {1: (9.7, 103.0), 4: (18.0, 220.0), 8: (18.5, 430.0)}
    close = {1: (9.5, 106.0), 4: (17.5, 228.0), 8: (18.4, 434.0)}
    assert "**met**" in low_load_line(run(seed, close))
    slow_c1 = {1: (5.1, 195.0), 4: (17.5, 228.0), 8: (18.4, 434.0)}
    line = low_load_line(run(seed, slow_c1))
    assert "**missed**" in line and "+92.0 ms" in line
    low_c4 = {1: (9.5, 106.0), 4: (14.8, 270.0), 8: (18.4, 434.0)}
    line = low_load_line(run(seed, low_c4))
    assert "**missed**" in line and "c = 4: 0.82" in line
    assert low_load_line(run({4: (1.0, 1.0)}, {4: (1.0, 1.0)})) == "(no c = 1 level)"


def test_the_level_table_shows_qrsight_without_the_solo_session_beside_the_defaults() -> None:
    from bench.serving import NO_SOLO_DESIGN
    from bench.suite import level_rows

    model = run({1: (7.4, 129.0)}, {1: (6.3, 156.0), 4: (10.6, 339.0)})
    for x in model["levels"]:
        x.update(errors=0, p99_ms=2 * x["p50_ms"])
    model["levels"].append(
        {
            "design": NO_SOLO_DESIGN,
            "concurrency": 1,
            "img_s": 6.9,
            "p50_ms": 142.0,
            "p99_ms": 187.0,
            "errors": 0,
        }
    )
    rows = level_rows(model)
    assert rows[2] == "| 1 | 7.4 | 129 / 258 | 6.3 | 156 / 312 | 6.9 | 142 / 187 | 0 |"
    assert rows[3] == "| 4 | — | — | 10.6 | 339 / 678 | — | — | 0 |"
    line = low_load_line(model, NO_SOLO_DESIGN)
    assert "qrsight-no-solo 142.0 ms" in line and "+13.0 ms" in line


def test_the_worker_cpu_ratio_is_read_at_qrsight_best_level() -> None:
    from bench.suite import worker_cpu_line

    model = run({}, {4: (90.0, 40.0), 32: (130.0, 230.0)})
    cpu = {4: {"workers": 0.0121, "api": 0.0025}, 32: {"workers": 0.0110, "api": 0.0021}}
    for x in model["levels"]:
        x["cpu_s_per_image"] = cpu[x["concurrency"]]
    model["ceiling"] = [{"img_s": 200.7, "cpu_s_per_image": 0.0097, "processes": 2}]
    line = worker_cpu_line(model)
    assert "at c = 32" in line and "11.0 CPU-ms" in line and "**1.13x**" in line
    assert "missed" in line
