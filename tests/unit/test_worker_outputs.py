"""A batch's records, what becomes of those the broker refuses, and a producer refused for
good (consumer.outputs, consumer.processing)."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError

from consumer.intake import Intake
from consumer.outputs import (
    DeliveryError,
    Failure,
    OutputConfig,
    OutRecord,
    absorb,
    batch_records,
)
from consumer.processing import refused_write
from core.runtime.errors import ConfigError
from core.runtime.results import error_code
from core.runtime.settings import load_settings
from schemas import names
from schemas.codec import Codec

OUT = OutputConfig("qr.detections", "qr.images.dlq", max_record_bytes=10_000)
CODEC = Codec("DetectionResult")


def ok_result(request_id: str) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "source": None,
        "status": names.STATUS_OK,
        "error": None,
        "image": {"width": 10, "height": 10},
        "model": None,
        "detections": [],
        "timings": dict.fromkeys(("queue_ms", "decode_ms", "infer_ms", "post_ms", "total_ms"), 0.0),
        "created_at": 1,
    }


def item(request_id: str) -> Intake:
    return Intake(
        topic="qr.images",
        partition=0,
        offset=3,
        key=b"k",
        value=b"img",
        headers=[],
        request_id=request_id,
        reply_topic="qr.replies",
        reply_partition=2,
    )


def records(
    items: list[Intake], results: list[dict[str, Any]], caps: dict[int, int]
) -> list[OutRecord]:
    return batch_records(
        items, results, CODEC, OUT, trace_headers=lambda _i, _r, _t: [], dlq_caps=caps
    )


def refused(rec: OutRecord) -> Failure:
    return Failure(rec, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))


def test_a_reply_too_large_for_its_topic_becomes_an_error_reply_the_caller_sees() -> None:
    items, results, caps = [item("r1")], [ok_result("r1")], {}
    first = records(items, results, caps)
    reply = next(r for r in first if r.kind == "reply")
    absorb(items, results, [refused(reply)], caps)
    again = [r for r in records(items, results, caps) if r.kind == "reply"]
    assert len(again) == 1, "the caller must get an answer, not wait for its timeout"
    (sent,) = again
    assert (sent.topic, sent.partition) == ("qr.replies", 2)
    decoded = CODEC.decode(sent.value or b"", "qr.replies")
    assert decoded["status"] == names.STATUS_ERROR
    assert error_code(decoded) == "result_undeliverable"
    assert "reply" in decoded["error"]["message"]
    # the event on qr.detections stays the image's real result
    (event,) = [r for r in again + first if r.kind == "result"][:1]
    assert CODEC.decode(event.value or b"", "qr.detections")["status"] == names.STATUS_OK


def test_an_error_reply_refused_too_is_dropped_rather_than_retried_for_ever() -> None:
    items, results, caps = [item("r1")], [ok_result("r1")], {}
    for _ in range(2):
        reply = next(r for r in records(items, results, caps) if r.kind == "reply")
        absorb(items, results, [refused(reply)], caps)
    assert [r for r in records(items, results, caps) if r.kind == "reply"] == []


def test_a_result_too_large_becomes_an_error_result_with_a_dlq_copy() -> None:
    items, results, caps = [item("r1")], [ok_result("r1")], {}
    result = next(r for r in records(items, results, caps) if r.kind == "result")
    absorb(items, results, [refused(result)], caps)
    assert error_code(results[0]) == "result_undeliverable"
    assert {r.kind for r in records(items, results, caps)} == {"result", "reply", "dlq"}


@pytest.mark.parametrize(
    ("code", "raised", "says"),
    [
        # no retry grants an ACL: the worker exits naming the grant and is not restarted
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, ConfigError, "topic qr.detections .*topics acls"),
        # a broker that went away is restarted (the batch stays uncommitted)
        (KafkaError._MSG_TIMED_OUT, DeliveryError, "not delivered"),
    ],
)
def test_a_refused_write_ends_the_worker_as_a_setting_to_fix_a_lost_one_as_a_failure(
    code: int, raised: type[Exception], says: str
) -> None:
    items, results, caps = [item("r1")], [ok_result("r1")], {}
    result = next(r for r in records(items, results, caps) if r.kind == "result")
    with pytest.raises(raised, match=says):
        absorb(items, results, [Failure(result, KafkaError(code))], caps)
    assert results[0]["status"] == names.STATUS_OK, "nothing in hand was turned into an error"


@pytest.mark.parametrize(
    ("code", "names_it"),
    [
        # a user who may write nowhere gets no idempotent producer id (a fatal error)
        (KafkaError.CLUSTER_AUTHORIZATION_FAILED, "not allowed to write to cluster kafka-cluster"),
        (KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, "transactional id qrsight-workers-h-0"),
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, "topic qr.detections"),
    ],
)
def test_a_producer_refused_for_good_names_the_grant_it_lacks(code: int, names_it: str) -> None:
    settings = load_settings({}, kafka_sasl_username="reader")
    problem = refused_write(KafkaError(code, fatal=True), settings, "qrsight-workers-h-0")
    assert problem is not None
    assert "Kafka user 'reader'" in problem.message and names_it in problem.message
    assert "qrsight-topics acls" in problem.message


def test_a_producer_that_failed_otherwise_is_no_setting_to_fix() -> None:
    fenced = KafkaError(KafkaError._FENCED, fatal=True)
    assert refused_write(fenced, load_settings({}), None) is None
