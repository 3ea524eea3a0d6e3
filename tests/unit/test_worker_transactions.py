"""Exactly-once decisions (consumer.transactions, consumer.batch): give back, rewind, stop."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, Message

from consumer.batch import one_at_a_time
from consumer.transactions import first_offsets, gives_back

TOPIC = "qr.images"


@pytest.mark.parametrize(
    ("error", "given_back"),
    [
        (KafkaError(KafkaError.ILLEGAL_GENERATION, txn_requires_abort=True), True),
        (KafkaError(KafkaError.REQUEST_TIMED_OUT, retriable=True), True),
        (KafkaError(KafkaError._FENCED, fatal=True), False),
        (KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED), False),
    ],
)
def test_only_failures_that_are_nobodys_fault_give_the_batch_back(
    error: KafkaError, given_back: bool
) -> None:
    assert gives_back(error) is given_back


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
