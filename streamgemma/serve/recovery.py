"""Recovery of a stored session whose journal continues its snapshot: the
snapshot restored into a slot, then the journal's records replayed (the
calls that executed them, so the state is exactly the one that was lost).

A journal holds up to `snapshot_every` tokens (4096), each replayed as the
decode step it was: seconds of model work. Replayed in one go under the
model lock, it stalled every generation of the engine for that long, once
per session reopened after a crash. So the records go in slices of about
SLICE_S of model work, a tick running between two slices: while sessions
generate, the replay and they each get about half of the device. (Slices
that waited for input turns, at the input share's 15%, made a 4096-step
replay outlast a client's 60 s timeout.) The slices are charged to the input
budget, so other input waits its turn after them. Meanwhile the session is
not in the engine's books (no tick or client request can touch it); its
slot is counted as one being opened (`Slots.hold`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import anyio
import anyio.to_thread

from ..session.journal import JournalRecord, replay
from ..session.session import Session
from ..session.snapshot import SnapshotContents
from .record import EngineStats, SessionRecord
from .scheduler import Scheduler
from .slots import Slots

SLICE_S = 0.01  # model work replayed between two ticks: about a tick's


async def replayed(contents: SnapshotContents, records: Sequence[JournalRecord], restore, slots: Slots,
                   scheduler: Scheduler, generating: Mapping[str, SessionRecord], model_lock: anyio.Lock,
                   stats: EngineStats) -> Session:
    """A live session restored from `contents` (`restore(contents)`, in a thread) with `records`
    replayed; closed if anything fails (SnapshotFormatError: the records do not continue it)."""
    async with model_lock:
        await slots.make_room(wait=True)
        async with scheduler.input_work(generating):
            live = await anyio.to_thread.run_sync(restore, contents)
        slots.hold()
        stats.resumptions += 1
    try:
        start = 0
        while start < len(records):
            async with model_lock, scheduler.input_work(generating):  # (a waiting tick gets the lock next)
                start = await anyio.to_thread.run_sync(replay_for, live, records, start, SLICE_S)
    except BaseException:
        with anyio.CancelScope(shield=True):
            async with model_lock:
                live.close()
        raise
    finally:
        await slots.unhold()
    return live


def replay_for(session: Session, records: Sequence[JournalRecord], start: int, seconds: float) -> int:
    """`replay` of records[start:] for about `seconds` (one record at least); the index to go on from."""
    deadline = time.monotonic() + seconds
    end = start
    while end < len(records):
        replay(session, records[end:end + 1])
        end += 1
        if time.monotonic() >= deadline:
            break
    return end
