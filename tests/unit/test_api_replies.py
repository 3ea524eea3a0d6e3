"""The reply client's decisions, without a broker: waiters, where the reader starts, whose
reply a record is, when the supervisor restarts or gives up, the request's headers and
the API producer's settings."""

from __future__ import annotations

import threading
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, cast

import pytest
from confluent_kafka import OFFSET_END

from api.reader import correlation_id, partition_problem, start_offset
from api.sender import api_producer_config, request_headers
from api.supervisor import RESTART_WINDOW_S, Decision, RestartHistory, restart_decision
from api.waiters import DuplicateRequestError, Reply, Waiters, new_request_id
from core.runtime.results import DetectionResult
from schemas.names import (
    H_CORRELATION_ID,
    H_DEADLINE_MS,
    H_REPLY_PARTITION,
    H_REPLY_TOPIC,
    H_TRACEPARENT,
    decode_deadline,
    decode_partition,
    header_dict,
)
from tests.unit.test_api_helpers import api_settings

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def result(request_id: str = "r-1") -> DetectionResult:
    return cast(DetectionResult, {"request_id": request_id, "status": "OK", "error": None})


def reply(request_id: str = "r-1") -> Reply:
    return Reply(result(request_id), None, 0)


# --- waiters --------------------------------------------------------------------------------
def test_a_reply_completes_the_future_of_its_request_only() -> None:
    waiters = Waiters()
    mine, other = waiters.add("mine"), waiters.add("other")
    assert waiters.complete("mine", reply("mine"))
    assert mine.result(0).result["request_id"] == "mine"
    assert not other.done()
    assert len(waiters) == 2


def test_a_second_reply_for_one_request_does_not_replace_the_first() -> None:
    waiters = Waiters()
    future = waiters.add("r-1")
    first, second = reply(), reply()
    assert waiters.complete("r-1", first)
    assert not waiters.complete("r-1", second)
    assert future.result(0) is first


def test_a_reply_nobody_waits_for_is_dropped() -> None:
    waiters = Waiters()
    future = waiters.add("r-1")
    waiters.remove("r-1")
    assert not waiters.complete("r-1", reply())
    assert not future.done()
    assert len(waiters) == 0


def test_an_id_already_waiting_is_refused() -> None:
    waiters = Waiters()
    waiters.add("r-1")
    with pytest.raises(DuplicateRequestError) as refused:
        waiters.add("r-1")
    assert refused.value.request_id == "r-1"


def test_a_waiter_without_a_reply_times_out() -> None:
    future = Waiters().add("r-1")
    with pytest.raises(FutureTimeout):
        future.result(0.01)


def test_a_waiting_thread_wakes_when_the_reader_completes_its_future() -> None:
    waiters = Waiters()
    future = waiters.add("r-1")
    got: list[Reply] = []
    waiting = threading.Thread(target=lambda: got.append(future.result(5)))
    waiting.start()
    waiters.complete("r-1", reply())
    waiting.join(5)
    assert got and got[0].result["request_id"] == "r-1"


def test_request_ids_are_32_hex_digits_and_distinct() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


# --- the reader's decisions -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("resume_at", "high", "start"),
    [
        (None, 42, 42),  # first assignment: the high watermark read before it
        (None, 0, 0),
        (None, -1, OFFSET_END),  # the broker does not know it: the end
        (17, 42, 17),  # a restarted reader resumes after the last reply it read
    ],
)
def test_the_reader_starts_at_the_high_watermark_or_where_it_stopped(
    resume_at: int | None, high: int, start: int
) -> None:
    assert start_offset(resume_at, high) == start


@pytest.mark.parametrize(
    ("partitions", "problem"),
    [
        ({0, 1, 2}, None),
        (None, "does not exist"),
        ({0, 1}, "has 2 partitions, no partition 2: raise QRSIGHT_REPLIES_PARTITIONS"),
    ],
)
def test_partition_problems_name_the_fix(partitions: set[int] | None, problem: str | None) -> None:
    found = partition_problem("qr.replies", 2, partitions)
    assert found == problem if problem is None else problem in (found or "")


@pytest.mark.parametrize(
    ("headers", "key", "rid"),
    [
        ([(H_CORRELATION_ID, b"from-header")], b"from-key", "from-header"),
        ([(H_CORRELATION_ID, None)], b"from-key", "from-key"),
        (None, b"from-key", "from-key"),
        (None, None, "from-result"),
        ([(H_CORRELATION_ID, b"\xff-bad")], None, "\ufffd-bad"),
    ],
)
def test_a_reply_belongs_to_its_correlation_id_then_key_then_request_id(
    headers: Any, key: bytes | None, rid: str
) -> None:
    assert correlation_id(headers, key, result("from-result")) == rid


# --- the supervisor's decisions -------------------------------------------------------------
@pytest.mark.parametrize(
    ("recent", "dead_for", "decision"),
    [
        (0, 0.5, Decision.WAIT),  # first death: 1 s back-off
        (0, 1.0, Decision.RESTART),
        (1, 1.5, Decision.WAIT),  # then 2 s, 4 s, 8 s, 16 s
        (1, 2.0, Decision.RESTART),
        (3, 7.9, Decision.WAIT),
        (4, 16.0, Decision.RESTART),
        (5, 100.0, Decision.GIVE_UP),  # max_restarts (5) already used within the window
    ],
)
def test_a_dead_reader_is_restarted_after_a_doubling_back_off_then_given_up(
    recent: int, dead_for: float, decision: Decision
) -> None:
    assert restart_decision(recent, 100.0, 100.0 + dead_for, max_restarts=5) is decision


def test_the_restart_back_off_is_capped_at_30_s() -> None:
    assert restart_decision(9, 0.0, 29.9, max_restarts=50) is Decision.WAIT
    assert restart_decision(9, 0.0, 30.0, max_restarts=50) is Decision.RESTART


def test_restarts_older_than_the_window_are_forgotten() -> None:
    history = RestartHistory()
    for at in (0.0, 10.0, 20.0):
        history.add(at)
    assert history.recent(20.0) == 3
    assert history.recent(RESTART_WINDOW_S + 15.0) == 1


# --- the sender ------------------------------------------------------------------------------
def test_request_headers_route_the_reply_and_carry_the_deadline() -> None:
    headers = header_dict(request_headers("r-1", "qr.replies", 7, 1_700_000_000_123, TRACEPARENT))
    assert headers[H_CORRELATION_ID] == b"r-1"
    assert headers[H_REPLY_TOPIC] == b"qr.replies"
    assert decode_partition(headers[H_REPLY_PARTITION]) == 7
    assert decode_deadline(headers[H_DEADLINE_MS]) == 1_700_000_000_123
    assert headers[H_TRACEPARENT] == TRACEPARENT.encode()
    assert "content_type" not in headers  # that one announces a raw image value


def test_the_api_producer_is_idempotent_and_gives_up_within_the_request_timeout() -> None:
    settings = api_settings(api_produce_timeout_ms=1500, api_timeout_ms=5000)
    conf = api_producer_config(settings)
    assert conf["enable.idempotence"] is True
    assert conf["acks"] == "all"
    assert conf["message.timeout.ms"] == 1500 < settings.api_timeout_ms
    assert conf["linger.ms"] == 0
