"""Stop strings over streamed text."""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    """Holds back streamed text that might be the start of a stop string.

    `push(text)` returns (text safe to emit, stopped). Once a stop string is
    complete, the text before it is returned with stopped=True and nothing
    from the stop string on is ever emitted.

    Each stop string has a Knuth-Morris-Pratt matcher: its state is the
    longest suffix of the text so far that is a prefix of the stop, so a
    push costs time in the length of the new text only, whatever the stops'
    lengths (a client's long stop strings cannot slow the engine's tick).
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.held = ""
        self.matched: str | None = None  # the stop string that ended the text, once one has
        self._fallback = [_failure(s) for s in self.stops]
        self._states = [0] * len(self.stops)  # per stop: how much of it the text ends with

    def push(self, text: str) -> tuple[str, bool]:
        buf = self.held + text
        first = None  # (start in buf, stop index) of the earliest complete stop
        for i, (stop, fallback) in enumerate(zip(self.stops, self._fallback)):
            k, n = self._states[i], len(stop)
            for j, c in enumerate(text):
                while k and stop[k] != c:
                    k = fallback[k - 1]
                if stop[k] == c:
                    k += 1
                if k == n:  # complete: ends at text[j]
                    end = len(self.held) + j + 1
                    if first is None or (end, end - n) < (first[2], first[0]):
                        first = (end - n, i, end)  # the first stop to complete (then the longest)
                    break
            self._states[i] = k
        if first is not None:
            at, i, _ = first
            self.matched = self.stops[i]
            self.held = ""
            return buf[:at], True
        keep = max(self._states, default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """Held-back text, released because the generation ended without a stop string."""
        text, self.held = self.held, ""
        self._states = [0] * len(self.stops)
        return text


def _failure(s: str) -> list[int]:
    """KMP's failure function: f[q] is the longest proper prefix of s[:q + 1] that is also its suffix."""
    f, k = [0] * len(s), 0
    for q in range(1, len(s)):
        while k and s[k] != s[q]:
            k = f[k - 1]
        if s[k] == s[q]:
            k += 1
        f[q] = k
    return f
