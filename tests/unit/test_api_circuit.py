"""The write circuit: when Kafka stops taking writes, new requests are refused at once, one
trial goes out after a back-off, and a delivery closes it again. A clock is passed in."""

from __future__ import annotations

import time
from concurrent.futures import Future

import pytest

from api import create_app
from api.circuit import WriteCircuit, retry_after_s
from api.replies import ReplyClient
from api.sender import Sender
from core.runtime.backoff import Backoff
from core.runtime.errors import KafkaUnavailableError
from core.runtime.kafka import avro_codec
from tests.unit.test_api_helpers import api_settings, png


def circuit() -> WriteCircuit:
    return WriteCircuit(threshold=3, backoff=Backoff(1.0, 8.0), trial_timeout_s=10.0)


def test_closed_while_writes_succeed_or_fail_less_than_the_threshold() -> None:
    breaker = circuit()
    breaker.failed(0.0, "_MSG_TIMED_OUT")
    breaker.failed(0.1, "_MSG_TIMED_OUT")
    breaker.succeeded()
    breaker.failed(0.2, "_MSG_TIMED_OUT")
    breaker.failed(0.3, "_MSG_TIMED_OUT")
    assert breaker.refusal(0.4) is None
    assert breaker.problem(0.4) is None


def test_three_failed_writes_in_a_row_refuse_new_requests_with_a_retry_time() -> None:
    breaker = circuit()
    for at in (0.0, 0.1, 0.2):
        breaker.failed(at, "NOT_ENOUGH_REPLICAS")
    assert breaker.refusal(0.5) == pytest.approx(0.7)
    problem = breaker.problem(0.5)
    assert problem is not None
    assert "NOT_ENOUGH_REPLICAS" in problem and "next try in 1 s" in problem


def test_every_broker_down_with_writes_waiting_opens_it_at_once() -> None:
    breaker = circuit()
    breaker.all_brokers_down(5.0, "every broker is unreachable", writes_waiting=True)
    assert breaker.refusal(5.0) == pytest.approx(1.0)
    assert "every broker is unreachable" in (breaker.problem(5.0) or "")


def test_every_broker_down_while_idle_waits_for_a_failed_write() -> None:
    """A broker closing an idle connection makes the same report: nothing is refused on it
    alone, but the first write that then fails opens the circuit."""
    breaker = circuit()
    breaker.all_brokers_down(5.0, "every broker is unreachable", writes_waiting=False)
    assert breaker.refusal(5.1) is None
    breaker.failed(6.1, "no acknowledgement in time")
    assert breaker.refusal(6.2) is not None
    assert "every broker is unreachable" in (breaker.problem(6.2) or "")


def test_an_idle_disconnect_then_a_delivery_leaves_it_closed() -> None:
    breaker = circuit()
    breaker.all_brokers_down(5.0, "every broker is unreachable", writes_waiting=False)
    breaker.succeeded()  # the next write reconnected and was delivered
    breaker.failed(7.0, "_MSG_TIMED_OUT")
    assert breaker.refusal(7.1) is None


def test_after_the_back_off_one_trial_goes_out_and_the_others_wait() -> None:
    breaker = circuit()
    breaker.all_brokers_down(0.0, "every broker is unreachable", writes_waiting=True)
    assert breaker.refusal(1.0) is None  # the trial
    assert breaker.refusal(1.1) is not None  # everyone else, while it is out
    assert breaker.problem(1.1) is None  # half-open: /ready lets traffic come back


def test_a_delivered_trial_closes_it() -> None:
    breaker = circuit()
    breaker.all_brokers_down(0.0, "every broker is unreachable", writes_waiting=True)
    assert breaker.refusal(1.0) is None
    breaker.succeeded()
    assert breaker.refusal(1.1) is None
    assert breaker.refusal(1.2) is None
    assert not breaker.is_open()


@pytest.mark.parametrize(("trials_failed", "open_s"), [(1, 2.0), (2, 4.0), (3, 8.0), (6, 8.0)])
def test_a_failed_trial_opens_it_again_for_longer_up_to_the_cap(
    trials_failed: int, open_s: float
) -> None:
    breaker = circuit()
    breaker.all_brokers_down(0.0, "every broker is unreachable", writes_waiting=True)
    now = 1.0
    for _ in range(trials_failed):
        assert breaker.refusal(now) is None
        breaker.failed(now, "_MSG_TIMED_OUT")
        wait = breaker.refusal(now)
        assert wait is not None
        now += wait
    assert wait == pytest.approx(open_s)


def test_a_trial_that_never_reports_frees_its_turn() -> None:
    breaker = circuit()
    breaker.all_brokers_down(0.0, "every broker is unreachable", writes_waiting=True)
    assert breaker.refusal(1.0) is None
    assert breaker.refusal(5.0) is not None
    assert breaker.refusal(11.0) is None


@pytest.mark.parametrize(("seconds", "header"), [(0.01, 1), (0.99, 1), (1.0, 1), (1.2, 2), (8, 8)])
def test_retry_after_is_whole_seconds_and_at_least_one(seconds: float, header: int) -> None:
    assert retry_after_s(seconds) == header


def test_detect_answers_503_with_retry_after_at_once_while_the_circuit_is_open() -> None:
    settings = api_settings()
    replies = ReplyClient(settings, 0)
    replies.reader.ready.set()  # as if the reply partition were assigned
    replies.sender.circuit.all_brokers_down(
        time.monotonic(), "every broker is unreachable", writes_waiting=True
    )
    client = create_app(settings, reply_client=replies).test_client()
    started = time.monotonic()
    response = client.post("/api/v1/detect", data=png(), content_type="image/png")
    assert time.monotonic() - started < 0.5
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    error = response.get_json()["error"]
    assert error["code"] == "kafka_unavailable"
    assert "not taking writes (every broker is unreachable)" in error["message"]
    assert replies.pending() == 0


def test_requests_kafka_never_acknowledged_open_it_for_the_next_ones() -> None:
    """Counted when the caller stops waiting, not when librdkafka's own report comes a little
    later, so that the very next request is refused at once."""
    settings = api_settings(api_produce_timeout_ms=100)
    sender = Sender(settings, avro_codec(settings, "ImageRequest"))
    for n in range(3):
        never: Future[None] = Future()
        with pytest.raises(KafkaUnavailableError, match="did not accept the request within 100"):
            sender.await_delivery(f"r-{n}", never)
        assert never.cancelled()  # its late report is not counted again
    with pytest.raises(KafkaUnavailableError) as refused:
        sender.refuse_if_open("r-4")
    assert refused.value.context["retry_after"] == 1
