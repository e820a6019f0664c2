"""The engine's side of the write-ahead journal (`session.journal`): the
records of the tick being run, and what must wait until they are durable.

During a tick the engine records what each session consumed (a prefill
chunk, a decode row, a reseeded sampler) and defers what tells a client about
it (completing an append, whose callback sends `appended`; queueing a token
or a generation's end for its stream). At the end of the tick `submit` hands
the tick's records and deferred work (a group) to the committer, and the
next tick runs while the group is written: the device never waits for the
store. Groups are written strictly in order, one at a time (one group commit
each), and a group's deferred work runs once its records are durable, so an
acknowledgement or a token never leaves before what it reports is stored,
and each session's outputs keep their order. At most `in_flight` groups wait
(`room`): beyond that the ticks wait for the store.

A failed commit is retried with backoff (logged, counted in
`stats.journal_failures`); its outputs and every later group's wait: nothing
is acknowledged that is not stored, and nothing stored is lost. A session
whose records the store refuses (another worker owns it: the fence) has its
deferred outputs dropped (inputs fail, a generation's end is still sent).
`drain` waits for every group submitted so far: whatever reports a
session's position to a client, hands it over, closes it or shuts down
drains first. Without a committer task (`run`; e.g. ticks driven by a test)
a group is written inside `submit`; without a journal, deferred work runs at
once.

A background snapshot may capture a state whose last records are still
being written. That is safe: a snapshot is a true state of the session,
with its recent ids (what `open` with `since` returns), so recovering from
it restores at least every acknowledged input and sent token; records it
covers are skipped by `replay` if they land after it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Mapping

import anyio
import anyio.to_thread

from ..session.journal import Journal, JournalRecord, beyond, encode_records
from ..session.session import Session
from .record import ActiveGeneration, Done, EngineError, EngineStats, PendingInput, SessionRecord

log = logging.getLogger("streamgemma.engine")

RETRY_FIRST_S = 0.05
RETRY_MAX_S = 2.0
SHUTDOWN_RETRY_S = 10.0  # at shutdown, how long a journal that cannot be written is retried
# Journaled tokens after which a live session is snapshotted in the background,
# so that recovery replays at most about this many (and journals stay short).
DEFAULT_SNAPSHOT_EVERY = 4096
# Ticks' groups submitted and not yet durable before a tick waits: one being
# written and one ready keeps the device busy while a commit takes up to a tick.
DEFAULT_COMMITS_IN_FLIGHT = 2

# (session id, work, work instead if the store refused its records); id None: work of
# several sessions, called with the set of refused ids.
Deferred = tuple["str | None", Callable[..., object], "Callable[[], object] | None"]


class Group:
    """One tick's records and the work deferred until they are durable."""

    __slots__ = ("batch", "after", "refused", "done")

    def __init__(self, batch: dict[str, list[tuple]], after: list[Deferred]):
        self.batch = batch
        self.after = after
        self.refused: set[str] | None = None  # set once written (in the committing thread)
        self.done = anyio.Event()  # its deferred work has run


