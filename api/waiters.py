"""The waiter table: correlation id → the :class:`~concurrent.futures.Future` of its reply.

Each request in flight is one future (as Faust's ``ReplyPromise``): the caller blocks on
``future.result(timeout)``, the reply reader only completes it. A future is completed at
most once: a second reply for the same id (a worker that processed a request twice after a
restart) is dropped, never handed to another caller.

Correlation ids are unique by construction: :func:`new_request_id` makes a random one per
request, and :meth:`Waiters.add` refuses an id that is already waiting, so one caller can
never take another's reply.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

from api.metrics import REPLY_WAITERS
from core.runtime.errors import QrsightError
from core.runtime.results import DetectionResult
from core.runtime.telemetry import KafkaHeaders


def new_request_id() -> str:
    """A request (and correlation) id: 32 random hex digits."""
    return uuid.uuid4().hex


class DuplicateRequestError(QrsightError):
    """A request id that is already waiting for its reply: a caller's bug, never a client's
    (the API makes its ids)."""

    code = "duplicate_request_id"


@dataclass(frozen=True)
class Reply:
    """A decoded reply as the reader took it."""

    result: DetectionResult
    headers: KafkaHeaders | None  # the record's headers (the reply span links to them)
    received_ns: int  # when the reader took it (epoch ns, for the reply span)


class Waiters:
    """Thread-safe map correlation id → reply future; the gauge of waiters follows it."""

    def __init__(self) -> None:
        self._futures: dict[str, Future[Reply]] = {}
        self._lock = threading.Lock()

    def add(self, rid: str) -> Future[Reply]:
        """A new future for ``rid``; :class:`DuplicateRequestError` if one already waits."""
        future: Future[Reply] = Future()
        with self._lock:
            if rid in self._futures:
                raise DuplicateRequestError(
                    f"request id {rid!r} is already waiting for its reply", request_id=rid
                )
            self._futures[rid] = future
        REPLY_WAITERS.inc()
        return future

    def remove(self, rid: str) -> None:
        with self._lock:
            removed = self._futures.pop(rid, None)
        if removed is not None:
            REPLY_WAITERS.dec()

    def complete(self, rid: str, reply: Reply) -> bool:
        """Hand ``reply`` to the caller waiting for ``rid``; False when none waits (it timed
        out, it belongs to another process, or it was already answered)."""
        with self._lock:
            future = self._futures.get(rid)
        if future is None:
            return False
        try:
            future.set_result(reply)
        except InvalidStateError:  # a second reply for one request: the first one stands
            return False
        return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._futures)
