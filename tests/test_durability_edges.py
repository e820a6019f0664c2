"""The stores and the journal at their edges: a FIFO planted as a journal, an id that is not a string, a
record left for a closed session, compaction temp files, background snapshots behind a slow store (each
found by a review)."""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref

import anyio
import pytest
from textfixtures import text_model

import streamgemma as sg
from streamgemma.sampling.params import SamplingParams
from streamgemma.serve.engine import Engine
from streamgemma.serve.record import EngineError


@pytest.fixture(scope="module")
def model():
    return text_model()


async def _ticks_until_consumed(engine, *sessions):
    while any(es.inputs for es in sessions):
        await engine.tick()


def test_a_fifo_planted_as_a_journal_fails_the_resume_instead_of_hanging(model, tmp_path):
    """The snapshot file was opened without blocking and checked; the journal beside it was read blindly, so
    the resume blocked a worker thread forever (no cancel scope reaches it)."""
    async def main():
        engine = Engine(model, store=sg.DirectorySnapshotStore(tmp_path))
        es = await engine.open(seed=1)
        sid = es.id
        os.mkfifo(engine.store.journal().path(sid))
        survivor = Engine(model, store=sg.DirectorySnapshotStore(tmp_path))
        with anyio.fail_after(10), pytest.raises(EngineError, match="not a regular file"):
            await survivor.resume(sid)
        with pytest.raises(OSError):  # an append does not wait for a reader either (ENXIO)
            survivor.store.journal().append({sid: [b"x"]})
        with pytest.raises(sg.SnapshotFormatError, match="not a regular file"):  # nor a compaction
            survivor.store.journal().compact(sid, 0)

    anyio.run(main)


@pytest.mark.parametrize("method", ["compact", "delete", "read"])
def test_journal_calls_with_an_id_that_is_not_a_string_name_the_id(tmp_path, method):
    journal = sg.DirectorySnapshotStore(tmp_path).journal()
    args = (123, 0) if method == "compact" else (123,)
    with pytest.raises(sg.SnapshotIdError):  # (compact and delete: AttributeError before)
        getattr(journal, method)(*args)


def test_a_session_closed_before_the_next_tick_leaves_no_journal(model, tmp_path):
    """A seeded generate records its random stream in the tick's batch; close() waited only for batches already
    submitted, deleted the journal, and the next tick wrote the leftover record into a new one, which nothing
    ever removed."""
    async def main():
        store = sg.DirectorySnapshotStore(tmp_path)
        engine = Engine(model, store=store)
        other, es = await engine.open(), await engine.open(seed=1)
        engine.append(es, [2, 5, 7])
        await _ticks_until_consumed(engine, es)
        await engine.generate(es, SamplingParams(max_tokens=5, seed=42))
        await engine.close(es)
        engine.append(other, [2, 9])
        await _ticks_until_consumed(engine, other)
        return store.journal().path(es.id).exists()

    assert not anyio.run(main)


def test_temp_files_of_interrupted_journal_compactions_are_cleaned_up(tmp_path):
    store = sg.DirectorySnapshotStore(tmp_path)
    store.journal().append({"s1": [b"x"]})
    left = store.journal().directory / ".s1.sgjournal.abcd.tmp"  # what a compaction cut short leaves
    left.write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(left, (old, old))
    assert store.remove_stale_temp_files() == 1 and not left.exists()


def test_background_snapshots_behind_a_slow_store_are_bounded(model, tmp_path, monkeypatch):
    """Each background snapshot captured a session's whole state and queued it on the writer, outside the
    max_unwritten bound: behind a store slower than they came, they piled up in memory without bound."""
    captured = []  # weak references: a state replaced before its write is freed, not waiting
    capture = sg.Session.capture

    def counted(self):
        contents = capture(self)
        captured.append(weakref.ref(contents))
        return contents

    monkeypatch.setattr(sg.Session, "capture", counted)

    class SlowStore(sg.DirectorySnapshotStore):
        def put(self, session_id, blob):
            time.sleep(0.05)
            super().put(session_id, blob)

    async def main():
        engine = Engine(model, max_active=4, store=SlowStore(tmp_path), max_unwritten=2, snapshot_every=2)
        sessions = [await engine.open(seed=i) for i in range(4)]
        for es in sessions:
            engine.append(es, [2, 5, 7])
        await _ticks_until_consumed(engine, *sessions)
        for es in sessions:
            await engine.generate(es, SamplingParams(max_tokens=60, stop_token_ids=()))
        for _ in range(60):
            await engine.tick()
        gc.collect()
        return sum(ref() is not None for ref in captured)  # states captured and still held for the store

    waiting = anyio.run(main)
    assert waiting <= 3  # (max_unwritten 2, and one being written); ~100 before


