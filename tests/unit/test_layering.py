"""Imports go one way (DESIGN.md "Layout"): adapters → core → schemas.

Parses every module with ``ast`` (nothing is imported), so a violation is reported
with its file and line even when the module would fail to import.
"""

from __future__ import annotations

import ast
import re
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


def our_modules() -> dict[str, Path]:
    """Dotted name → file of every module of ours (a package is its ``__init__.py``)."""
    modules: dict[str, Path] = {}
    for package in sorted(OURS):
        for path in (REPO_ROOT / package).rglob("*.py"):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Which of our modules each one imports, at the top or inside a function alike
    (``from a.b import c`` is module ``a.b.c`` when there is one, else ``a.b``)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for _, module in imported_modules(path):
            target = module if module in modules else module.rpartition(".")[0]
            if target in modules and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle() -> None:
    """Two modules that import each other (even inside a function) cannot be read, moved
    or tested apart."""
    assert cycles(import_graph(our_modules())) == []


def test_the_circle_finder_finds_one() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_script_edits_sys_path() -> None:
    """Scripts run as modules (``python -m bench.suite``) from the repository root."""
    found = [
        f"{path.relative_to(REPO_ROOT)}:{number}"
        for path in our_modules().values()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\bsys\.path\.(insert|append)\(", line)
    ]
    assert found == []
