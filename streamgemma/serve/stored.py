"""`StoredSessions`: an engine's sessions as the store holds them. One
resume reads (and replays) an id at a time, the others wait and find its
record; an id being deleted is not read back; expiry and hand-overs leave
alone what is open or being resumed."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio

from ..session.journal import Journal
from .journaling import TickJournal
from .offload import Offloader
from .record import EngineError, SessionRecord


class StoredSessions:
    def __init__(self, sessions: dict[str, SessionRecord], offloader: Offloader, journal: TickJournal | Journal):
        self.sessions = sessions  # the engine's, by id
        self.offloader = offloader
        self.journal = journal
        self._resuming: dict[str, anyio.Event] = {}  # ids a resume reads from the store: set when it ends
        self._deleting: set[str] = set()  # ids being deleted from the store

    def in_use(self, session_id: str) -> bool:
        """Whether `session_id` is open here or being resumed."""
        return session_id in self.sessions or session_id in self._resuming

    async def resumed(self, session_id: str) -> SessionRecord | None:
        """The record of `session_id` once no resume of it is in progress; None if it is not open."""
        while (busy := self._resuming.get(session_id)) is not None:
            await busy.wait()
        return self.sessions.get(session_id)

    async def resume(self, session_id: str, read: Callable[[str], Awaitable[SessionRecord]]) -> SessionRecord:
        """The open record of `session_id`, else `read(session_id)`'s (it registers the record), one at a time."""
        es = await self.resumed(session_id)
        if es is not None and es.closed:  # (being closed: it was open here, and will be deleted)
            raise EngineError("unknown_session", "no such session (it is being closed)")
        if es is not None:
            return es
        if session_id in self._deleting:
            raise EngineError("unknown_session", "no such session")
        async with self.exclusive(session_id):  # (nothing awaited since `resumed`: it begins at once)
            return await read(session_id)

    @contextlib.asynccontextmanager
    async def exclusive(self, session_id: str) -> AsyncIterator[None]:
        """A block in which no resume of `session_id` runs: one in progress ends first, one asked for waits."""
        await self.resumed(session_id)
        done = self._resuming[session_id] = anyio.Event()  # (no await since the wait: nothing began meanwhile)
        try:
            yield
        finally:
            del self._resuming[session_id]
            done.set()

    async def delete(self, session_id: str, missing_ok: bool = True) -> None:
        """Delete the stored snapshot and journal of `session_id` (not open here)."""
        self._deleting.add(session_id)
        try:
            await self.offloader.delete(session_id, missing_ok=missing_ok)
            await self.journal.delete(session_id)
        finally:
            self._deleting.discard(session_id)
