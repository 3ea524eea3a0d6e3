"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def uid() -> str:
    """A short id unique to this test, for topic names, group ids and request ids."""
    return uuid.uuid4().hex[:12]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
