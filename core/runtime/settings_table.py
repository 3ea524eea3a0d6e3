"""The README's settings table, generated from the settings fields (their defaults and
descriptions), so the table cannot drift from the code (a test compares them)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from core.runtime.settings_env import KAFKA_EXTRA_FIELD, KAFKA_PASSTHROUGH_PREFIX, env_name


def markdown_table(model: type[BaseModel], repo_root: Path) -> str:
    """One row per field; paths under ``repo_root`` are shown relative to it."""
    rows = ["| variable | default | what it sets |", "|---|---|---|"]
    for name, field in model.model_fields.items():
        if name == KAFKA_EXTRA_FIELD:
            rows.append(f"| `{KAFKA_PASSTHROUGH_PREFIX}<PROPERTY>` | — | {field.description} |")
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, Path) and default.is_relative_to(repo_root):
            default = default.relative_to(repo_root)
        shown = "—" if default is None else f"`{default}`"
        rows.append(f"| `{env_name(name)}` | {shown} | {field.description} |")
    return "\n".join(rows)
