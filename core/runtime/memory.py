"""The memory this process may use: the container's limit, read from the cgroup."""

from __future__ import annotations

from pathlib import Path

CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)
UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a number near 2**63


def container_memory_bytes(paths: tuple[Path, ...] = CGROUP_LIMITS) -> int | None:
    """The cgroup memory limit of this container, or None when there is none."""
    for path in paths:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < UNLIMITED:
            return int(text)
        return None
    return None
