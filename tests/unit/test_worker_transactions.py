"""Exactly-once decisions (consumer.transactions, consumer.batch): retry, give back, rewind,
exit; and every transactional call bounded, even one that never returns."""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import KafkaError, KafkaException, Message

from consumer.batch import one_at_a_time
from consumer.recovery import Stopping
from consumer.transactions import (
    STUCK_GRACE_S,
    Step,
    TransactionStuckError,
    bounded_call,
    call_with_retries,
    decide,
    first_offsets,
)

TOPIC = "qr.images"


@pytest.mark.parametrize(
    ("error", "spent_s", "step"),
    [
        # a rebalance fenced the generation: abort, rewind, the partitions' owner redoes it
        (KafkaError(KafkaError.ILLEGAL_GENERATION, txn_requires_abort=True), 0.0, Step.ABORT),
        # the coordinator is failing over: the same call again (librdkafka resumes it) ...
        (KafkaError(KafkaError._TIMED_OUT, retriable=True), 10.0, Step.RETRY),
        (KafkaError(KafkaError.COORDINATOR_NOT_AVAILABLE, retriable=True), 0.0, Step.RETRY),
        # ... but not for ever: past the budget the worker exits and is restarted
        (KafkaError(KafkaError._TIMED_OUT, retriable=True), 60.0, Step.EXIT),
        # fenced by a newer instance, or not allowed: exit without committing
        (KafkaError(KafkaError._FENCED, fatal=True), 0.0, Step.EXIT),
        (KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED), 0.0, Step.EXIT),
    ],
)
def test_a_failed_transactional_call_is_retried_within_a_budget_aborted_or_ends_the_worker(
    error: KafkaError, spent_s: float, step: Step
) -> None:
    assert decide(error, spent_s, budget_s=60.0) is step


def never_returns(release: threading.Event) -> None:
    """What librdkafka's ``send_offsets_to_transaction`` did after the coordinator died:
    block past its own timeout (confluentinc/librdkafka#5456)."""
    release.wait()


def test_a_transactional_call_that_never_returns_is_given_up_after_its_limit() -> None:
    release = threading.Event()
    started = time.monotonic()
    try:
        with pytest.raises(TransactionStuckError):
            bounded_call(
                lambda: never_returns(release),
                "send_offsets_to_transaction",
                limit_s=0.5,
                stop=threading.Event(),
                stop_wait_s=10.0,
            )
    finally:
        release.set()
    assert time.monotonic() - started < 5.0


def test_a_stop_request_ends_the_wait_for_a_stuck_transactional_call() -> None:
    release, stop = threading.Event(), threading.Event()
    threading.Timer(0.2, stop.set).start()  # SIGTERM arrives while the call hangs
    started = time.monotonic()
    try:
        with pytest.raises(Stopping):
            bounded_call(
                lambda: never_returns(release),
                "commit_transaction",
                limit_s=60.0,
                stop=stop,
                stop_wait_s=0.3,
            )
    finally:
        release.set()
    assert time.monotonic() - started < 5.0


def test_a_retriable_failure_is_retried_and_the_call_then_succeeds() -> None:
    calls: list[int] = []

    def commit() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise KafkaException(
                KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS, retriable=True)
            )

    call_with_retries(
        commit,
        "commit_transaction",
        call_s=1.0,
        budget_s=5.0,
        stop=threading.Event(),
        stop_wait_s=1.0,
    )
    assert len(calls) == 2


def test_retriable_failures_end_once_the_budget_is_spent() -> None:
    calls: list[int] = []

    def commit() -> None:
        calls.append(1)
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, retriable=True))

    started = time.monotonic()
    with pytest.raises(KafkaException):
        call_with_retries(
            commit,
            "commit_transaction",
            call_s=0.1,
            budget_s=1.0,
            stop=threading.Event(),
            stop_wait_s=1.0,
        )
    assert 1.0 <= time.monotonic() - started < 1.0 + 5.0 + STUCK_GRACE_S
    assert len(calls) >= 2


def test_an_aborted_batch_resumes_at_each_partitions_first_offset() -> None:
    positions = [((TOPIC, 0), 12), ((TOPIC, 1), 4), ((TOPIC, 0), 10), ((TOPIC, 1), 5)]
    assert first_offsets(positions) == {(TOPIC, 0): 10, (TOPIC, 1): 4}


def test_an_aborted_transaction_one_at_a_time_stops_the_batch_so_later_offsets_do_not_pass_it() -> (
    None
):
    msgs = [Message(topic=TOPIC, partition=0, offset=o, value=b"x") for o in (1, 2, 3)]
    ran: list[int] = []

    def run_one(msg: Message) -> bool:
        ran.append(msg.offset() or 0)
        return msg.offset() != 1  # m1's transaction is aborted and its partition rewound

    assert one_at_a_time(msgs, run_one) == 1
    assert ran == [1], "m2 must not commit past m1, which is read again from the rewind"
