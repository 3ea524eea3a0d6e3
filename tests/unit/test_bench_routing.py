"""``bench.routing``'s table: per level, each setting's repeats, the ratio of their sums
and the difference of their median p50s."""

from __future__ import annotations

from bench.routing import table


def row(design: str, c: int, img_s: float, p50: float, errors: int = 0) -> dict[str, object]:
    return {"design": design, "concurrency": c, "img_s": img_s, "p50_ms": p50, "errors": errors}


def test_the_ratio_is_least_loaded_over_key_summed_over_the_repeats() -> None:
    rows = [
        row("key", 4, 8.0, 420),
        row("least-loaded", 4, 10.0, 370),
        row("least-loaded", 4, 11.0, 340, errors=1),
        row("key", 4, 9.0, 410),
        row("key", 1, 6.0, 160),
        row("least-loaded", 1, 6.0, 165),
    ]
    lines = table(rows, [1, 4], ["key", "least-loaded"])
    assert lines[0].startswith("| c | key: img/s (p50 ms) per repeat | least-loaded: img/s")
    assert lines[2] == "| 1 | 6.0 (160) | 6.0 (165) | **1.00** | +5.0 ms | 0 |"
    assert lines[3] == (
        "| 4 | 8.0 (420), 9.0 (410) | 10.0 (370), 11.0 (340) | **1.24** | -60.0 ms | 1 |"
    )
