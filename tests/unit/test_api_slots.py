"""Which reply partition each API process reads: distinct per pod on Kubernetes with or
without the pod-index label, and never past the topic's partitions during a reload."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from api.slots import (
    KUBERNETES_ENV,
    base_partition,
    least_held_slot,
    reply_partition,
    set_process_slot,
    statefulset_ordinal,
)
from core.runtime.errors import ConfigError
from tests.unit.test_api_helpers import api_settings

CONF = Path(__file__).resolve().parents[2] / "api" / "gunicorn.conf.py"
ON_KUBERNETES = {KUBERNETES_ENV: "10.96.0.1"}


@pytest.mark.parametrize(
    ("taken", "workers", "slot"),
    [
        ([], 2, 0),
        ([0], 2, 1),
        ([1], 2, 0),
        ([0, 2], 3, 1),
        ([-1], 1, 0),  # a worker still being forked holds none
        ([0], 1, 0),  # reload of a one-worker pod: share the old worker's slot
        ([0, 1], 2, 0),  # reload of two workers: the new ones share 0, then 1
        ([0, 1, 0], 2, 1),
        ([0, 1, 0, 1], 2, 0),
        ([3, 4], 2, 0),  # fewer workers after a reload (TTOU): old slots past the end
    ],
)
def test_a_worker_gets_the_least_held_slot_below_the_worker_count(
    taken: list[int], workers: int, slot: int
) -> None:
    assert least_held_slot(taken, workers) == slot


@pytest.mark.parametrize(
    ("hostname", "ordinal"),
    [
        ("qrsight-api-0", 0),
        ("qrsight-api-12", 12),
        ("qrsight-api-3.qrsight-api-headless.default.svc", 3),
        ("qrsight-api-7d9f8c5b4-xkq2z", None),  # a Deployment's pod
        ("laptop", None),
    ],
)
def test_the_statefulset_ordinal_is_read_from_the_host_name(
    hostname: str, ordinal: int | None
) -> None:
    assert statefulset_ordinal(hostname) == ordinal


def test_pods_without_the_pod_index_label_get_distinct_partitions() -> None:
    """Kubernetes < 1.28: the label is missing, QRSIGHT_API_REPLY_PARTITION is empty."""
    settings = api_settings(api_workers=2)
    bases = [
        base_partition(settings, f"qrsight-api-{ordinal}", ON_KUBERNETES) for ordinal in range(4)
    ]
    assert bases == [0, 2, 4, 6]


def test_the_variable_wins_over_the_host_name() -> None:
    settings = api_settings(api_reply_partition=5)
    assert base_partition(settings, "qrsight-api-2", ON_KUBERNETES) == 5


def test_a_pod_without_an_ordinal_refuses_to_start_rather_than_share_partition_0() -> None:
    with pytest.raises(ConfigError, match="QRSIGHT_API_REPLY_PARTITION is not set"):
        base_partition(api_settings(), "qrsight-api-7d9f8c5b4-xkq2z", ON_KUBERNETES)


def test_outside_kubernetes_the_base_is_0() -> None:
    assert base_partition(api_settings(), "qrsight-api-3", {}) == 0


def test_reply_partition_adds_the_process_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KUBERNETES_ENV, "10.96.0.1")
    monkeypatch.setattr("socket.gethostname", lambda: "qrsight-api-3")
    try:
        set_process_slot(1)
        assert reply_partition(api_settings(api_workers=2)) == 7
    finally:
        set_process_slot(0)


def gunicorn_conf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ModuleType:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    spec = importlib.util.spec_from_file_location("qrsight_gunicorn_conf", CONF)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fork(conf: ModuleType, server: Any) -> int:
    worker = SimpleNamespace()
    conf.pre_fork(server, worker)
    server.WORKERS[len(server.WORKERS) + 1000] = worker
    return int(worker.qrsight_slot)


def test_a_reload_never_gives_the_last_pods_workers_a_slot_past_the_last(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """SIGHUP: gunicorn forks the new workers while the old ones still run. With one
    worker per pod, the last pod's new worker used to take slot 1, partition
    ordinal + 1 = the partition count, and fail to boot."""
    conf = gunicorn_conf(monkeypatch, tmp_path)
    server = SimpleNamespace(WORKERS={}, num_workers=1)
    assert fork(conf, server) == 0
    assert fork(conf, server) == 0  # the reload's worker, beside the old one
    server = SimpleNamespace(WORKERS={}, num_workers=2)
    assert [fork(conf, server) for _ in range(4)] == [0, 1, 0, 1]
