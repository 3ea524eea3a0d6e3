"""Poison on a real broker: no single message can stop a partition.

- the poison corpus (tests/poison_corpus.py, 52 kinds) through a supervised worker with
  the shipped model: one result per message with the expected status and code, a DLQ copy
  of exactly the bad ones (cut to fit when it must be), replies only where routing is
  valid, and **0 worker restarts**;
- a message the pipeline raises on (not the input's fault by the rules) is retried,
  isolated and quarantined while the rest of its batch goes through, without a restart;
- a message that kills the worker process is recognised after ``QRSIGHT_CRASH_LIMIT``
  deaths and quarantined, and its partition moves on;
- a lone image is not held for ``QRSIGHT_MAX_WAIT_MS``; images already waiting are batched.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from consumer.worker import Worker
from core.runtime.kafka import message_limits
from core.runtime.results import error_code
from core.runtime.settings import DEFAULT_MODEL, Settings
from core.vision.pipeline import Pipeline
from schemas import names
from tests.integration.crashy_worker import HANG_MARKER, MARKER, SLOW_LINE, SLOW_MARKER, SLOW_S
from tests.integration.test_worker import (
    STOP_BOUND_S,
    good_stream,
    jpeg,
    publish,
    read_topic,
    results_by_id,
    settings_env,
    spawn,
    stop_within,
    wait_for,
    worker_thread,
)
from tests.poison_corpus import PIXEL_LIMIT, Case, cases, dlq_filler
from tests.unit.onnx_models import make_dark_cell_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dark_cell_model(tmp_path_factory.mktemp("model") / "dark.onnx", imgsz=160, cell=32)


@pytest.fixture
def settings(kafka_settings: Settings, model_path: Path, tmp_path: Path) -> Settings:
    extra = {**kafka_settings.kafka_extra, "session.timeout.ms": "6000"}
    return kafka_settings.model_copy(
        update={
            "model_path": model_path,
            "conf_threshold": 0.5,
            "max_batch": 8,
            "metrics_port": 0,
            "ort_intra_threads": 1,
            "decode_threads": 1,
            "shutdown_timeout_s": 8.0,
            "retry_backoff_ms": 50,
            "state_dir": tmp_path / "state",
            "kafka_extra": extra,
        }
    )


def position_id(settings: Settings, where: tuple[int, int]) -> str:
    """The request id of a message without a usable id: topic-partition-offset."""
    return f"{settings.topic_images}-{where[0]}-{where[1]}"


def restarts(log: Path) -> int:
    return log.read_text(errors="replace").count("worker exited, restarting")


@pytest.fixture
def supervised_log(tmp_path: Path) -> Iterator[Path]:
    log = tmp_path / "supervisor.log"
    yield log
    if log.exists():
        print(log.read_text(errors="replace")[-4000:])


def test_the_poison_corpus_gets_one_answer_each_and_no_worker_restarts(
    settings: Settings, supervised_log: Path
) -> None:
    settings = settings.model_copy(
        update={
            "model_path": DEFAULT_MODEL,
            "conf_threshold": None,
            "max_image_pixels": PIXEL_LIMIT,
            "max_image_bytes": 1024 * 1024,
        }
    )
    corpus = cases(settings.topic_replies, settings.replies_partitions)
    corpus.append(dlq_filler("dlq-copy-too-large", message_limits(settings).max_message_bytes))
    good = [
        Case(
            f"good-{i}",
            jpeg(i),
            [(names.H_CORRELATION_ID, f"good-{i}".encode())],
            size=(160, 120),
            request_id=f"good-{i}",
        )
        for i in range(len(corpus))
    ]
    stream = [c for pair in zip(good, corpus, strict=True) for c in pair]
    assert len({c.name for c in corpus}) >= 25
    supervisor = spawn(settings, supervised_log, "--workers", "1")
    try:
        where = publish(settings, [(c.name, c.value, c.headers) for c in stream])
        ids = {
            c.name: c.request_id or f"{settings.topic_images}-{where[c.name][0]}-{where[c.name][1]}"
            for c in stream
        }
        by_id = results_by_id(settings, set(ids.values()), timeout_s=120)
        dlq = read_topic(settings, settings.topic_dlq, {c.name for c in corpus if c.bad})
        replies = read_topic(
            settings, settings.topic_replies, {"reply-ok"}, partitions=settings.replies_partitions
        )
    finally:
        stop_within(supervisor, STOP_BOUND_S + 2)
    problems = []
    for case in stream:
        got = by_id.get(ids[case.name], [])
        if len(got) != 1:
            problems.append(f"{case.name}: {len(got)} results")
            continue
        (result,) = got
        if (result["status"], error_code(result)) != (case.status, case.code):
            problems.append(
                f"{case.name}: {result['status']} {result['error']} != {case.status} {case.code}"
            )
        elif case.size and (result["image"]["width"], result["image"]["height"]) != case.size:
            problems.append(f"{case.name}: size {result['image']} != {case.size}")
    assert problems == [], "\n".join(problems)
    copies: dict[str, list[Any]] = defaultdict(list)
    for msg, _ in dlq:
        copies[(msg.key() or b"").decode()].append(msg)
    assert set(copies) == {c.name for c in corpus if c.bad}, "exactly the bad ones in the DLQ"
    for case in corpus:
        if not case.bad:
            continue
        (copy,) = copies[case.name]
        hdrs = names.header_dict(copy.headers())
        assert hdrs[names.H_ERROR_CODE].decode() == case.code, case.name
        if case.name == "dlq-copy-too-large":
            assert b"value" in hdrs[names.H_ERROR_TRUNCATED], "says what was cut"
            assert (case.value or b"").startswith(copy.value())
        else:
            assert (copy.value() or b"") == (case.value or b""), case.name
            assert names.H_ERROR_TRUNCATED not in hdrs
    assert [(m.key(), m.partition()) for m, _ in replies] == [
        (b"reply-ok", settings.replies_partitions - 1)
    ], "replies only where the routing is valid"
    assert restarts(supervised_log) == 0, "the poison run needs no worker restart"


class FaultyPipeline(Pipeline):
    """Raises, as an OpenCV assertion on an odd image did, whenever a batch holds a marked
    image: not the input's fault by the rules, so the worker must isolate it."""

    calls = 0

    def run(self, jobs: Any, stages: Any = None) -> list[dict[str, Any]]:
        FaultyPipeline.calls += 1
        if any(MARKER in job.data for job in jobs):
            raise RuntimeError("OpenCV(5.0.0) resize.cpp: error: (-215:Assertion failed)")
        return super().run(jobs, stages)


