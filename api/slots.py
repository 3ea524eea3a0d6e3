"""Which partition of the replies topic this process reads.

Each API process should own its reply partition. Two processes on one partition lose
nothing (each reads the whole partition with manual assignment, no group, and completes
only its own waiters), but each fetches and discards the other's replies. The partition is
``QRSIGHT_API_REPLY_PARTITION`` (default 0) plus this process's *slot*:

- under gunicorn, the master gives every worker the lowest slot no live worker holds
  (``pre_fork`` in ``api/gunicorn.conf.py``) and the worker records it here
  (``post_fork``); a restarted worker takes over the slot, and so the partition, of the
  worker it replaces, so N workers always use partitions base … base + N - 1;
- a single process outside gunicorn (tests, ``flask run``) has slot 0.

Several hosts or pods share one replies topic by giving each a different base, e.g.
pod ordinal x ``QRSIGHT_API_WORKERS``; ``QRSIGHT_REPLIES_PARTITIONS`` must cover them all.
"""

from __future__ import annotations

from collections.abc import Iterable

from core.runtime.settings import Settings

# One value per process, set once after the fork (before the app is built).
_slot = {"value": 0}


def set_process_slot(slot: int) -> None:
    _slot["value"] = slot


def process_slot() -> int:
    return _slot["value"]


def lowest_free_slot(taken: Iterable[int]) -> int:
    used = set(taken)
    slot = 0
    while slot in used:
        slot += 1
    return slot


def reply_partition(settings: Settings) -> int:
    return (settings.api_reply_partition or 0) + process_slot()
