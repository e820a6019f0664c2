"""Suspension: moving sessions between pool slots and the store.

A suspended session's state is copied to host memory (`Session.capture`,
about a millisecond) and its slot freed at once; encoding and `store.put`
happen in one writer thread (write-behind; one thread, so writes of one
session land in order). Until its write has succeeded the host copy is kept,
and a session resumed meanwhile is restored from it; a failed write is
logged and the copy kept (retried when the writer must make room, and by
`snapshot` and `flush`), so no session is lost while the process lives. At
most `max_unwritten` copies wait; beyond that a suspension waits for the
writer, and is refused (EngineError "capacity") once all of them have failed
twice. The journal's background snapshots are bounded too: one a session
waits for the writer (a newer one replaces it), `max_unwritten` in all
(`background`)."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable

import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import zstandard

from ..errors import SessionHeld, SnapshotNotFound, StoreError
from ..session import snapshot as snapshot_format
from ..session.journal import Journal
from ..session.model import Model
from ..session.session import Session
from ..session.store import SnapshotStore, validate_session_id
from .record import EngineError, EngineStats

log = logging.getLogger("streamgemma.engine")

# Suspensions skip entropy coding: resumes decompress faster, files are a little
# larger (bench/NOTES.md). Any level makes a valid snapshot.
SUSPEND_COMPRESSION_LEVEL = -1
DEFAULT_MAX_UNWRITTEN = 32  # host copies waiting for the writer: bounds host memory
PRELOADED = 8  # sessions read by `read` and kept for the restore that follows
# A claim of a session another worker holds polls (first wait, doubling up to the
# second): a hand-over takes tens of milliseconds, polling must not add as much.
CLAIM_POLL_S = 0.002
CLAIM_POLL_MAX_S = 0.01


class MemoryStore(SnapshotStore):
    """Snapshots in a dict: the store of an engine given none. Sessions
    survive suspension, not the process (`durable` is False)."""

    durable = False

    def __init__(self):
        self._blobs: dict[str, bytes] = {}
        self._written: dict[str, float] = {}  # time.monotonic() of each put

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._blobs)} sessions)"

    def describe(self) -> str:
        return "memory"

    def put(self, session_id: str, blob: bytes) -> None:
        self._blobs[validate_session_id(session_id)] = bytes(blob)
        self._written[session_id] = time.monotonic()

    def get(self, session_id: str) -> bytes:
        try:
            return self._blobs[validate_session_id(session_id)]
        except KeyError:
            raise SnapshotNotFound(f"no snapshot for session {session_id}") from None

    def delete(self, session_id: str) -> None:
        if self._blobs.pop(validate_session_id(session_id), None) is None:
            raise SnapshotNotFound(f"no snapshot for session {session_id}")
        self._written.pop(session_id, None)

    def list(self) -> list[str]:
        return sorted(self._blobs)

    def older_than(self, seconds: float) -> list[str]:
        cutoff = time.monotonic() - seconds
        return sorted(sid for sid, t in self._written.items() if t < cutoff)


class Write:
    """A snapshot on its way to the store: the captured state, kept until
    `future` (encode + store.put in the writer thread) has succeeded."""

    def __init__(self, contents: snapshot_format.SnapshotContents, future: concurrent.futures.Future):
        self.contents: snapshot_format.SnapshotContents | None = contents
        self.future = future
        future.add_done_callback(self._done)

    def _done(self, future: concurrent.futures.Future) -> None:  # in the writer thread
        if future.exception() is None:
            self.contents = None

    @property
    def written(self) -> bool:
        return self.future.done() and self.future.exception() is None

    @property
    def failed(self) -> bool:
        return self.future.done() and self.future.exception() is not None


class Offloader:
    """Suspends sessions of `model` to `store` and restores them.
    `superseded(id)` tells whether a failed write no longer matters (the
    session is live again, or gone). Async methods run in the engine's event loop;
    the caller holds the engine's model lock where the docstring says so."""

    def __init__(self, model: Model, store: SnapshotStore, stats: EngineStats, superseded: Callable[[str], bool],
                 max_unwritten: int = DEFAULT_MAX_UNWRITTEN, compression_level: int = SUSPEND_COMPRESSION_LEVEL,
                 journal: Journal | None = None):
        if max_unwritten < 1:
            raise ValueError(f"max_unwritten must be >= 1, got {max_unwritten!r}")
        if isinstance(compression_level, bool) or not isinstance(compression_level, int) \
                or compression_level > zstandard.MAX_COMPRESSION_LEVEL:
            raise ValueError(f"compression_level must be an int <= {zstandard.MAX_COMPRESSION_LEVEL} "
                             f"(zstd; negative: faster), got {compression_level!r}")
        self.model = model
        self.store = store
        self.stats = stats
        self.max_unwritten = max_unwritten
        self.compression_level = compression_level
        self.journal = journal  # compacted once a snapshot covering its records is stored
        self._superseded = superseded
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streamgemma-writer")
        self._unwritten: dict[str, Write] = {}
        # Each session's `background` state whose write has not started, in a one-item box the queued write
        # takes it from (a newer state replaces it there), and their lock (the writer takes it too).
        self._latest: dict[str, list[snapshot_format.SnapshotContents]] = {}
        self._latest_lock = threading.Lock()
        self._preloaded: collections.OrderedDict[str, snapshot_format.SnapshotContents] = collections.OrderedDict()

    @property
    def unwritten(self) -> int:
        """Suspended sessions' snapshots in host memory, not (yet) in the store."""
        return sum(1 for w in self._unwritten.values() if not w.written)

    def failed(self) -> list[str]:
        """Ids whose latest write failed (their state is only in memory)."""
        return [sid for sid, w in self._unwritten.items() if w.failed]

    def pending(self, session_id: str) -> bool:
        return session_id in self._unwritten

    async def claim(self, session_id: str) -> None:
        """Own `session_id` in the store (see `SnapshotStore.claim`), waiting
        for a holder to hand it over in the event loop, not in a worker
        thread (a hundred waiting opens must not take the threads the ticks need)."""
        store, asked = self.store, None
        deadline, poll = time.monotonic() + store.claim_wait, CLAIM_POLL_S
        released = [anyio.Event()]  # set when the holder releases it: no wait for the next poll
        token = anyio.lowlevel.current_token()
        stop = store.on_release(session_id, lambda: anyio.from_thread.run_sync(released[0].set, token=token))
        try:
            while (holder := await anyio.to_thread.run_sync(store.try_claim, session_id, asked)) is not None:
                asked = holder
                if time.monotonic() >= deadline:
                    raise SessionHeld(f"session {session_id[:8]}... is held by worker {holder}, which did not hand "
                                      f"it over within {store.claim_wait:g} s")
                with anyio.move_on_after(poll):  # (polling still finds a lease that expired: a dead holder)
                    await released[0].wait()
                released[0] = anyio.Event()
                poll = min(2 * poll, CLAIM_POLL_MAX_S)
        finally:
            stop()

    async def store_new(self, session_id: str, live: Session, model_lock) -> None:
        """Store `live` (a new session, claimed) under `session_id`, waiting
        until it is stored; on failure it is released and `live` closed."""
        future = None
        try:
            async with model_lock:
                future = await self.snapshot(session_id, live)
            await anyio.to_thread.run_sync(future.result)
        except BaseException:
            live.close()
            if future is not None:  # its write is queued, or landed: delete it after, in order
                self._writer.submit(self._delete_quietly, session_id)
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):  # (a store down: its lease expires)
                await anyio.to_thread.run_sync(self.store.release, session_id)
            raise

    def _delete_quietly(self, session_id: str) -> None:
        with contextlib.suppress(Exception):
            self.store.delete(session_id)

    def forget(self, session_id: str) -> None:
        """Drop what is held of `session_id` (it is not ours any more)."""
        self._unwritten.pop(session_id, None)
        self._drop_background(session_id)
        self._preloaded.pop(session_id, None)

    async def read(self, session_id: str) -> snapshot_format.SnapshotContents:
        """Claim `session_id`, then read and validate its stored snapshot.
        Raises what the store or the decoder raised (the caller `release`s it then)."""
        validate_session_id(session_id)
        await self.claim(session_id)
        blob = await anyio.to_thread.run_sync(self.store.get, session_id)
        return await anyio.to_thread.run_sync(self._decode, blob)

    async def release(self, session_id: str) -> None:
        """Stop owning `session_id` in the store (not open here); a store that
        is down lets the lease expire instead. Runs even in a cancelled scope."""
        with anyio.CancelScope(shield=True), contextlib.suppress(StoreError):
            await anyio.to_thread.run_sync(self.store.release, session_id)

    def keep(self, session_id: str, contents: snapshot_format.SnapshotContents) -> None:
        """Keep what `read` returned for the restore that usually follows (a few at most)."""
        self._preloaded[session_id] = contents
        while len(self._preloaded) > PRELOADED:
            self._preloaded.popitem(last=False)

    async def restore(self, session_id: str) -> Session:
        """A live session from the newest state of `session_id`: its pending or
        failed write, what `keep` holds, else the store (caller holds the
        model lock)."""
        write = self._unwritten.get(session_id)
        contents = write.contents if write is not None else self._preloaded.pop(session_id, None)
        if contents is None:  # (also when its write has just succeeded)
            blob = await anyio.to_thread.run_sync(self.store.get, session_id)
            contents = await anyio.to_thread.run_sync(self._decode, blob)
        live = await anyio.to_thread.run_sync(self.model.restore, contents)
        self._preloaded.pop(session_id, None)
        self.stats.resumptions += 1
        return live

    async def suspend(self, session_id: str, live: Session) -> None:
        """Copy `live` to host memory, close it (freeing its slot) and queue
        the write (caller holds the model lock)."""
        await self._make_writer_room()
        contents = await anyio.to_thread.run_sync(live.capture)
        live.close()
        self._drop_background(session_id)
        self._start_write(session_id, contents)
        self.stats.suspensions += 1

    async def snapshot(self, session_id: str, live: Session | None) -> concurrent.futures.Future | None:
        """Queue a write of the state of `session_id` (of `live`, or its pending
        or failed suspension) and return its future (caller holds the model
        lock; await the future outside it). None if the store is up to date."""
        self._drop_background(session_id)
        if live is not None:
            contents = await anyio.to_thread.run_sync(live.capture)
            future = self._writer.submit(self._write, session_id, contents)
            future.add_done_callback(self._count_failure)  # the caller hears of it, and logs it
            return future
        write = self._unwritten.get(session_id)
        if write is None:
            return None
        return (self._start_write(session_id, write.contents) if write.failed else write).future

    async def background(self, session_id: str, live: Session) -> None:
        """A snapshot of `live` that bounds its journal's replay. A store slower
        than they come must not pile captured states up in memory: one a session
        waits for the writer (a newer one replaces it, and is what gets written),
        and while `max_unwritten` sessions' wait, others are skipped (the journal
        holds what they would have stored)."""
        if session_id not in self._latest and len(self._latest) >= self.max_unwritten:
            return
        contents = await anyio.to_thread.run_sync(live.capture)
        with self._latest_lock:
            box = self._latest.get(session_id)
            if box is not None:  # its write has not started: it takes this state
                box[0] = contents
                return
            box = self._latest[session_id] = [contents]
        self._writer.submit(self._write_latest, session_id, box).add_done_callback(self._count_failure)

    def _drop_background(self, session_id: str) -> None:
        """A write queued after a background one supersedes it: the background
        one must not store a newer state ahead of it (writes land in order)."""
        with self._latest_lock:
            self._latest.pop(session_id, None)

    def _write_latest(self, session_id: str, box: list) -> None:
        """In the writer thread: the newest background state of `session_id`,
        unless a later write superseded it (its box is no longer listed)."""
        with self._latest_lock:
            if self._latest.get(session_id) is not box:
                return
            del self._latest[session_id]
        self._write(session_id, box[0])

    async def delete(self, session_id: str, missing_ok: bool = True) -> None:
        """Forget `session_id` and delete its snapshot, after any write of it
        still queued. SnapshotNotFound if there is none, unless missing_ok."""
        had_write = self._unwritten.pop(session_id, None) is not None
        self._drop_background(session_id)
        self._preloaded.pop(session_id, None)
        try:
            await anyio.to_thread.run_sync(self._writer.submit(self.store.delete, session_id).result)
        except SnapshotNotFound:
            if not (missing_ok or had_write):
                raise

    async def flush(self) -> list[str]:
        """Retry failed writes once and wait for every write; the ids that
        could not be stored."""
        self._forget_written()  # first: a failed copy of a session live again is stale, not to be retried
        self._retry_failed()
        await anyio.to_thread.run_sync(concurrent.futures.wait, [w.future for w in self._unwritten.values()])
        failed = self.failed()
        self._forget_written()
        await anyio.to_thread.run_sync(self.store.release_all, failed)  # other workers may take them now
        return failed

    def _start_write(self, session_id: str, contents: snapshot_format.SnapshotContents) -> Write:
        """Queue the write; it replaces any earlier one of the same id."""
        future = self._writer.submit(self._write, session_id, contents)
        future.add_done_callback(functools.partial(self._log_failure, session_id))
        write = self._unwritten[session_id] = Write(contents, future)
        return write

    def _count_failure(self, future: concurrent.futures.Future) -> None:
        if future.exception() is not None:
            self.stats.write_failures += 1

    def _log_failure(self, session_id: str, future: concurrent.futures.Future) -> None:
        self._count_failure(future)
        error = future.exception()
        if error is not None:
            # One line per failure (a full disk fails every write); the traceback for debugging.
            log.error("could not write session %s to %s: %s: %s; its state stays in memory (the write is "
                      "retried later)", session_id, self.store.describe(), type(error).__name__, error)
            log.debug("the failed write of session %s", session_id, exc_info=error)

    def _retry_failed(self) -> None:
        for sid, write in list(self._unwritten.items()):
            if write.failed:
                self._start_write(sid, write.contents)

    def _write(self, session_id: str, contents: snapshot_format.SnapshotContents) -> None:
        """In the writer thread: encode and store."""
        self.store.put(session_id, snapshot_format.encode_contents(contents, self.compression_level))
        if self.journal is not None:
            try:
                self.journal.compact(session_id, contents.position)
            except Exception as e:  # noqa: BLE001 - the write stands: a replay skips the records it covers
                log.warning("session %s: its journal could not be compacted after a snapshot (%s: %s); it keeps "
                            "the records the snapshot covers until the next one", session_id[:8], type(e).__name__, e)

    def _decode(self, blob: bytes) -> snapshot_format.SnapshotContents:
        return snapshot_format.decode(blob, self.model.config, self.model.fingerprint)

    async def _make_writer_room(self) -> None:
        """Wait until fewer than max_unwritten copies are held. If all those
        held have failed, retry them once; if they fail again, refuse: the
        store is broken, and suspending more would pile up state in memory."""
        retried = False
        while True:
            self._forget_written()
            if len(self._unwritten) < self.max_unwritten:
                return
            oldest = next((w.future for w in self._unwritten.values() if not w.future.done()), None)
            if oldest is not None:
                await anyio.to_thread.run_sync(concurrent.futures.wait, [oldest])
            elif not retried:
                self._retry_failed()
                retried = True
            else:
                raise EngineError("capacity", f"{len(self._unwritten)} suspended sessions could not be written "
                                              f"to the store {self.store!r} (see the server log); retry later")

    def _forget_written(self) -> None:
        """Drop copies that are stored, and failed ones of sessions live again."""
        for sid, write in list(self._unwritten.items()):
            if write.written or (write.failed and self._superseded(sid)):
                del self._unwritten[sid]
