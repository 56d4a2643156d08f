"""Progress of a long preprocessing run: a bar redrawn in place on a terminal, plain lines in a log."""

from __future__ import annotations

import sys
import time


def _si(x: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(x) < 1000:
            return f"{x:.1f}{unit}" if unit else f"{x:.0f}"
        x /= 1000
    return f"{x:.1f}P"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """``update()`` with running totals; draws at most every ``interval`` seconds (0.5 s on a
    terminal, where the line is redrawn in place, else ``log_interval`` seconds per line)."""

    def __init__(self, total_bytes: int, stream=None, log_interval: float = 30.0, width: int = 24):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = 0.5 if self.tty else log_interval
        self.total, self.width = max(1, total_bytes), width
        self.start = self.last = time.perf_counter()
        self.drawn = False

    def line(self, docs: int, tokens: int, nbytes: int) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        frac = min(1.0, nbytes / self.total)
        eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
        bar = f"[{'#' * int(frac * self.width):<{self.width}}] " if self.tty else ""
        return (
            f"preprocess: {bar}{frac:6.1%} {_si(docs)} docs, {_si(tokens / elapsed)} tokens/s, "
            f"{nbytes / elapsed / 1e6:.1f} MB/s, ETA {_clock(eta) if eta == eta else '?'}"
        )

    def update(self, docs: int, tokens: int, nbytes: int, *, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        text = self.line(docs, tokens, nbytes)
        if self.tty:
            self.stream.write("\r" + text + "\033[K")
            self.drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
