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
"""

from __future__ import annotations

import mmap
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SLOTS = 256  # worker indexes are taken modulo this
SHM = Path("/dev/shm")


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
    marked."""

    def __init__(self, name: str, slot: int, directory: Path | None = None) -> None:
        self.path = board_path(name, directory)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < SLOTS:
                os.ftruncate(fd, SLOTS)
            self._map = mmap.mmap(fd, SLOTS)
        finally:
            os.close(fd)
        self.slot = slot % SLOTS
        self._map[self.slot] = 0

    def others_busy(self) -> bool:
        marked = self._map[:].count(1)
        return marked - (self._map[self.slot] == 1) > 0

    @contextmanager
    def running(self) -> Iterator[None]:
        self._map[self.slot] = 1
        try:
            yield
        finally:
            self._map[self.slot] = 0
