"""One micro-batch in hand: its messages, what they parsed to, their results, its trace.

Per-batch state lives here and is passed along, not on the long-lived worker, so nothing
of one batch can leak into the next and a callback sees only the batch it was given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Message

from consumer.intake import Intake
from consumer.journal import MessageId
from consumer.ownership import Key, message_key
from core.runtime.telemetry import BatchTrace, StageLog


def message_id(msg: Message) -> MessageId:
    return (msg.topic() or "", msg.partition() or 0, msg.offset() or 0)


@dataclass
class Batch:
    msgs: Sequence[Message]
    epochs: dict[Key, int]  # each partition's assignment epoch when the batch was fetched
    suspect: bool = False  # one message of a batch the worker died on: wait for its commit
    items: list[Intake] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    trace: BatchTrace = field(default_factory=BatchTrace)
    dlq_caps: dict[int, int] = field(default_factory=dict)  # item → DLQ copy size cap

    @property
    def ids(self) -> list[MessageId]:
        return [message_id(m) for m in self.msgs if m.error() is None]

    @property
    def stages(self) -> StageLog | None:
        return self.trace.stages


def stamp_epochs(msgs: Sequence[Message], epoch: Callable[[Key], int]) -> dict[Key, int]:
    return {message_key(m): epoch(message_key(m)) for m in msgs if m.error() is None}


def one_at_a_time(msgs: Sequence[Message], run_one: Callable[[Message], bool]) -> int:
    """Run a batch the worker died on one message at a time; returns how many ran.

    ``run_one`` returns False when its message was given back (an aborted transaction,
    its partition rewound): the batch stops there. Going on would commit later offsets
    past the given-back message (and, when it is read again, move the offset backwards,
    publishing the later ones twice)."""
    ran = 0
    for msg in msgs:
        ran += 1
        if not run_one(msg):
            break
    return ran
