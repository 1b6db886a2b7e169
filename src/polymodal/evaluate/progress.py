"""A progress display for evaluation, on stderr: a bar redrawn in place on a terminal (as tqdm draws one), plain
lines at every tenth of the work and at the end when stderr is a file or a pipe (a log stays readable)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 24  # characters of the bar


class Progress:
    def __init__(self, total: int, what: str, stream: TextIO | None = None):
        self.total, self.what, self.done = total, what, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.t0, self.shown = time.monotonic(), -1  # the tenth of the work last shown as a line

    def update(self, n: int) -> None:
        self.done = min(self.total, self.done + n)
        elapsed = time.monotonic() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = f"{(self.total - self.done) / rate:.0f}s" if rate else "?"
        figures = f"{self.done}/{self.total} [{elapsed:.0f}s<{left}, {rate:.1f}/s]"
        if self.tty:
            filled = WIDTH * self.done // max(1, self.total)
            bar = "#" * filled + " " * (WIDTH - filled)
            end = "\n" if self.done == self.total else ""
            self.stream.write(f"\r{self.what}: {100 * self.done // max(1, self.total):3d}%|{bar}| {figures}{end}")
        elif (tenth := 10 * self.done // max(1, self.total)) > self.shown:
            self.shown = tenth
            self.stream.write(f"{self.what}: {figures}\n")
        self.stream.flush()
