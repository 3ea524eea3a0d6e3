"""Which partition of the replies topic this process reads.

Each API process should own its reply partition. Two processes on one partition lose
nothing (each reads the whole partition with manual assignment, no group, and completes
only its own waiters), but each fetches and discards the other's replies. The partition is
a *base* plus this process's *slot*:

- the base is ``QRSIGHT_API_REPLY_PARTITION`` when set (the Kubernetes manifest sets it
  from the pod-index label, Kubernetes >= 1.28); else, on Kubernetes, the StatefulSet
  ordinal at the end of the host name (``qrsight-api-3`` → 3) x ``QRSIGHT_API_WORKERS``,
  so that pods of an older cluster, where the label is missing and the variable empty, do
  not all claim partition 0; a pod whose host name has no ordinal refuses to start rather
  than share one; elsewhere 0;
- under gunicorn, the master gives every worker the slot in 0 … workers - 1 that the
  fewest live workers hold, the lowest first (``pre_fork`` in ``api/gunicorn.conf.py``),
  and the worker records it here (``post_fork``). A restarted worker takes over the slot,
  and so the partition, of the worker it replaces. During a reload (SIGHUP) the new
  workers start while the old ones still run: each new one shares an old one's slot for
  that moment instead of taking a slot past the last, so N workers always use partitions
  base … base + N - 1 and the last pod never asks for a partition the topic lacks;
- a single process outside gunicorn (tests, ``flask run``) has slot 0.

Several hosts share one replies topic by giving each a different base, e.g. host number x
``QRSIGHT_API_WORKERS``; ``QRSIGHT_REPLIES_PARTITIONS`` must cover them all.
"""

from __future__ import annotations

import os
import re
import socket
from collections import Counter
from collections.abc import Iterable, Mapping

from core.runtime.errors import ConfigError
from core.runtime.settings import Settings, env_name

# Kubernetes sets this in every container (the API server's address for in-cluster clients).
KUBERNETES_ENV = "KUBERNETES_SERVICE_HOST"
ORDINAL_RE = re.compile(r"-(\d+)$")

# One value per process, set once after the fork (before the app is built).
_slot = {"value": 0}


def set_process_slot(slot: int) -> None:
    _slot["value"] = slot


def process_slot() -> int:
    return _slot["value"]


def least_held_slot(taken: Iterable[int], workers: int) -> int:
    """The slot in ``0 … workers - 1`` that the fewest live workers hold (the lowest of
    those): a free one when there is one, never one past the last."""
    held = Counter(slot for slot in taken if 0 <= slot < workers)
    return min(range(max(workers, 1)), key=lambda slot: (held[slot], slot))


def statefulset_ordinal(hostname: str) -> int | None:
    """The ordinal a StatefulSet puts at the end of its pods' names (``api-3`` → 3)."""
    found = ORDINAL_RE.search(hostname.split(".", maxsplit=1)[0])
    return int(found.group(1)) if found else None


def base_partition(
    settings: Settings, hostname: str | None = None, environ: Mapping[str, str] | None = None
) -> int:
    """The first reply partition of this host (see the module docstring)."""
    if settings.api_reply_partition is not None:
        return settings.api_reply_partition
    env = os.environ if environ is None else environ
    if not env.get(KUBERNETES_ENV):
        return 0
    host = socket.gethostname() if hostname is None else hostname
    ordinal = statefulset_ordinal(host)
    if ordinal is None:
        raise ConfigError(
            f"cannot tell this pod's reply partition: {env_name('api_reply_partition')} is "
            f"not set and the host name {host!r} ends in no StatefulSet ordinal; run the API "
            "as a StatefulSet (deploy/k8s/base/api.yaml) or set the variable per pod"
        )
    return ordinal * settings.api_workers


def reply_partition(settings: Settings) -> int:
    return base_partition(settings) + process_slot()
