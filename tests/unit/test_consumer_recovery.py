"""What a worker does when processing fails for a reason other than the input: retry with
back-off, isolate by bisection, quarantine; recognise a message that kills the process;
keep only messages of partitions still owned; cut DLQ copies to fit. Nothing is started."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, Message

from consumer import recovery as recovery_module
from consumer.intake import Intake
from consumer.journal import DELIVERED_FRESH_S, CrashJournal, Plan, journal_path
from consumer.outputs import OutputConfig, dlq_record, failure_kind
from consumer.recovery import (
    CANARY_ID,
    BatchRecovery,
    RetryPolicy,
    Stopping,
    recovery_budget_s,
)
from consumer.worker import Fetched, split_owned
from core.runtime.errors import ModelError
from core.runtime.settings import MAX_POLL_INTERVAL_MS, load_settings
from core.vision.pipeline import ImageJob
from schemas import names

Result = dict[str, Any]


class FlakyPipeline:
    """Fails on poison ids always, on everything for the first ``transient`` calls, and on
    everything (canary too) when ``broken``; records every call."""

    def __init__(self, poison: set[str] = frozenset(), transient: int = 0, broken: bool = False):
        self.poison = set(poison)
        self.transient = transient
        self.broken = broken
        self.calls: list[list[str]] = []

    def __call__(self, jobs: Sequence[ImageJob]) -> list[Result]:
        ids = [j.request_id for j in jobs]
        self.calls.append(ids)
        if self.broken:
            raise ModelError("CUDA error: device lost (test)")
        if self.transient > 0:
            self.transient -= 1
            raise RuntimeError("transient (test)")
        bad = [i for i in ids if i in self.poison]
        if bad:
            raise RuntimeError(f"cv2.error on {bad[0]} (test)")
        return [{"request_id": i, "status": "OK"} for i in ids]


def jobs(n: int) -> list[ImageJob]:
    return [ImageJob(f"r{i}", b"x") for i in range(n)]


def recovery(run: FlakyPipeline, attempts: int = 2) -> tuple[BatchRecovery, list[float], dict]:
    waits: list[float] = []
    counts = {"retry": 0, "quarantine": 0}

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        return False

    def count(name: str) -> Any:
        return lambda: counts.__setitem__(name, counts[name] + 1)

    rec = BatchRecovery(
        run,
        RetryPolicy(attempts, 0.5, 0.8),
        wait,
        on_retry=count("retry"),
        on_quarantine=count("quarantine"),
    )
    return rec, waits, counts


def statuses(results: list[Result]) -> dict[str, str]:
    return {r["request_id"]: r["status"] for r in results}


def test_a_good_batch_runs_once() -> None:
    run = FlakyPipeline()
    rec, waits, counts = recovery(run)
    assert set(statuses(rec.run(jobs(8))).values()) == {"OK"}
    assert len(run.calls) == 1 and waits == [] and counts == {"retry": 0, "quarantine": 0}


def test_a_transient_failure_is_retried_with_capped_exponential_backoff() -> None:
    run = FlakyPipeline(transient=2)
    rec, waits, counts = recovery(run, attempts=3)
    assert set(statuses(rec.run(jobs(4))).values()) == {"OK"}
    assert waits == [0.5, 0.8], "0.5 s, then doubled but capped at 0.8 s"
    assert counts == {"retry": 2, "quarantine": 0}


@pytest.mark.parametrize(
    ("size", "poison"),
    [(8, {"r5"}), (8, {"r0", "r7"}), (1, {"r0"}), (7, {"r1", "r2", "r3"}), (3, {"r0", "r1"})],
)
def test_the_failing_images_are_isolated_and_quarantined_the_rest_go_through(
    size: int, poison: set[str]
) -> None:
    run = FlakyPipeline(poison=poison)
    rec, _waits, counts = recovery(run)
    results = rec.run(jobs(size))
    assert [r["request_id"] for r in results] == [f"r{i}" for i in range(size)], "same order"
    for rid, status in statuses(results).items():
        assert status == ("ERROR" if rid in poison else "OK"), rid
    for r in results:
        if r["status"] == "ERROR":
            assert r["error"]["code"] == "quarantined"
            assert "cv2.error" in r["error"]["message"]
    assert counts["quarantine"] == len(poison)
    # bisection costs O(poison x log n) runs, not one run per image
    assert len(run.calls) <= 1 + 2 + 2 * len(poison) * max(size.bit_length(), 1) + 1


def test_a_broken_model_is_not_blamed_on_the_input() -> None:
    run = FlakyPipeline(broken=True)
    rec, _waits, counts = recovery(run)
    with pytest.raises(ModelError, match="known-good"):
        rec.run(jobs(4))
    assert counts["quarantine"] == 0
    assert [CANARY_ID] in run.calls, "the canary image decided"


def test_every_image_poison_is_quarantined_when_the_canary_passes() -> None:
    run = FlakyPipeline(poison={"r0", "r1"})
    rec, _waits, counts = recovery(run)
    assert set(statuses(rec.run(jobs(2))).values()) == {"ERROR"}
    assert counts["quarantine"] == 2


def test_stop_during_backoff_gives_up_the_batch_uncommitted() -> None:
    run = FlakyPipeline(transient=5)
    rec = BatchRecovery(run, RetryPolicy(3, 1.0, 1.0), wait=lambda _s: True)
    with pytest.raises(Stopping):
        rec.run(jobs(2))


class FakeTime:
    """A clock that moves only when the slow pipeline runs or the recovery backs off."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.now += seconds
        return False