class TickJournal:
    def __init__(self, journal: Journal | None, stats: EngineStats, snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
                 in_flight: int = DEFAULT_COMMITS_IN_FLIGHT, delivered: Callable[[], object] = lambda: None):
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1 token, got {snapshot_every!r}")
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1 group, got {in_flight!r}")
        self.journal = journal
        self.stats = stats
        self.snapshot_every = snapshot_every
        self.in_flight = in_flight
        self.delivered = delivered  # called after a group's deferred work (tokens went to streams)
        self._batch: dict[str, list[tuple]] = {}  # per session: encode_records' tuples
        self._after: list[Deferred] = []
        self._queue: collections.deque[Group] = collections.deque()  # submitted, oldest first
        self._writing = anyio.Lock()  # one group written at a time, the oldest
        self._submitted = anyio.Event()
        self._progress = anyio.Event()  # set (and replaced) when a group is done or the committer stops
        self._running = False
        self.lost: set[str] = set()  # sessions whose records the store refused (another worker owns them)
        # Per refused session, where its first refused record began: what its clients were last told of.
        self.refused_at: dict[str, int] = {}
        self._since_snapshot: dict[str, int] = {}  # tokens journaled per session since its last snapshot
        self.ephemeral: set[str] = set()  # sessions not journaled (Engine.open(durable=False))
        self.shutdown_retry_s = SHUTDOWN_RETRY_S  # at shutdown, the longest a commit is retried
        self._give_up_at: float | None = None  # set by `shut_down`

    @property
    def enabled(self) -> bool:
        return self.journal is not None

    @property
    def pending(self) -> int:
        """Groups submitted and not yet durable."""
        return len(self._queue)

    def record(self, session_id: str, session: Session, kind: str, ids=()) -> None:
        """`session` has just consumed `ids` (ints; see JournalRecord)."""
        if self.journal is None or session_id in self.ephemeral:
            return
        # Encoded in the committer's thread (`_append`): the tick only notes the fields.
        state = session.state
        self._batch.setdefault(session_id, []).append(
            (session.position - len(ids), kind, ids, state.rng.to_bytes(), state.stopped))
        self._since_snapshot[session_id] = self._since_snapshot.get(session_id, 0) + len(ids)

    def then(self, session_id: str, fn: Callable, *args, refused: Callable[[], object] | None = None) -> None:
        """Call `fn(*args)` once this tick's records (and all before them) are
        durable; at once without a journal. If the store refuses the records
        of `session_id`, `refused()` is called instead (if given)."""
        if self.journal is None:
            fn(*args)
        else:
            self._after.append((session_id, functools.partial(fn, *args), refused))

    def tokens(self, batch: list[tuple[SessionRecord, ActiveGeneration]], tokens: list) -> None:
        """A decode step's rows: each session's sampled token is recorded, and
        queued to its stream once durable (if nobody reads it any more, the
        generation is marked cancelled: the next tick ends it). One loop and
        one deferred item for the whole batch: this runs on the tick's path."""
        if self.journal is None:
            for (_, active), token in zip(batch, tokens):
                self._put(active, token)
            return
        records, since = self._batch, self._since_snapshot
        for (es, _), token in zip(batch, tokens):
            sid, session = es.id, es.live
            if sid in self.ephemeral:
                continue
            state = session.state
            record = (session.position - 1, "step", (token.id,), state.rng.to_bytes(), state.stopped)
            if (kept := records.get(sid)) is None:
                records[sid] = [record]
            else:
                kept.append(record)
            since[sid] = since.get(sid, 0) + 1
        self._after.append((None, functools.partial(self._put_rows, batch, tokens), None))

    def _put_rows(self, batch: list[tuple[SessionRecord, ActiveGeneration]], tokens: list,
                  refused: set[str]) -> None:
        for (es, active), token in zip(batch, tokens):
            if es.id not in refused:
                self._put(active, token)

    def end(self, session_id: str, active: ActiveGeneration, done: Done, now: bool = False) -> None:
        """End the stream of `active` with `done` after its tokens (now: at
        once, e.g. after `drain`); also if the store refused them."""
        end = functools.partial(self._end_told, session_id, active, done)
        if now or self.journal is None:
            end()
        else:
            self._after.append((session_id, end, end))

    def consumed(self, session_id: str, finished: list[PendingInput]) -> None:
        """Complete appends (`InputQueues.consumed`) once durable; if refused, they fail."""
        if finished:
            self.then(session_id, complete, finished, refused=functools.partial(complete, finished, refused=True))

    def _put(self, active: ActiveGeneration, token) -> None:
        if not active.ended.is_set() and not active.put(token, self.stats):
            active.cancelled = True

    def _end_told(self, session_id: str, active: ActiveGeneration, done: Done) -> None:
        """`_end`; if the store refused records of the session (in this group or an earlier one: looked
        up now), at the last position its client was told of (the refused ticks' tokens were never sent)."""
        if (at := self.refused_at.get(session_id)) is not None:
            done = dataclasses.replace(done, position=at)
        self._end(active, done)

    def _end(self, active: ActiveGeneration, done: Done) -> None:
        active.queue.put(done)
        active.ended.set()
        self.delivered()

    async def submit(self) -> None:
        """End of a tick: queue its group for the committer (written here, with
        retries for at most `shutdown_retry_s`, when no committer runs: e.g. a
        tick cancelled at shutdown, whose submit is shielded). Call `room`
        outside the model lock."""
        if not (self._batch or self._after):
            return
        self._queue.append(Group(self._batch, self._after))
        self._batch, self._after = {}, []
        if self._running:
            self._submitted.set()
        else:
            await self.drain(self.shutdown_retry_s)

    async def room(self) -> None:
        """Wait until at most `in_flight` groups are pending (back-pressure)."""
        while len(self._queue) > self.in_flight and self._running:
            await self._progress.wait()

    async def drain(self, within: float | None = None) -> None:
        """Wait until every group submitted so far is durable and its deferred
        work has run (writing them here if no committer runs). within: with no
        committer (shutdown), stop retrying after about that many seconds and
        drop what is not durable (logged): the store may be gone for good, and
        a shutdown that never ends saves nothing."""
        if not self._queue:
            return
        last = self._queue[-1]
        deadline = None if within is None else time.monotonic() + within
        while not last.done.is_set():
            if self._running:
                await self._progress.wait()
            elif not await self._write_oldest(deadline):
                self._abandon()
                return

    def shut_down(self) -> None:
        """The server is stopping: commits that still fail `shutdown_retry_s` from now are given up
        (their outputs dropped), so that whatever drains the journal on the way out returns."""
        self._give_up_at = time.monotonic() + self.shutdown_retry_s

    def _abandon(self) -> None:
        """Drop every queued group: its records were never written, its outputs are never sent."""
        log.error("the journal could not be written: %d ticks' records are dropped, and what they would "
                  "have acknowledged is not (the sessions' snapshots hold their state)", len(self._queue))
        while self._queue:
            self._queue.popleft().done.set()
        self._notify()

    async def run(self) -> None:
        """The committer: writes submitted groups in order until cancelled
        (a group it could not finish stays queued for `drain`)."""
        self._running = True
        try:
            while True:
                if not self._queue:
                    self._submitted = anyio.Event()
                    await self._submitted.wait()
                    continue
                if not await self._write_oldest():  # (only after `shut_down`)
                    self._abandon()
        finally:
            self._running = False
            self._notify()

    async def _write_oldest(self, deadline: float | None = None) -> bool:
        """Write the oldest group, retrying; False if it is still not written at `deadline`."""
        async with self._writing:
            if not self._queue:
                return True
            group = self._queue[0]
            delay = RETRY_FIRST_S
            while group.batch and group.refused is None:
                try:
                    await anyio.to_thread.run_sync(self._append, group)
                    self.stats.journal_commits += 1
                except Exception as e:  # noqa: BLE001 - retried: the group's outputs wait for it
                    self.stats.journal_failures += 1
                    limit = deadline if deadline is not None else self._give_up_at
                    if limit is not None and time.monotonic() + delay > limit:
                        return False
                    log.error("the journal could not be written (%s: %s); retrying in %.2f s, the tick's "
                              "acknowledgements and tokens wait", type(e).__name__, e, delay)
                    await anyio.sleep(delay)
                    delay = min(2 * delay, RETRY_MAX_S)
            self._queue.popleft()
            self._complete(group, group.refused or set())
            return True

    def _append(self, group: Group) -> None:
        """In a worker thread: the result is kept on the group, so a commit
        that finished while its task was cancelled is not written twice."""
        batch = {sid: encode_records(records) for sid, records in group.batch.items()}
        group.refused = self.journal.append(batch)

    def _complete(self, group: Group, refused: set[str]) -> None:
        for session_id in refused:
            if session_id not in self.refused_at and (records := group.batch.get(session_id)):
                self.refused_at[session_id] = records[0][0]
        for session_id, fn, on_refused in group.after:
            try:
                if session_id is None:  # (work of many sessions, which filters the refused ones)
                    fn(refused)
                elif (call := on_refused if session_id in refused else fn) is not None:
                    call()
            except Exception:  # noqa: BLE001 - one failing delivery must not stop the others
                log.exception("delivering the outputs of session %s failed", (session_id or "(several)")[:8])
        if refused:
            log.error("%d sessions are owned by another worker now: their outputs of a tick are dropped here",
                      len(refused))
            self.lost |= refused
        group.done.set()
        self._notify()
        self.delivered()

    def _notify(self) -> None:
        progress, self._progress = self._progress, anyio.Event()
        progress.set()

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

    def claimed(self, session_id: str) -> None:
        """This worker holds `session_id` again: a refusal before is history."""
        self.lost.discard(session_id)
        self.refused_at.pop(session_id, None)

    def forget(self, session_id: str) -> None:
        """`session_id` left this engine with its journal kept (handed over, dropped)."""
        self._since_snapshot.pop(session_id, None)
        self.ephemeral.discard(session_id)
        self.refused_at.pop(session_id, None)

    async def delete(self, session_id: str) -> None:
        self.forget(session_id)
        if self.journal is not None:
            await anyio.to_thread.run_sync(self.journal.delete, session_id)


def complete(finished: list[PendingInput], refused: bool = False) -> None:
    for pending in finished:
        if refused:
            pending.error = EngineError("closed", "another worker owns this session now: reopen it")
        pending.complete()
