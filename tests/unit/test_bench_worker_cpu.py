"""``bench.worker_cpu``: a worker's CPU by thread group and its verdict against in-process."""

from __future__ import annotations

import os
import threading
import time

from bench.worker_cpu import groups, render, thread_cpu


def test_thread_groups_split_main_librdkafka_and_the_rest() -> None:
    before = {(10, "python"): 1.0, (11, "python"): 0.5, (12, "rdk:main"): 0.1}
    after = {
        (10, "python"): 3.0,  # the main thread (its id is the process id)
        (11, "python"): 1.5,
        (12, "rdk:main"): 0.2,
        (13, "rdk:broker1"): 0.3,  # started in between: counts whole
        (14, "python"): 0.25,
    }
    assert groups(before, after, pid=10) == {
        "main thread": 2.0,
        "other threads": 1.25,
        "librdkafka": 0.4,
    }


def test_this_process_threads_are_sampled_with_their_cpu() -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    worker = threading.Thread(target=spin)
    before = thread_cpu(os.getpid())
    worker.start()
    time.sleep(0.3)
    after = thread_cpu(os.getpid())
    stop.set()
    worker.join()
    assert any(tid == os.getpid() for tid, _ in after)  # the main thread is sampled too
    spent = groups(before, after, os.getpid())
    assert spent["other threads"] > 0.05  # the spinning thread, not the sleeping main one


def report(worker_ms: float, in_process: list[float], left: bool = True) -> dict[str, object]:
    return {
        "seconds": 20.0,
        "results": 1000,
        "cpu_s": {"main thread": 8.0, "other threads": 3.5, "librdkafka": 0.5},
        "worker_ms": worker_ms,
        "in_process_ms": in_process,
        "backlog_left": left,
    }


def test_the_verdict_uses_the_mean_of_the_two_in_process_runs() -> None:
    met = render(report(12.0, [11.5, 12.5]))
    assert "| librdkafka | 0.50 | 4.2% | 0.50 |" in met
    assert "**1.00x** (goal ≤ 1.10x: met)" in met
    missed = render(report(12.0, [10.0, 10.0], left=False))
    assert "**1.20x** (goal ≤ 1.10x: missed)" in missed
    assert "backlog ran out" in missed
