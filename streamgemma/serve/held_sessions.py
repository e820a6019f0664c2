"""The prefix cache's fastest tier: the engine sessions of finished requests,
kept open instead of closed, found again by their token ids.

The next turn of a chat sends the whole conversation again; if a held
session consumed exactly a prefix of it, the request continues that session
as a live websocket session would: its state never leaves its slot, and
only the new tokens are prefilled. A session serves one request: taken, it
is no longer held (the conversation's copy in the `PrefixCache` tiers still
serves a second branch). Bounded by a count, least-recently-used out
(closed). The engine treats held sessions as any idle session: it may
suspend one to make room (it is restored when taken) or expire it (then it
is skipped, and gives up its place at the next `hold`).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from .engine import Engine
from .prefix_cache import prefix_digests
from .record import SessionRecord


class HeldSessions:
    """See the module docstring. `max_sessions` 0 holds none. Call from the
    engine's event loop."""

    def __init__(self, engine: Engine, max_sessions: int):
        if max_sessions < 0:
            raise ValueError(f"max_sessions must be >= 0, got {max_sessions!r}")
        self.engine = engine
        self.max_sessions = max_sessions
        self._fingerprint = engine.model.fingerprint.encode()
        self._held: collections.OrderedDict[tuple[int, str], SessionRecord] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    async def take(self, ids: Sequence[int]) -> tuple[int, SessionRecord] | None:
        """(tokens, session): the held session whose consumed tokens are the
        longest prefix of `ids` shorter than `ids`, no longer held; or None.
        A candidate no longer at its key's position is closed, not kept."""
        lengths = {n for n, _ in self._held if n < len(ids)}
        if not lengths:
            return None
        digests = prefix_digests(self._fingerprint, ids, lengths)
        for n in sorted(digests, reverse=True):
            es = self._held.pop((n, digests[n]), None)
            if es is None or es.closed:
                continue
            if es.position == n:
                return n, es
            await self.engine.close(es)
        return None

    async def hold(self, ids: Sequence[int], es: SessionRecord) -> None:
        """Keep `es`, which has consumed exactly `ids` and is idle, for a later
        request; closes it instead if nothing may be held, and closes the
        least recently held past the bound."""
        if self.max_sessions == 0 or not ids or es.closed or es.position != len(ids):
            await self.engine.close(es)
            return
        key = (len(ids), prefix_digests(self._fingerprint, ids, {len(ids)})[len(ids)])
        old = self._held.pop(key, None)
        self._held[key] = es
        if old is not None and old is not es:
            await self.engine.close(old)
        for gone in [k for k, held in self._held.items() if held.closed]:  # (expiry closed it meanwhile)
            del self._held[gone]
        while len(self._held) > self.max_sessions:
            _, gone = self._held.popitem(last=False)
            await self.engine.close(gone)

    async def close_all(self) -> None:
        while self._held:
            _, es = self._held.popitem(last=False)
            await self.engine.close(es)
