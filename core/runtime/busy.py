"""Which worker processes of this host have a batch in hand now.

A CPU worker with a batch of one image may run it on more ONNX Runtime threads
(``QRSIGHT_ORT_SOLO_THREADS``), taking the cores the other workers leave idle at low
load. It may do so only while they *are* idle: two lone images on two workers, each
asking for every core, would only fight over them. So each worker process owns one byte
of a small shared file, set while it has a batch in hand (``Pipeline.run``); reading the
others' bytes is a memory read, no lock and no system call (a race costs one image some
oversubscription, never a wrong answer).

The file lives in ``/dev/shm`` (the temp folder where there is none), one per consumer
group and user: containers each have their own ``/dev/shm``, so workers share a board
exactly when they share a host's cores. A worker resets its byte when it starts, so one
killed mid-batch (its byte left set) stops counting when it is restarted.

Idle *now* is not enough: between two batches a worker at full load is idle for a Kafka
round trip (a few ms), and a solo run that starts then collides with its next batch. So
each slot also keeps how long it has been busy in all (and since when, while marked), and
:meth:`BusyBoard.others_load` gives the others' busy time over the last
:data:`WINDOW_S` in cores: a lone image takes the wide session only while the others are
idle now *and* used less than :data:`LOW_LOAD` of a core over that window (one request
at a time, even alternating between two workers, keeps the other under half a core;
two or more in flight keep it over).
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

SLOTS = 256  # worker indexes are taken modulo this
SHM = Path("/dev/shm")
WINDOW_S = 1.0  # the others' load is their busy time over about this long
LOW_LOAD = 0.5  # cores: below this the others leave their cores to a lone image
# layout: one mark byte per slot, then per slot its busy seconds in all and the monotonic
# time its current mark was set (float64: CLOCK_MONOTONIC is one clock for the host)
_TOTALS = SLOTS
_SINCE = _TOTALS + 8 * SLOTS
SIZE = _SINCE + 8 * SLOTS
_ALL = struct.Struct(f"{SLOTS}d")
_ONE = struct.Struct("d")


def board_path(name: str, directory: Path | None = None) -> Path:
    """The board of group ``name`` for this user: in ``directory``, else ``/dev/shm``, else
    the temp folder."""
    if directory is None:
        directory = SHM if SHM.is_dir() else Path(tempfile.gettempdir())
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:100]
    return directory / f"qrsight-busy-{safe}-{os.getuid()}"


class BusyBoard:
    """Slot ``slot`` of the board of group ``name``: :meth:`running` marks this process
    busy for the duration of a batch; :meth:`others_busy` says whether another slot is
    marked, :meth:`others_load` how many cores the others used lately, and
    :meth:`others_idle` both together."""

    def __init__(
        self,
        name: str,
        slot: int,
        directory: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = board_path(name, directory)
        self._clock = clock
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < SIZE:
                os.ftruncate(fd, SIZE)
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        self.slot = slot % SLOTS
        self._map[self.slot] = 0
        self._seen: deque[tuple[float, float]] = deque()  # (when, the others' busy seconds)

    def others_busy(self) -> bool:
        marked = self._map[:SLOTS].count(1)
        return marked - (self._map[self.slot] == 1) > 0

    def others_load(self) -> float:
        """The cores the other slots kept busy since this reader's newest look at least
        :data:`WINDOW_S` ago (0.0 on the first look: nothing to compare with yet)."""
        now = self._clock()
        marks = self._map[:SLOTS]
        totals = _ALL.unpack_from(self._map, _TOTALS)
        since = _ALL.unpack_from(self._map, _SINCE)
        busy = sum(totals) - totals[self.slot]
        busy += sum(max(now - since[i], 0.0) for i in range(SLOTS) if marks[i] and i != self.slot)
        seen = self._seen
        seen.append((now, busy))
        while len(seen) > 2 and now - seen[1][0] >= WINDOW_S:
            seen.popleft()  # the newest look that is still a window old stays the base
        then, busy_then = seen[0]
        return (busy - busy_then) / (now - then) if now > then else 0.0

    def others_idle(self) -> bool:
        """No other worker has a batch in hand and together they used less than
        :data:`LOW_LOAD` of a core lately: their cores are free for a lone image."""
        load = self.others_load()  # looked at every time, so the window stays current
        return not self.others_busy() and load < LOW_LOAD

    @contextmanager
    def running(self) -> Iterator[None]:
        start = self._clock()
        _ONE.pack_into(self._map, _SINCE + 8 * self.slot, start)
        self._map[self.slot] = 1
        try:
            yield
        finally:
            self._map[self.slot] = 0
            at = _TOTALS + 8 * self.slot
            (total,) = _ONE.unpack_from(self._map, at)
            _ONE.pack_into(self._map, at, total + self._clock() - start)
