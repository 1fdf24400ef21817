"""Result rows (plain dicts, one per measurement) and their JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def save_rows(path: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def load_rows(path: Path) -> tuple[list[Row], dict[str, Any]]:
    data = json.loads(path.read_text())
    return data["rows"], data["meta"]


def select(rows: list[Row], task: str, **equal: Any) -> list[Row]:
    """The rows of one task whose fields equal the given values."""
    return [r for r in rows if r["task"] == task and all(r.get(k) == v for k, v in equal.items())]
