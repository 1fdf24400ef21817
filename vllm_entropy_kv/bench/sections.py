"""Markdown tables and the marked sections of docs/BENCHMARKS.md; stdlib only, so that the
planning bench runs where vLLM is not installed."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(path: Path, name: str, text: str) -> None:
    """Put `text` between the `<!-- name:begin/end -->` markers of `path` (appended the first
    time); the rest of the file stays as it is, so several commands can share one page."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{begin}\n{text}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + section + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(new)


def marked_sections(path: Path) -> str:
    """Every `<!-- name:begin -->` ... `<!-- name:end -->` block of `path`, in order (empty if
    none), for a writer that regenerates the rest of the page and must keep them."""
    if not path.exists():
        return ""
    blocks = re.finditer(r"<!-- (\S+):begin -->.*?<!-- \1:end -->", path.read_text(), re.S)
    return "\n\n".join(b.group(0) for b in blocks)