class GatedStore(sg.DirectorySnapshotStore):
    """Its writes wait while `gate` is clear."""

    def __init__(self, directory):
        super().__init__(directory)
        self.gate = threading.Event()
        self.gate.set()

    def put(self, session_id, blob):
        assert self.gate.wait(10)
        super().put(session_id, blob)


async def _generating_behind_a_closed_gate(model, store) -> object:
    """A session of `model` on `store`, a background snapshot every tick, generating 6 tokens from position
    3 with the store's writes held."""
    engine = Engine(model, store=store, snapshot_every=1)
    es = await engine.open(seed=1)
    engine.append(es, [2, 5, 7])
    await _ticks_until_consumed(engine, es)
    store.gate.clear()  # the next background write waits in put, the later ones queue behind it
    await engine.generate(es, SamplingParams(max_tokens=6, stop_token_ids=()))
    return engine, es


async def _stored_position_reaches(model, store, es) -> None:
    with anyio.move_on_after(5):
        while model.restore(store.get(es.id)).position != es.position:
            await anyio.sleep(0.01)


def test_the_newest_background_snapshot_is_written_though_one_was_being_written(model, tmp_path):
    """A background snapshot was skipped while an earlier one of its session was still queued; once the ticks
    stopped, the store kept an older state than the last one (CI caught it as a flaky test)."""
    async def main():
        store = GatedStore(tmp_path)
        engine, es = await _generating_behind_a_closed_gate(model, store)
        while es.live is not None and es.position < 3 + 6:
            await engine.tick()
        store.gate.set()
        await _stored_position_reaches(model, store, es)
        return model.restore(store.get(es.id)).position, es.position

    stored, last = anyio.run(main)
    assert stored == last == 9  # the first state of the six before


def test_a_snapshot_queued_after_a_background_one_is_not_overtaken_by_a_newer_state(model, tmp_path):
    """The background write queued before an explicit snapshot must not take a state newer than that
    snapshot's: it would land first and compact the journal past it, and the snapshot landing after it
    would leave a store that recovers to an older position than the tokens acknowledged."""
    async def main():
        store = GatedStore(tmp_path)
        engine, es = await _generating_behind_a_closed_gate(model, store)
        async with anyio.create_task_group() as tg:
            await engine.tick()  # its background write waits in put
            await engine.tick()  # its background write is queued
            tg.start_soon(engine.snapshot, es)  # queued after it
            await anyio.sleep(0.05)
            while es.live is not None and es.position < 3 + 6:
                await engine.tick()
            store.gate.set()
        await _stored_position_reaches(model, store, es)
        survivor = Engine(model, store=sg.DirectorySnapshotStore(tmp_path))
        return (await survivor.resume(es.id)).position, es.position

    recovered, last = anyio.run(main)
    assert recovered == last == 9


def test_a_journal_that_cannot_be_compacted_does_not_fail_the_snapshot_write(model, tmp_path, monkeypatch):
    """The write stored the snapshot, then compaction failed, and the write counted as failed: it was retried,
    suspensions were eventually refused ("capacity") and shutdown reported a stored session as unsaved."""
    store = sg.DirectorySnapshotStore(tmp_path)

    def broken(session_id, position):
        raise OSError("no space left for the compacted journal")

    monkeypatch.setattr(store.journal(), "compact", broken)

    async def main():
        engine = Engine(model, store=store)
        es = await engine.open(seed=1)
        engine.append(es, [2, 5, 7])
        await _ticks_until_consumed(engine, es)
        with anyio.fail_after(20):
            await engine.snapshot(es)  # raised OSError before
            return engine.stats.write_failures, await engine.offloader.flush()

    assert anyio.run(main) == (0, [])
