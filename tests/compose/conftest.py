"""The compose stack end to end (``make compose-test``): collected only when this folder or
one of its files is named on the command line, because it builds and runs containers
(podman, via ``deploy/local/containers.sh``) rather than testing code in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path == HERE or HERE not in collection_path.parents:
        return None
    named = (Path(arg.split("::")[0]).resolve() for arg in config.args)
    wanted = any(path == HERE or HERE in path.parents for path in named)
    return None if wanted else True
