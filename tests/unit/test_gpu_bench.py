"""The GPU end-to-end benchmark's own logic (bench/gpu_e2e.py): the cases, their settings,
what makes a preflight fail and how img/s is computed, without a GPU or a broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import gpu_e2e
from bench.gpu_e2e import Case, Row, case_env, measure, plan, preflight_problems
from core.runtime.settings import load_settings


def test_the_plan_puts_the_default_model_and_the_gpu_decoder_first() -> None:
    cases = plan(["default", "ref"], ["nvimgcodec", "cpu"], [1, 2, 4])
    assert len(cases) == 12
    assert cases[:3] == [Case("default", "nvimgcodec", w) for w in (1, 2, 4)]
    assert cases[-1] == Case("ref", "cpu", 4)


def test_case_settings_are_valid_and_as_the_gpu_overlay_sets_them() -> None:
    env = case_env(
        Case("default", "nvimgcodec", 4), "127.0.0.1:1", None, dry_run=False, max_batch=32
    )
    settings = load_settings(env)
    assert (settings.workers, settings.max_batch, settings.image_decoder) == (4, 32, "nvimgcodec")
    assert settings.topic_partitions >= 4, "a partition for every worker"
    assert settings.onnx_providers is None, "the GPU defaults, not a pinned provider list"
    assert settings.ort_intra_threads is None and settings.cuda_device is None


def test_the_reference_model_keeps_its_noise_boxes_out() -> None:
    env = case_env(
        Case("ref", "cpu", 1), "127.0.0.1:1", Path("/m/ref.onnx"), dry_run=False, max_batch=32
    )
    settings = load_settings(env)
    assert settings.model_path == Path("/m/ref.onnx") and settings.imgsz == 640
    assert settings.conf_threshold == 0.9 and not settings.decode_payloads
    assert settings.verifier_path is None
    with pytest.raises(SystemExit, match="--ref-model"):
        case_env(Case("ref", "cpu", 1), "x:1", None, dry_run=False, max_batch=8)


def test_a_dry_run_uses_the_cpu_provider_with_the_gpu_paths_on() -> None:
    env = case_env(Case("default", "nvimgcodec", 1), "x:1", None, dry_run=True, max_batch=8)
    settings = load_settings(env)
    assert settings.onnx_providers == ["CPUExecutionProvider"]
    assert settings.device_preprocess and settings.pad_batch


GOOD: dict[str, Any] = {
    "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "device_letterbox": True,
    "gpu_decoder": "gpu",
    "nvimgcodec_buffer": "ImageBufferKind.STRIDED_DEVICE",
}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({}, None),
        ({"providers": ["CPUExecutionProvider"]}, "does not run on CUDA"),
        ({"gpu_decoder": None}, "does not decode on the GPU"),
        ({"gpu_decoder": "cpu-backend"}, "does not decode on the GPU"),
        ({"nvimgcodec_buffer": "ImageBufferKind.STRIDED_HOST"}, "does not decode on the GPU"),
        ({"device_letterbox": False}, "letterbox is off"),
    ],
)
def test_preflight_refuses_a_run_that_would_not_measure_the_gpu(
    change: dict[str, Any], problem: str | None
) -> None:
    found = preflight_problems({"nvimgcodec": {**GOOD, **change}})
    if problem is None:
        assert found == []
    else:
        assert len(found) == 1 and problem in found[0]


class FakeCollector:
    def __init__(self, stamps: list[int], statuses: list[str]) -> None:
        self.got = {
            f"run-{i}": (
                ts,
                {
                    "status": s,
                    "detections": [{}] * (i % 3),
                    "timings": {
                        f"{n}_ms": 1.0 for n in ("queue", "decode", "infer", "post", "total")
                    },
                },
            )
            for i, (ts, s) in enumerate(zip(stamps, statuses, strict=True))
        }


def test_img_s_counts_the_middle_of_the_burst() -> None:
    # 100 results at 1,000 img/s (one per ms), then a straggler a second later
    stamps = [*range(0, 100), 1100]
    collector = FakeCollector(stamps, ["OK"] * len(stamps))
    row = Row(Case("default", "cpu", 1))
    measure(row, collector, list(collector.got))  # type: ignore[arg-type]
    assert row.images == 101 and row.ok == 101 and row.error is None
    assert row.img_s == pytest.approx(1000, rel=0.02), "the straggler is outside the middle"
    assert row.stage_ms["decode"] == 1.0


def test_a_result_that_is_not_ok_is_an_error() -> None:
    collector = FakeCollector([1, 2, 3], ["OK", "ERROR", "OK"])
    row = Row(Case("default", "cpu", 1))
    measure(row, collector, list(collector.got))  # type: ignore[arg-type]
    assert row.error == "1 result(s) not OK"


def test_markdown_names_each_goal() -> None:
    rows = [
        Row(Case("default", "nvimgcodec", 2), img_s=1600.0),
        Row(Case("ref", "cpu", 1), img_s=900.0),
    ]
    text = gpu_e2e.markdown(rows, {"gpu": "test"})
    assert "| default | nvimgcodec | 2 | 1,600 | 1,500 (met)" in text
    assert "| ref | cpu | 1 | 900 | 1,000 (missed)" in text
