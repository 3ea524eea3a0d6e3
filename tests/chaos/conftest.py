"""Chaos scenarios on a real broker (tests/chaos): kills, churn, broker restarts.

The broker fixtures are the integration suite's (``QRSIGHT_KAFKA_BOOTSTRAP`` if set, else
one started here). ``CHAOS_IMAGES`` sizes every scenario (CI: 1000; ``make chaos``:
10000). The table of figures is printed at the end of the run, and written to
``CHAOS_REPORT`` when that names a file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chaos.harness import ROWS, table
from tests.integration.conftest import (  # noqa: F401  (fixtures)
    kafka_bootstrap,
    kafka_settings,
    kafka_settings_factory,
)

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not ROWS:
        return
    text = table(ROWS)
    terminalreporter.write_sep("=", "chaos figures")
    terminalreporter.write_line(text)
    report = os.environ.get("CHAOS_REPORT")
    if report:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(text + "\n", encoding="utf-8")
