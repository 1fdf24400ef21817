"""One progress line per step on stderr: a bar, elapsed time and an ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 20


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts steps of a task of known size and prints `[eval] task [###...] i/n ... ETA`
    lines."""

    def __init__(self, task: str, total: int, stream: TextIO | None = None) -> None:
        self.task = task
        self.total = max(1, total)
        self.done = 0
        self.start = time.monotonic()
        self.stream = stream or sys.stderr

    def step(self, message: str = "", count: int = 1) -> None:
        self.done += count
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        filled = BAR_WIDTH * min(self.done, self.total) // self.total
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        print(
            f"[eval] {self.task} [{bar}] {self.done}/{self.total} {message} "
            f"elapsed {_clock(elapsed)} ETA {_clock(eta)}",
            file=self.stream,
            flush=True,
        )

    def note(self, message: str) -> None:
        print(f"[eval] {self.task}: {message}", file=self.stream, flush=True)