def marked_jpeg(seed: int, marker: bytes = MARKER) -> bytes:
    data = jpeg(seed)
    comment = b"\xff\xfe" + (len(marker) + 2).to_bytes(2, "big") + marker
    return data[:2] + comment + data[2:]


def test_a_failing_message_is_retried_isolated_and_quarantined_its_batch_goes_through(
    settings: Settings,
) -> None:
    stream = good_stream(settings, 40, "ok")
    bad = [
        (f"poison-{i}", marked_jpeg(i), [(names.H_CORRELATION_ID, f"poison-{i}".encode())])
        for i in range(2)
    ]
    publish(settings, stream[:20] + bad[:1] + stream[20:] + bad[1:])
    worker = Worker(settings, 0, pipeline=FaultyPipeline(settings))
    with worker_thread(settings, worker=worker):
        by_id = results_by_id(settings, {rid for rid, _, _ in stream + bad})
        dlq = read_topic(settings, settings.topic_dlq, {"poison-0", "poison-1"})
    for rid, _, _ in stream:
        assert [r["status"] for r in by_id[rid]] == ["OK"], rid
    for rid, _value, _ in bad:
        (result,) = by_id[rid]
        assert (result["status"], error_code(result)) == ("ERROR", "quarantined")
        assert "Assertion failed" in result["error"]["message"]
    assert {(m.key(), m.value()) for m, _ in dlq} == {(r.encode(), v) for r, v, _ in bad}
    text = worker.metrics.exposition().decode()
    assert 'qrsight_worker_quarantined_total{reason="error"} 2.0' in text
    assert "qrsight_worker_retries_total 4.0" in text, "2 retries for each poisoned batch"


def test_a_message_that_kills_the_worker_is_quarantined_after_the_crash_limit(
    settings: Settings, supervised_log: Path
) -> None:
    result = _quarantined_by_deaths(settings, supervised_log, "killer", MARKER)
    assert "died" in result["error"]["message"]


def test_a_message_that_hangs_the_worker_is_quarantined_after_the_crash_limit(
    settings: Settings, supervised_log: Path
) -> None:
    """A pipeline run stuck in a C call that holds the GIL (no Python thread can run) is
    ended by the watchdog after QRSIGHT_PIPELINE_TIMEOUT_S, the hang counts as a death,
    and the message is quarantined like one that crashes the worker; the rest of the
    stream gets its results."""
    settings = settings.model_copy(update={"pipeline_timeout_s": 3.0})
    _quarantined_by_deaths(settings, supervised_log, "hanger", HANG_MARKER, timeout_s=150)
    log = supervised_log.read_text(encoding="utf-8", errors="replace")
    assert log.count("reason=hung past QRSIGHT_PIPELINE_TIMEOUT_S") == 3
    assert log.count('crashy_worker.py", line') >= 3, "each hang's stack dump names where"


