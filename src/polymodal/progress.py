"""Progress of long work with no steps of its own in the training log (answers being scored, the VQ stage):
a bar redrawn in place on a terminal (as tqdm draws one), a plain line at every tenth of the work when the
stream is a file or a pipe, so that a log read later holds no carriage returns."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 24  # characters of the bar


class Progress:
    """`update(n, note)` after each n units of work; `close()` ends a terminal's line if the work stopped short."""

    def __init__(self, total: int, what: str, stream: TextIO | None = None):
        self.total, self.what, self.done = total, what, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.t0, self.shown, self.ended = time.monotonic(), 0, False  # shown: tenths of the work printed as lines

    def update(self, n: int = 1, note: str = "") -> None:
        self.done = min(self.total, self.done + n)
        whole = max(1, self.total)
        elapsed = time.monotonic() - self.t0
        left = f"{elapsed / self.done * (self.total - self.done):.0f}s" if self.done else "?"
        figures = f"{self.done}/{self.total} | {note + ' | ' if note else ''}{elapsed:.0f}s | eta {left}"
        if self.tty:
            filled = WIDTH * self.done // whole
            self.stream.write(f"\r{self.what} {100 * self.done // whole:3d}%|{'#' * filled}{' ' * (WIDTH - filled)}| "
                              f"{figures}")
            if self.done == self.total:
                self.close()
        elif (tenth := 10 * self.done // whole) > self.shown:
            self.shown = tenth
            self.stream.write(f"{self.what} {figures}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and not self.ended:
            self.stream.write("\n")
            self.stream.flush()
        self.ended = True
