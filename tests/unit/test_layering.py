"""Imports go one way (DESIGN.md "Layout"): adapters → core → schemas.

Parses every module with ``ast`` (nothing is imported), so a violation is reported
with its file and line even when the module would fail to import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
OURS = {"core", "schemas", "consumer", "api", "producer_tools", "training", "bench", "tests"}
# package → the packages of ours it may import (besides itself), from DESIGN.md.
MAY_IMPORT: dict[str, set[str]] = {
    "core": {"schemas"},
    "schemas": set(),
    "consumer": {"core", "schemas"},
    "api": {"core", "schemas"},
    "producer_tools": {"core", "schemas"},
    "training": {"core"},
}
# Single modules allowed across the line: `publish --wait` reuses the API's reply client.
ALLOWED_MODULES: dict[str, set[str]] = {"producer_tools": {"api.replies"}}
# core is the pure centre: no Kafka client, no web framework.
FORBIDDEN_THIRD_PARTY: dict[str, set[str]] = {
    "core": {"confluent_kafka", "flask", "gunicorn", "werkzeug"},
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every absolute import; ``from a import b`` gives ``a.b``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found


def violations(package: str) -> list[str]:
    allowed = MAY_IMPORT[package] | {package}
    modules = ALLOWED_MODULES.get(package, set())
    forbidden = FORBIDDEN_THIRD_PARTY.get(package, set())
    problems = []
    for path in sorted((REPO_ROOT / package).rglob("*.py")):
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            where = f"{path.relative_to(REPO_ROOT)}:{line} imports {module}"
            if top in OURS and top not in allowed and not _is_allowed(module, modules):
                problems.append(where)
            elif top in forbidden:
                problems.append(f"{where} (core stays free of {top})")
    return problems


def _is_allowed(module: str, modules: set[str]) -> bool:
    return any(module == m or module.startswith(m + ".") for m in modules)


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_imports_follow_the_layout(package: str) -> None:
    assert violations(package) == []


def test_runtime_never_imports_vision() -> None:
    """core.runtime is how a process runs; core.vision builds on it, never the reverse."""
    found = [
        f"{path.relative_to(REPO_ROOT)}:{line} imports {module}"
        for path in sorted((REPO_ROOT / "core" / "runtime").rglob("*.py"))
        for line, module in imported_modules(path)
        if module.startswith("core.vision")
    ]

    assert found == []


def test_the_checker_sees_the_code() -> None:
    core_imports = {m for p in (REPO_ROOT / "core").rglob("*.py") for _, m in imported_modules(p)}

    assert "core.runtime.errors.ConfigError" in core_imports


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import core.runtime.kafka", ["core.runtime.kafka"]),
        ("from api import replies", ["api.replies"]),
        ("from api.replies import ReplyClient", ["api.replies.ReplyClient"]),
        ("from . import sibling", []),
        ("import flask, numpy as np", ["flask", "numpy"]),
    ],
)
def test_import_parsing(tmp_path: Path, source: str, expected: list[str]) -> None:
    module = tmp_path / "m.py"
    module.write_text(source + "\n", encoding="utf-8")

    assert [m for _, m in imported_modules(module)] == expected


@pytest.mark.parametrize(
    ("module", "ok"),
    [("api.replies", True), ("api.replies.ReplyClient", True), ("api.app", False)],
)
def test_only_the_reply_client_crosses_from_producer_tools_to_api(module: str, ok: bool) -> None:
    assert _is_allowed(module, ALLOWED_MODULES["producer_tools"]) is ok
