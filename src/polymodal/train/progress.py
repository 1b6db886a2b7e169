"""Progress of a long stage with no steps of its own in the training log (the VQ tokenizer's fitting):
a tqdm-style bar redrawn in place on a terminal, plain lines (every tenth of the way) in a log file or pipe,
so that a log read later holds no carriage returns."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30  # characters of the bar


class Progress:
    """`update(done, note)` after each unit of work; `close()` ends the bar's line."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None):
        self.label, self.total, self.stream = label, total, stream or sys.stdout
        self.tty = self.stream.isatty()
        self.t0, self.shown = time.time(), 0  # tenths of the way already printed as lines

    def update(self, done: int, note: str = "") -> None:
        elapsed = time.time() - self.t0
        eta = elapsed / done * (self.total - done) if done else 0.0
        text = f"{self.label} {done}/{self.total} | {note + ' | ' if note else ''}{elapsed:.0f}s | eta {eta:.0f}s"
        if self.tty:
            filled = WIDTH * done // self.total
            self.stream.write(f"\r{self.label} |{'#' * filled}{'.' * (WIDTH - filled)}| {text[len(self.label) + 1:]}")
            self.stream.flush()
        elif 10 * done // self.total > self.shown:
            self.shown = 10 * done // self.total
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
