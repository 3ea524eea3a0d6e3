"""The repository speaks only of itself: no committed file names a directory of the
machine it was written or run on (results record paths relative to the repository)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# Home and work directories of a development machine; built from parts so that this file
# does not match itself.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:" + "|".join(["home", "work", "Users", "root"]) + r")/")


def tracked_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO_ROOT, check=True, capture_output=True
    ).stdout.decode()
    return [REPO_ROOT / name for name in listed.split("\0") if name]


def machine_paths(path: Path) -> list[str]:
    """``file:line: text`` for each line of a text file that names a machine directory."""
    if not path.is_file():  # deleted in the working tree, or a submodule
        return []
    data = path.read_bytes()
    if b"\0" in data[:8192]:  # binary (images, ONNX models)
        return []
    text = data.decode("utf-8", errors="replace")
    return [
        f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()[:120]}"
        for number, line in enumerate(text.splitlines(), 1)
        if MACHINE_PATH.search(line)
    ]


def test_no_tracked_file_names_a_machine_directory() -> None:
    found = [hit for path in tracked_files() for hit in machine_paths(path)]
    assert found == []


R = "/"  # the root, kept apart from the names so that this file does not match itself


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ('"dir": "' + R + 'work/shared/data/qr-real-dev"', True),
        ("model=" + R + "home/someone/qrsight/models/x.onnx", True),
        ("cd " + R + "Users/someone/src", True),
        ('"dir": "../shared/data/qr-real-dev"', False),
        ("QRSIGHT_STATE_DIR=" + R + "tmp/qrsight", False),
        ("https://example.com" + R + "home/page", False),
        ("models/qrsight-qr-v3.onnx", False),
    ],
)
def test_the_check_sees_a_machine_path(line: str, named: bool) -> None:
    assert bool(MACHINE_PATH.search(line)) is named