class SlowPipeline(FlakyPipeline):
    """``per_image_s`` of (simulated) work per image in every run, failed runs too; the
    canary (a small image) costs nothing."""

    def __init__(self, clock: FakeTime, per_image_s: float, poison: set[str]) -> None:
        super().__init__(poison=poison)
        self.clock, self.per_image_s = clock, per_image_s

    def __call__(self, jobs: Sequence[ImageJob]) -> list[Result]:
        self.clock.now += self.per_image_s * sum(j.request_id != CANARY_ID for j in jobs)
        return super().__call__(jobs)


def test_recovering_a_batch_of_slow_valid_images_never_outlasts_the_poll_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch of 8 images of 10 s each (80 s a run, within the hang watchdog's 120 s) with
    one that raises: 3 full runs and the bisection took 380 s, past max.poll.interval.ms
    (300 s): the group evicts the worker, its commit is refused, and the next owner of the
    partition does the same, for ever."""
    clock = FakeTime()
    monkeypatch.setattr(recovery_module, "time", clock, raising=False)
    settings = load_settings({}, retry_attempts=2)
    rec = BatchRecovery(
        SlowPipeline(clock, 10.0, poison={"r3"}), RetryPolicy.from_settings(settings), clock.wait
    )
    results = rec.run(jobs(8))
    assert clock.now < MAX_POLL_INTERVAL_MS / 1000, f"recovery took {clock.now:.0f} s"
    assert statuses(results) == {f"r{i}": "ERROR" if i == 3 else "OK" for i in range(8)}


def test_images_left_undecided_when_the_time_is_up_are_quarantined_saying_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Runs so slow that not even a half of the batch fits what is left: nothing more is
    tried; the canary shows the pipeline works, so the batch is quarantined (DLQ copies)."""
    clock = FakeTime()
    monkeypatch.setattr(recovery_module, "time", clock, raising=False)
    run = SlowPipeline(clock, 30.0, poison={"r3"})
    rec = BatchRecovery(run, RetryPolicy(2, 0.5, 10.0, budget_s=270.0), clock.wait)
    results = rec.run(jobs(8))
    assert clock.now < 270
    assert run.calls == [[f"r{i}" for i in range(8)], [CANARY_ID]], "no retry, no bisection"
    assert {r["status"] for r in results} == {"ERROR"}
    assert all("time to find the failing image ran out" in r["error"]["message"] for r in results)


@pytest.mark.parametrize(
    ("poll_ms", "expected_s"), [(None, 270.0), ("60000", 50.0), ("600000", 540.0)]
)
def test_the_recovery_budget_is_the_poll_interval_less_a_margin(
    poll_ms: str | None, expected_s: float
) -> None:
    extra = {} if poll_ms is None else {"max.poll.interval.ms": poll_ms}
    settings = load_settings({}, kafka_extra=extra, pipeline_timeout_s=30)
    assert recovery_budget_s(settings) == expected_s
    assert RetryPolicy.from_settings(settings).budget_s == expected_s


# --- crash journal ---------------------------------------------------------------------
def ids(*offsets: int) -> list[tuple[str, int, int]]:
    return [("qr.images", 0, o) for o in offsets]


def restart(path: Path, limit: int = 3) -> CrashJournal:
    journal = CrashJournal(path, limit)
    journal.recover()
    return journal


def test_a_message_that_kills_the_worker_is_isolated_then_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    batch = ids(10, 11, 12, 13)
    deaths = 0
    journal = restart(path)
    while True:  # the worker dies whenever offset 12 is in hand
        plan = journal.plan(batch)
        if ("qr.images", 0, 12) in plan.doomed:
            break
        todo = [[m] for m in batch] if plan.one_at_a_time else [batch]
        for group in todo:
            journal.note(group)
            if ("qr.images", 0, 12) in group:
                deaths += 1
                journal = restart(path)  # SIGKILL: the note stays; a new process reads it
                break
            journal.done(group)
            batch = [m for m in batch if m not in group]
    assert deaths == 4, "3 deaths on the batch, then 1 running it one at a time"
    assert batch == ids(12, 13), "the messages before the killer were processed singly"


def test_a_clean_exit_or_a_finished_batch_is_not_a_death(tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    journal = restart(path)
    journal.note(ids(1, 2))
    journal.clear()  # the worker left by its own decision (stop, model failure)
    assert not path.exists()
    assert restart(path).suspects == {}
    journal.note(ids(3))
    journal.done(ids(3))
    assert restart(path).suspects == {}


def test_a_worker_told_to_stop_with_a_batch_in_hand_does_not_count_a_death(
    tmp_path: Path,
) -> None:
    """Rollouts during a slow batch: SIGTERM (the handler records it), then the worker
    ends with its note behind (its own exit after the shutdown timeout, a SIGKILL after
    the grace period). However often, the batch is not split nor quarantined, and the
    deaths it had before keep counting."""
    path = tmp_path / "w.json"
    batch = ids(1, 2)
    journal = restart(path, limit=2)
    journal.note(batch)
    journal = restart(path, limit=2)  # one real death first (say an OOM kill)
    for _rollout in range(3):
        journal.note(batch)
        journal.stopping()
        journal = restart(path, limit=2)
        assert journal.plan(batch) == Plan(frozenset(), one_at_a_time=False)
    assert {m: s.deaths for m, s in journal.suspects.items()} == dict.fromkeys(batch, 1)
    assert journal.stop_path is not None and not journal.stop_path.exists(), "read once"
    journal.note(batch)  # a death without a stop: counted again, now at the limit
    assert restart(path, limit=2).plan(batch).one_at_a_time


def test_a_stop_recorded_by_another_process_excuses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    journal = restart(path)
    journal.note(ids(5))
    assert journal.stop_path is not None
    journal.stop_path.write_text(f"{os.getpid() + 1}\n")  # a predecessor, stopped cleanly
    assert restart(path).suspects[("qr.images", 0, 5)].deaths == 1


def test_a_death_passes_on_the_offsets_delivered_but_not_yet_confirmed(tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    journal = restart(path)
    journal.note(ids(7, 8), {("qr.images", 0): 7, ("qr.images", 1): 30})
    heir = restart(path)  # killed during the batch: the heir reads both
    assert heir.take_delivered([("qr.images", 0), ("qr.images", 2)]) == {("qr.images", 0): 7}
    assert heir.take_delivered([("qr.images", 0)]) == {}, "applied once"
    assert heir.take_delivered([("qr.images", 1)]) == {("qr.images", 1): 30}


def test_a_stale_note_keeps_its_suspects_but_not_its_delivered_offsets(tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    written = time.time() - DELIVERED_FRESH_S - 60  # an operator may have reset offsets since
    note = {"written": written, "messages": [["t", 0, 1, 0]], "delivered": [["t", 0, 1]]}
    path.write_text(json.dumps(note))
    heir = restart(path)
    assert heir.suspects[("t", 0, 1)].deaths == 1
    assert heir.take_delivered([("t", 0)]) == {}


def test_an_unwritable_state_dir_turns_detection_off_without_stopping(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert journal_path(blocker / "sub", "g", "host", 0) is None
    journal = CrashJournal(None, 3)
    journal.note(ids(1))
    assert journal.plan(ids(1)).doomed == frozenset()


def test_an_unreadable_note_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    path.write_text("{not json")
    assert restart(path).suspects == {}
    path.write_text(json.dumps({"messages": [["t", 0, 1, 0]]}))
    assert restart(path).suspects[("t", 0, 1)].deaths == 1


# --- ownership after a fetch ----------------------------------------------------------
def msg(partition: int, offset: int) -> Message:
    return Message(topic="qr.images", partition=partition, offset=offset, value=b"x")


def test_messages_of_partitions_revoked_during_the_fetch_are_dropped() -> None:
    fetched = [
        Fetched(msg(0, 5), epoch=1),
        Fetched(msg(1, 7), epoch=1),  # partition 1 revoked afterwards
        Fetched(msg(2, 3), epoch=1),  # partition 2 revoked and re-assigned afterwards
        Fetched(msg(2, 0), epoch=3),  # ... and read again under the new assignment
        Fetched(msg(0, 6), epoch=1),
    ]
    assigned = {("qr.images", 0), ("qr.images", 2)}
    epochs = {("qr.images", 0): 1, ("qr.images", 1): 2, ("qr.images", 2): 3}
    keep, dropped = split_owned(fetched, assigned, epochs)
    assert [(m.partition(), m.offset()) for m in keep] == [(0, 5), (2, 0), (0, 6)]
    assert dropped == {("qr.images", 1): [7], ("qr.images", 2): [3]}


# --- DLQ copies and delivery failures ------------------------------------------------------
OUT = OutputConfig("qr.detections", "qr.images.dlq", max_record_bytes=10_000)


def intake(value: bytes, headers: list[tuple[str, bytes | None]] | None = None) -> Intake:
    return Intake(
        topic="qr.images",
        partition=1,
        offset=9,
        key=b"k",
        value=value,
        headers=headers or [],
        request_id="r",
    )


def test_a_dlq_copy_that_fits_is_the_original_with_error_headers() -> None:
    rec = dlq_record(intake(b"v" * 100, [("a", b"1")]), "corrupt_image", "bad", OUT)
    hdrs = names.header_dict(rec.headers)
    assert rec.value == b"v" * 100 and rec.key == b"k"
    assert hdrs["a"] == b"1" and hdrs[names.H_ERROR_CODE] == b"corrupt_image"
    assert names.H_ERROR_TRUNCATED not in hdrs


@pytest.mark.parametrize(
    ("value", "headers", "cut"),
    [
        (b"v" * 50_000, [], "value 50000"),
        (b"v" * 10, [("big", b"h" * 50_000)], "headers 1"),
    ],
)
def test_a_dlq_copy_too_large_is_truncated_and_says_so(
    value: bytes, headers: list[tuple[str, bytes | None]], cut: str
) -> None:
    rec = dlq_record(intake(value, headers), "image_too_large", "m" * 9000, OUT)
    assert rec.size() <= OUT.max_record_bytes
    hdrs = names.header_dict(rec.headers)
    assert cut in hdrs[names.H_ERROR_TRUNCATED].decode()
    assert hdrs[names.H_ERROR_CODE] == b"image_too_large"
    assert (rec.value or b"") == value[: len(rec.value or b"")], "a prefix of the original"


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (KafkaError.MSG_SIZE_TOO_LARGE, "permanent"),
        (KafkaError._UNKNOWN_PARTITION, "permanent"),
        (KafkaError.INVALID_RECORD, "permanent"),
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, "config"),
        (KafkaError._MSG_TIMED_OUT, "transient"),
        (KafkaError._TRANSPORT, "transient"),
        (KafkaError.NOT_ENOUGH_REPLICAS, "transient"),
    ],
)
def test_delivery_failures_are_sorted_by_whose_fault_they_are(code: int, kind: str) -> None:
    assert failure_kind(KafkaError(code)) == kind
