"""GPU placement and defaults (core/runtime/gpu.py): plain logic, checked without a GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.runtime import gpu
from core.runtime.settings import load_settings
from core.vision.detector import provider_options

CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
CPU = ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("visible", "nodes", "expected"),
    [
        (None, ["nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "nvidia-modeset"], 2),
        (None, ["nvidiactl", "null", "tty0"], 0),
        (None, [], 0),
        ("0", ["nvidia0", "nvidia1"], 1),  # the variable wins over the device nodes
        ("1,0", [], 2),
        ("", ["nvidia0"], 0),  # set but empty: CUDA sees none
        ("-1", ["nvidia0"], 0),
        ("0,-1,1", [], 1),  # CUDA stops at the first invalid entry
        ("GPU-8a1f2c3d-0000-1111-2222-333344445555,MIG-1f2e/1/0", [], 2),
        (" 0 , 1 ", [], 2),
    ],
)
def test_visible_gpus_reads_cuda_visible_devices_then_dev_nodes(
    tmp_path: Path, visible: str | None, nodes: list[str], expected: int
) -> None:
    for name in nodes:
        (tmp_path / name).touch()
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert gpu.visible_gpus(environ, dev=tmp_path) == expected


def test_visible_gpus_without_a_dev_folder_is_zero(tmp_path: Path) -> None:
    assert gpu.visible_gpus({}, dev=tmp_path / "missing") == 0


@pytest.mark.parametrize(
    ("requested", "available", "expected"),
    [
        (None, CUDA, True),
        (None, ["TensorrtExecutionProvider", *CUDA], True),
        (None, CPU, False),
        (["CPUExecutionProvider"], CUDA, False),  # QRSIGHT_ONNX_PROVIDERS says CPU
        (["CUDAExecutionProvider", "CPUExecutionProvider"], CUDA, True),
        (["CUDAExecutionProvider"], CPU, False),  # asked for, not installed
    ],
)
def test_gpu_runtime_follows_onnxruntime_and_the_providers_setting(
    requested: list[str] | None, available: list[str], expected: bool
) -> None:
    assert gpu.gpu_runtime(requested, available) is expected


@pytest.mark.parametrize(
    ("env", "gpus", "on_gpu", "expected"),
    [
        ({}, 0, False, 1),  # a CPU host: one (make up sizes its own host)
        ({}, 1, False, 1),  # GPUs, but onnxruntime without CUDA
        ({}, 1, True, 2),  # the default two per GPU
        ({}, 4, True, 8),
        ({}, 0, True, 1),  # CUDA build, no GPU visible
        ({"QRSIGHT_WORKERS_PER_GPU": "4"}, 2, True, 8),
        ({"QRSIGHT_WORKERS": "3"}, 2, True, 3),  # an explicit count wins
        ({"QRSIGHT_WORKERS": "5"}, 0, False, 5),
    ],
)
def test_default_workers(env: dict[str, str], gpus: int, on_gpu: bool, expected: int) -> None:
    assert gpu.default_workers(load_settings(env), gpus=gpus, on_gpu=on_gpu) == expected


@pytest.mark.parametrize(
    ("env", "index", "gpus", "expected"),
    [
        ({}, 0, 1, 0),
        ({}, 3, 1, 0),
        ({}, 0, 2, 0),
        ({}, 1, 2, 1),
        ({}, 5, 4, 1),  # round-robin
        ({}, 2, 0, 0),
        ({"QRSIGHT_CUDA_DEVICE": "3"}, 0, 4, 3),  # pinned by the setting
        ({"QRSIGHT_CUDA_DEVICE": "1"}, 7, 2, 1),
    ],
)
def test_worker_device(env: dict[str, str], index: int, gpus: int, expected: int) -> None:
    assert gpu.worker_device(load_settings(env), index, gpus) == expected


@pytest.mark.parametrize(
    ("env", "on_gpu", "expected"),
    [
        ({}, False, 0),  # the CPU keeps onnxruntime's default
        ({}, True, 1),
        ({"QRSIGHT_ORT_INTRA_THREADS": "4"}, True, 4),
        ({"QRSIGHT_ORT_INTRA_THREADS": "0"}, True, 0),
        ({"QRSIGHT_ORT_INTRA_THREADS": "2"}, False, 2),
    ],
)
def test_ort_intra_threads(env: dict[str, str], on_gpu: bool, expected: int) -> None:
    assert gpu.ort_intra_threads(load_settings(env), on_gpu) == expected


def test_the_solo_session_is_cpu_only_and_off_by_default() -> None:
    solo = load_settings({"QRSIGHT_ORT_SOLO_THREADS": "2"})
    assert gpu.ort_solo_threads(load_settings({}), on_gpu=False) == 0
    assert gpu.ort_solo_threads(solo, on_gpu=False) == 2
    assert gpu.ort_solo_threads(solo, on_gpu=True) == 0  # the GPU path is unchanged


@pytest.mark.parametrize(
    ("env", "workers", "on_gpu", "cpus", "expected"),
    [
        ({}, 1, False, 16, 1),  # CPU hosts read payloads in the worker's own thread
        ({}, 2, True, 16, 8),
        ({}, 4, True, 16, 4),
        ({}, 32, True, 16, 1),
        ({"QRSIGHT_POST_THREADS": "3"}, 2, True, 16, 3),
        ({"QRSIGHT_POST_THREADS": "2"}, 1, False, 16, 2),
    ],
)
def test_post_threads(
    env: dict[str, str], workers: int, on_gpu: bool, cpus: int, expected: int
) -> None:
    settings = load_settings(env)
    assert gpu.post_threads(settings, workers, on_gpu=on_gpu, cpus=cpus) == expected


def test_place_worker_fills_in_the_gpu_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "gpu_runtime", lambda requested=None, available=None: True)
    settings = load_settings({})
    placed = [gpu.place_worker(settings, i, {"CUDA_VISIBLE_DEVICES": "0,1"}) for i in range(4)]
    assert [p.cuda_device for p in placed] == [0, 1, 0, 1]
    assert {p.workers for p in placed} == {4}
    assert {p.ort_intra_threads for p in placed} == {1}
    assert settings.cuda_device is None, "the process's settings stay as they were"


def test_place_worker_keeps_explicit_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "gpu_runtime", lambda requested=None, available=None: True)
    env = {"QRSIGHT_CUDA_DEVICE": "1", "QRSIGHT_WORKERS": "3", "QRSIGHT_ORT_INTRA_THREADS": "2"}
    placed = gpu.place_worker(load_settings(env), 0, {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert (placed.cuda_device, placed.workers, placed.ort_intra_threads) == (1, 3, 2)


@pytest.mark.parametrize(
    ("on_gpu", "visible"),
    [(False, "0,1"), (True, ""), (False, "")],
    ids=["no-cuda", "no-gpu", "neither"],
)
def test_place_worker_leaves_a_cpu_host_alone(
    monkeypatch: pytest.MonkeyPatch, on_gpu: bool, visible: str
) -> None:
    monkeypatch.setattr(gpu, "gpu_runtime", lambda requested=None, available=None: on_gpu)
    settings = load_settings({})
    assert gpu.place_worker(settings, 2, {"CUDA_VISIBLE_DEVICES": visible}) is settings


def test_place_worker_on_this_machine_changes_nothing_without_cuda() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.fail("the unit tests expect the CPU onnxruntime (pyproject: onnxruntime)")
    settings = load_settings({})
    assert gpu.place_worker(settings, 0) is settings
    assert gpu.default_workers(settings) == 1


@pytest.mark.parametrize(
    ("providers", "device", "expected"),
    [
        (CPU, 3, ["CPUExecutionProvider"]),
        (CUDA, 1, [("CUDAExecutionProvider", {"device_id": "1"}), "CPUExecutionProvider"]),
        (
            ["TensorrtExecutionProvider", *CUDA],
            0,
            [
                ("TensorrtExecutionProvider", {"device_id": "0"}),
                ("CUDAExecutionProvider", {"device_id": "0"}),
                "CPUExecutionProvider",
            ],
        ),
    ],
)
def test_provider_options_pin_the_gpu_providers_to_the_device(
    providers: list[str], device: int, expected: list[Any]
) -> None:
    assert provider_options(providers, device) == expected


@pytest.mark.parametrize(
    ("files", "cap"),
    [
        ({}, None),  # no cgroup files: the affinity alone
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "200000 100000\n"}, 2),
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 cores: two threads
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ],
)
def test_host_cpus_honours_the_container_cpu_limit(
    tmp_path: Path, files: dict[str, str], cap: int | None
) -> None:
    import os

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    want = affinity if cap is None else min(affinity, cap)
    assert gpu.host_cpus(tmp_path) == want