def _quarantined_by_deaths(
    settings: Settings, log: Path, rid: str, marker: bytes, timeout_s: float = 120
) -> dict[str, Any]:
    """One image carrying ``marker`` among 30 good ones, under the crashy worker and the
    real supervisor with a crash limit of 2: the image is quarantined (result and DLQ
    copy), the others are OK. Returns its result."""
    settings = settings.model_copy(update={"crash_limit": 2})
    stream = good_stream(settings, 30, "ok")
    bad = (rid, marked_jpeg(3, marker), [(names.H_CORRELATION_ID, rid.encode())])
    publish(settings, [*stream[:15], bad, *stream[15:]])
    supervisor = _spawn_crashy(settings, log)
    try:
        by_id = results_by_id(settings, {r for r, _, _ in [*stream, bad]}, timeout_s=timeout_s)
        dlq = read_topic(settings, settings.topic_dlq, {rid})
    finally:
        stop_within(supervisor, STOP_BOUND_S + 2)
    (result,) = by_id[rid]
    assert (result["status"], error_code(result)) == ("ERROR", "quarantined")
    for r, _, _ in stream:
        assert [x["status"] for x in by_id[r]] == ["OK"], r
    ((msg, _),) = dlq
    assert names.header_dict(msg.headers())[names.H_ERROR_CODE] == b"quarantined"
    # 2 deaths on the batch, 1 running it one message at a time, then quarantined unrun
    assert restarts(log) == 3
    return result


def test_rollouts_during_a_slow_valid_batch_do_not_count_as_its_deaths(
    settings: Settings, supervised_log: Path
) -> None:
    """Three rollouts (SIGTERM to the supervisor) while a slow, valid image is in hand: the
    worker cannot finish it within QRSIGHT_SHUTDOWN_TIMEOUT_S and exits, note left behind.
    Those deaths are the rollouts', not the image's: it must not be quarantined (crash
    limit 2), and the fourth worker publishes its OK result."""
    import signal

    settings = settings.model_copy(update={"crash_limit": 2, "shutdown_timeout_s": 1.0})
    rid = "slow"
    publish(settings, [(rid, marked_jpeg(5, SLOW_MARKER), [(names.H_CORRELATION_ID, b"slow")])])

    def in_hand_or_quarantined(times: int) -> bool:
        text = supervised_log.read_text(errors="replace")
        return text.count(SLOW_LINE) >= times or f"quarantined request_id={rid}" in text

    for rollout in range(1, 4):
        supervisor = _spawn_crashy(settings, supervised_log)
        wait_for(lambda n=rollout: in_hand_or_quarantined(n), 60, f"rollout {rollout}")
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(30)
    supervisor = _spawn_crashy(settings, supervised_log)
    try:
        by_id = results_by_id(settings, {rid}, timeout_s=60 + SLOW_S)
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(30)
    assert [r["status"] for r in by_id[rid]] == ["OK"]


def _spawn_crashy(settings: Settings, log: Path) -> Any:
    import subprocess
    import sys

    from core.runtime.settings import REPO_ROOT
    from tests.integration import test_worker

    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.crashy_worker", "--supervise"],
            env=settings_env(settings),
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    test_worker._SPAWNED.append(proc)
    return proc


def test_a_lone_image_runs_at_once_and_waiting_images_are_batched(settings: Settings) -> None:
    """With a 3 s top-up wait, a lone image must still not wait: its ``queue_ms`` (message
    timestamp to pipeline start) stays far below 3 s. A burst is taken in batches."""
    settings = settings.model_copy(update={"max_wait_ms": 3000})
    worker = Worker(settings, 0)
    with worker_thread(settings, worker=worker):
        wait_for(lambda: worker.metrics.partitions_assigned, 30, "partitions assigned")
        queued = []
        for i in range(3):
            publish(settings, good_stream(settings, 1, f"lone{i}"))
            (result,) = results_by_id(settings, {f"lone{i}-0"}, linger_s=0.0)[f"lone{i}-0"]
            queued.append(result["timings"]["queue_ms"])
        assert max(queued) < 1000, f"a lone image waited for the batch to fill: {queued} ms"
        publish(settings, good_stream(settings, 64, "burst"))
        results_by_id(settings, {f"burst-{i}" for i in range(64)}, linger_s=0.0)
    batches = metric_value(worker, "qrsight_worker_batch_size_count")
    assert batches <= 3 + 32, f"{batches} batches: images already waiting were not batched"


def metric_value(worker: Worker, name: str) -> float:
    for line in worker.metrics.exposition().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name}")
