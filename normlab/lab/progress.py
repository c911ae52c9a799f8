"""A dependency-free progress bar on stderr: redrawn in place on a terminal, a line every few seconds otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``75`` -> ``"1m15s"``; ``3700`` -> ``"1h01m"``."""
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class ProgressBar:
    """Steps done out of ``total`` with rate and ETA.

    Args:
        total: units of work (here: optimizer steps over all arms and seeds).
        initial: units already done (a resumed run).
        stream: where to draw (default ``sys.stderr``).
        enabled: draw at all (``False`` on DDP ranks other than 0, or with ``--no-progress``).
        min_interval: seconds between lines when ``stream`` is not a terminal.
    """

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        stream: TextIO | None = None,
        enabled: bool = True,
        min_interval: float = 10.0,
        width: int = 24,
    ) -> None:
        self.total = max(1, total)
        self.done = initial
        self._start_done = initial
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval = min_interval if not self.tty else 0.1
        self.width = width
        self._t0 = time.perf_counter()
        self._last = -float("inf")
        self.postfix = ""

    def update(self, n: int = 1, postfix: str | None = None, *, force: bool = False) -> None:
        self.done = min(self.total, self.done + n)
        if postfix is not None:
            self.postfix = postfix
        now = time.perf_counter()
        if self.enabled and (force or now - self._last >= self.min_interval):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = self.done / self.total
        filled = int(frac * self.width)
        elapsed = now - self._t0
        rate = (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0
        eta = format_seconds((self.total - self.done) / rate) if rate > 0 else "?"
        line = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {100 * frac:5.1f}% {self.done}/{self.total} "
            f"{format_seconds(elapsed)}<{eta} {self.postfix}"
        )
        if self.tty:
            self.stream.write("\r" + line[:200] + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()
