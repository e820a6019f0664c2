"""The engine's side of the write-ahead journal (`session.journal`): the
records of the tick being run, and what must wait until they are durable.

During a tick the engine records what each session consumed (a prefill
chunk, a decode row, a reseeded sampler) and defers what tells a client about
it (completing an append, whose callback sends `appended`; queueing a token
for its stream). `commit` at the end of the tick writes every record in one
group commit, then runs the deferred work: an acknowledgement or a token
never leaves before what it reports is durable. A failed commit is retried
with backoff (logged, counted in `stats.journal_failures`) and the tick's
outputs wait: nothing is acknowledged that is not stored, and nothing stored
is lost. Without a journal, deferred work runs at once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping

import anyio
import anyio.to_thread

from ..session.journal import Journal, JournalRecord, beyond, record_of
from ..session.session import Session
from .record import EngineStats, SessionRecord

log = logging.getLogger("streamgemma.engine")

RETRY_FIRST_S = 0.05
RETRY_MAX_S = 2.0
# Journaled tokens after which a live session is snapshotted in the background,
# so that recovery replays at most about this many (and journals stay short).
DEFAULT_SNAPSHOT_EVERY = 4096


class TickJournal:
    def __init__(self, journal: Journal | None, stats: EngineStats, snapshot_every: int = DEFAULT_SNAPSHOT_EVERY):
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1 token, got {snapshot_every!r}")
        self.journal = journal
        self.stats = stats
        self.snapshot_every = snapshot_every
        self._batch: dict[str, list[bytes]] = {}
        self._after: list[tuple[str, Callable[[], object]]] = []
        self.lost: set[str] = set()  # sessions whose records the store refused (another worker owns them)
        self._since_snapshot: dict[str, int] = {}  # tokens journaled per session since its last snapshot

    @property
    def enabled(self) -> bool:
        return self.journal is not None

    def record(self, session_id: str, session: Session, kind: str, ids=()) -> None:
        """`session` has just consumed `ids` (ints; see JournalRecord)."""
        if self.journal is None:
            return
        self._batch.setdefault(session_id, []).append(record_of(session, kind, ids))
        self._since_snapshot[session_id] = self._since_snapshot.get(session_id, 0) + len(ids)

    def then(self, session_id: str, fn: Callable, *args) -> None:
        """Call `fn(*args)` once this tick's records of `session_id` are
        durable (at once without a journal; never if the store refuses them)."""
        if self.journal is None:
            fn(*args)
        else:
            self._after.append((session_id, functools.partial(fn, *args)))

    async def commit(self) -> None:
        """Make the tick's records durable (retrying until they are), then run
        the deferred work."""
        batch, after = self._batch, self._after
        self._batch, self._after = {}, []
        delay, refused = RETRY_FIRST_S, set()
        while batch:
            try:
                refused = await anyio.to_thread.run_sync(self.journal.append, batch)
                self.stats.journal_commits += 1
                break
            except Exception as e:  # noqa: BLE001 - retried: the tick's outputs wait for it
                self.stats.journal_failures += 1
                log.error("the journal could not be written (%s: %s); retrying in %.2f s, the tick's "
                          "acknowledgements and tokens wait", type(e).__name__, e, delay)
                await anyio.sleep(delay)
                delay = min(2 * delay, RETRY_MAX_S)
        for session_id, fn in after:
            if session_id not in refused:
                fn()
        if refused:
            log.error("%d sessions are owned by another worker now: their last tick is dropped here",
                      len(refused))
            self.lost |= refused

    def due(self, sessions: Mapping[str, SessionRecord]) -> list[SessionRecord]:
        """Live sessions (of `sessions`) due a background snapshot (their count restarts)."""
        due = [sid for sid, n in self._since_snapshot.items() if n >= self.snapshot_every]
        for sid in due:
            del self._since_snapshot[sid]
        return [es for sid in due if (es := sessions.get(sid)) is not None and es.live is not None]

    async def read(self, session_id: str, position: int) -> list[JournalRecord]:
        """The journal of `session_id` if it continues a snapshot at `position`, else []."""
        if self.journal is None:
            return []
        records = await anyio.to_thread.run_sync(self.journal.read, session_id)
        return records if beyond(records, position) else []

    async def delete(self, session_id: str) -> None:
        self._since_snapshot.pop(session_id, None)
        if self.journal is not None:
            await anyio.to_thread.run_sync(self.journal.delete, session_id)
