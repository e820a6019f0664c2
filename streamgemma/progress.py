"""A dependency-free progress line on stderr for work that takes more than a moment."""

from __future__ import annotations

import sys
import time


class Progress:
    """Shows `label: 42% (1.2/2.9 GB)` on stderr, redrawn at most 10 times a second.

    enabled: True always shows, False never, None shows when stderr is a
    terminal and the work has run longer than `delay` seconds.
    """

    def __init__(self, label: str, total: int, unit: str = "B", enabled: bool | None = None,
                 delay: float = 0.5, stream=None):
        self.label, self.total, self.unit = label, max(total, 1), unit
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
            self._start_after = time.monotonic() + delay
        else:
            self._start_after = time.monotonic()
        self.enabled = enabled
        self.done = 0
        self._last_draw = 0.0
        self._drawn = False

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now >= self._start_after and (now - self._last_draw > 0.1 or self.done >= self.total):
            self._draw()
            self._last_draw = now

    def _fmt(self, n: float) -> str:
        if self.unit != "B":
            return f"{n:,.0f}"
        for scale, suffix in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if self.total >= scale:
                return f"{n / scale:.2f} {suffix}"
        return f"{n:.0f} B"

    def _draw(self) -> None:
        pct = 100.0 * self.done / self.total
        self.stream.write(f"\r{self.label}: {pct:3.0f}% ({self._fmt(self.done)}/{self._fmt(self.total)})")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
