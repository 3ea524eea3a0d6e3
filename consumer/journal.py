"""Recognising a message that kills the worker (a native crash, an OOM kill, or a hang that
:mod:`consumer.watchdog` turns into an exit).

An exception can be retried in the process (:mod:`consumer.recovery`); a death cannot.
Without help, a worker that dies on a message is restarted, reads the same uncommitted
batch and dies again, for ever, and the partition stops. So before each batch the worker
notes the batch's messages in a small file (``QRSIGHT_STATE_DIR``, one file per worker
identity) and removes the note when the batch is done. A note found at start means the
previous worker with this identity died with those messages in hand:

- after fewer than ``QRSIGHT_CRASH_LIMIT`` deaths on a message, its batch runs as usual;
- at the limit, the batch runs one message at a time (each noted alone), so the next
  death names the one message that causes it;
- a message that was alone in hand at the limit is not run again: it gets an ``ERROR``
  result with code ``quarantined`` and its DLQ copy.

The note also carries the offsets of batches whose results were delivered but whose
asynchronous commit was not yet confirmed (at-least-once only). A death while that commit
is in flight would otherwise re-deliver a whole finished batch to the restarted worker;
instead, when the partitions come back to it, it commits those offsets first (never moving
a committed offset backwards), so a death on a message re-delivers only the batch it was
in. A note older than ``DELIVERED_FRESH_S`` keeps its suspects but not these offsets: an
operator who reset the group's offsets while the workers were down is not overruled.

Only deaths the message in hand can cause are counted: a native crash, an OOM kill, a
hang (the watchdog's ``SIGALRM``), a ``SIGKILL`` out of the blue. A worker that was told to
stop is not killed by its message: on ``SIGTERM``/``SIGINT`` (a rollout, a scale-down, its
supervisor stopping) the worker's signal handler records its pid in a second small file
(:meth:`CrashJournal.stopping`), and a note left by a pid that recorded this is read
without counting a death, however the process then ended (its own exit after
``QRSIGHT_SHUTDOWN_TIMEOUT_S``, the supervisor's or the kubelet's ``SIGKILL`` after the
grace period). The record must come from the worker itself, not from whoever sent the
signal: a worker whose message holds it in a loop that keeps the GIL cannot run its handler
(and fails its liveness probe, so the kubelet stops it before the watchdog's alarm): that
stop is the message's doing, and it is counted.

Writing the note costs one small file write per batch (no fsync: a process death keeps
the page cache; a machine crash is not a poison message). The note is per worker
identity, so it follows a restarted worker (same supervisor slot, same StatefulSet pod:
``/tmp`` is an ``emptyDir`` that outlives container restarts); a partition that moves to
another worker starts that worker's count afresh, which bounds the deaths per poison
message by workers x limit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MessageId = tuple[str, int, int]  # topic, partition, offset
Key = tuple[str, int]  # topic, partition

# a dead predecessor's delivered offsets are trusted this long (a supervisor restart takes
# seconds, Kubernetes' crash-loop back-off at most 5 minutes)
DELIVERED_FRESH_S = 600.0


@dataclass(frozen=True)
class Suspect:
    deaths: int  # worker deaths with this message in hand
    alone: bool  # it was the only message in hand at the last death


@dataclass(frozen=True)
class Plan:
    """How to run a batch: ``doomed`` are quarantined unrun; ``one_at_a_time`` splits it."""

    doomed: frozenset[MessageId]
    one_at_a_time: bool


class CrashJournal:
    def __init__(self, path: Path | None, limit: int) -> None:
        self.path = path
        self.limit = limit
        self.suspects: dict[MessageId, Suspect] = {}
        # next offsets whose results a dead predecessor delivered, commit unconfirmed
        self.delivered: dict[Key, int] = {}
        self._noted = False

    @property
    def stop_path(self) -> Path | None:
        """Where a worker told to stop records its pid (:meth:`stopping`)."""
        return None if self.path is None else self.path.with_suffix(".stopping")

    def stopping(self) -> None:
        """The worker was told to stop (called from its SIGTERM/SIGINT handler): however it
        ends now, the batch in hand did not kill it."""
        path = self.stop_path
        if path is None:
            return
        with contextlib.suppress(OSError), open(path, "a", encoding="utf-8") as out:
            out.write(f"{os.getpid()}\n")

    def _stopped_pids(self) -> set[int]:
        """The pids that recorded a stop, once: the record is removed as it is read."""
        path = self.stop_path
        if path is None:
            return set()
        try:
            text = path.read_text(encoding="utf-8")
            path.unlink()
        except OSError:
            return set()
        return {int(word) for word in text.split() if word.isdigit()}

    def recover(self) -> int:
        """Read a note a dead predecessor left; returns how many messages it names."""
        stopped = self._stopped_pids()
        if self.path is None or not self.path.exists():
            return 0
        try:
            note = json.loads(self.path.read_text(encoding="utf-8"))
            entries = [(str(t), int(p), int(o), int(d)) for t, p, o, d in note["messages"]]
            delivered = {(str(t), int(p)): int(o) for t, p, o in note.get("delivered", ())}
            written = float(note.get("written", 0.0))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("unreadable worker note ignored path=%s error=%s", self.path, exc)
            return 0
        if note.get("pid") in stopped:
            self._excuse(entries, note.get("pid"))
        else:
            self._count_death(entries, note.get("pid"))
        if time.time() - written <= DELIVERED_FRESH_S:
            self.delivered = delivered
        elif delivered:
            logger.info(
                "stale worker note: its delivered offsets are not applied path=%s", self.path
            )
        return len(entries)

    def _count_death(self, entries: list[tuple[str, int, int, int]], pid: object) -> None:
        alone = len(entries) == 1
        for t, p, o, d in entries:
            self.suspects[(t, p, o)] = Suspect(d + 1, alone)
        worst = max((d + 1 for *_, d in entries), default=0)
        logger.warning(
            "the previous worker died with messages in hand messages=%d deaths=%d limit=%d pid=%s",
            len(entries),
            worst,
            self.limit,
            pid,
        )

    def _excuse(self, entries: list[tuple[str, int, int, int]], pid: object) -> None:
        """A predecessor told to stop: its messages keep the deaths they had."""
        alone = len(entries) == 1
        for t, p, o, d in entries:
            if d > 0:
                self.suspects[(t, p, o)] = Suspect(d, alone)
        logger.info(
            "the previous worker was told to stop with messages in hand: not a death of "
            "theirs messages=%d pid=%s",
            len(entries),
            pid,
        )

    def plan(self, ids: Iterable[MessageId]) -> Plan:
        doomed: set[MessageId] = set()
        split = False
        for mid in ids:
            suspect = self.suspects.get(mid)
            if suspect is None or suspect.deaths < self.limit:
                continue
            if suspect.alone:
                doomed.add(mid)
            else:
                split = True
        return Plan(frozenset(doomed), split)

    def take_delivered(self, keys: Iterable[Key]) -> dict[Key, int]:
        """The predecessor's delivered offsets of these (just assigned) partitions, once."""
        return {k: self.delivered.pop(k) for k in keys if k in self.delivered}

    def note(self, ids: Iterable[MessageId], delivered: Mapping[Key, int] | None = None) -> None:
        """Before a batch: these messages are in hand (with the deaths seen on them), and
        ``delivered``: next offsets whose results are delivered but whose commit is not
        confirmed yet."""
        if self.path is None:
            return
        messages = [
            [t, p, o, self.suspects[(t, p, o)].deaths if (t, p, o) in self.suspects else 0]
            for t, p, o in ids
        ]
        note = {
            "pid": os.getpid(),
            "written": time.time(),
            "messages": messages,
            "delivered": [[t, p, o] for (t, p), o in (delivered or {}).items()],
        }
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(note), "utf-8")
            tmp.replace(self.path)
            self._noted = True
        except OSError as exc:
            logger.warning(
                "cannot write the worker note, crash detection off path=%s error=%s "
                "(set QRSIGHT_STATE_DIR to a writable folder)",
                self.path,
                exc,
            )
            self.path = None

    def clear(self) -> None:
        """The worker is leaving by its own decision (stop, model or broker failure): what
        it had in hand did not kill it, so it must not count as a death."""
        self.done(())

    def done(self, ids: Iterable[MessageId]) -> None:
        """After a batch is delivered and committed: nothing is in hand."""
        for mid in ids:
            self.suspects.pop(mid, None)
        if self.path is not None and self._noted:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._noted = False


def journal_path(state_dir: Path, group: str, identity: str, index: int) -> Path | None:
    """The note file of one worker identity; None (no notes) when the folder is unusable."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        logger.warning(
            "no worker notes, crash detection off state_dir=%s error=%s "
            "(set QRSIGHT_STATE_DIR to a writable folder)",
            state_dir,
            exc,
        )
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{group}.{identity}")
    return state_dir / f"{safe}.{index}.json"
