"""Stop strings over streamed text."""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    """Holds back streamed text that might be the start of a stop string.

    `push(text)` returns (text safe to emit, stopped). Once a stop string is
    complete, the text before it is returned with stopped=True and nothing
    from the stop string on is ever emitted.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.held = ""
        self.matched: str | None = None  # the stop string that ended the text, once one has

    def push(self, text: str) -> tuple[str, bool]:
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            at = min(hits)
            self.matched = next(s for s in self.stops if buf.find(s) == at)
            self.held = ""
            return buf[:at], True
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(buf)), 0, -1)
                    if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """Held-back text, released because the generation ended without a stop string."""
        text, self.held = self.held, ""
        return text
