"""A console progress line: step, loss, images/s and ETA, for every long piece of work."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


_open_line: "Progress | None" = None  # the progress line a terminal shows unfinished, if any


def end_line() -> None:
    """Ends an unfinished progress line on the terminal, so the next print starts on its own line."""
    if _open_line is not None:
        _open_line.close()


class Progress:
    """Prints ``<what> <done>/<total> [values] <items/s> ETA`` lines.

    On a terminal the line is redrawn in place; otherwise (logs, CI) a new line is printed at
    most every ``min_interval`` seconds and at the end.

    Args:
      what: label at the start of the line, e.g. 'train' or 'eval'.
      total: number of units (steps, batches); None if unknown.
      unit: name of the unit.
      stream: where to print (stdout by default).
      min_interval: seconds between lines when not on a terminal.
    """

    def __init__(self, what: str, total: int | None, unit: str = "step", stream: TextIO | None = None,
                 min_interval: float = 10.0, start: int = 0):
        self.what, self.total, self.unit = what, total, unit
        self.stream = stream or sys.stdout
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.min_interval = min_interval
        self.start_done = start
        self.t0 = time.perf_counter()
        self._last_print = -float("inf")
        self._last_len = 0

    def update(self, done: int, items_per_s: float | None = None, force: bool = False, **values: float) -> str:
        """Reports ``done`` units finished; returns the line."""
        elapsed = time.perf_counter() - self.t0
        parts = [f"{self.what} {self.unit} {done}" + (f"/{self.total}" if self.total else "")]
        for key, value in values.items():
            parts.append(f"{key} {value:.4g}")
        if items_per_s is not None:
            parts.append(f"{items_per_s:.1f} img/s")
        rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
        if self.total and rate > 0 and done < self.total:
            parts.append(f"ETA {format_duration((self.total - done) / rate)}")
        elif self.total and done >= self.total:
            parts.append(f"done in {format_duration(elapsed)}")
        line = "  ".join(parts)
        now = time.perf_counter()
        finished = self.total is not None and done >= self.total
        if self.tty:
            global _open_line
            if _open_line is not None and _open_line is not self:
                _open_line.close()
            pad = " " * max(self._last_len - len(line), 0)
            end = "\n" if finished or force else ""
            self.stream.write("\r" + line + pad + end)
            self._last_len = 0 if end else len(line)
            _open_line = None if end else self
            self.stream.flush()
        elif force or finished or now - self._last_print >= self.min_interval:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_print = now
        return line

    def close(self) -> None:
        global _open_line
        if self.tty and self._last_len:
            self.stream.write("\n")
            self.stream.flush()
            self._last_len = 0
        if _open_line is self:
            _open_line = None
