"""The engine's session lifecycle under concurrency: two resumes of one stored session, a discard during a
resume, a durable open cancelled while its first snapshot is written (each found by a review)."""

from __future__ import annotations

import threading
import time

import anyio
from test_engine_suspension import PROMPT_IDS, journaled_then_crashed
from textfixtures import text_model

import streamgemma as sg
from streamgemma.sampling.params import SamplingParams
from streamgemma.serve.engine import Engine
from streamgemma.serve.record import EngineError


def slow_restore(engine, seconds=0.3):
    """The engine's model restores slowly (a large state), so a replay takes a while."""
    model, restore = engine.model, engine.model.restore

    def slow(contents):
        time.sleep(seconds)
        return restore(contents)

    model.restore = slow


def test_a_concurrent_resume_gets_the_session_before_its_journal_is_replayed(tmp_path):
    """resume() registers the SessionRecord (at the snapshot's position) before it replays the journal;
    a second resume of the same id meanwhile returns that record at once: the position it reports is
    not final (acknowledged input missing), contrary to resume's docstring."""
    async def main():
        sid = await journaled_then_crashed(tmp_path)
        engine = Engine(text_model(), max_active=2, store=sg.DirectorySnapshotStore(tmp_path))
        slow_restore(engine)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            first = {}

            async def resume_first():
                first["es"] = await engine.resume(sid)

            tg.start_soon(resume_first)
            with anyio.fail_after(10):
                while sid not in engine.sessions:  # the first resume has registered it, replays now
                    await anyio.sleep(0.005)
            second = await engine.resume(sid)
            seen_by_second = second.position
            with anyio.fail_after(10):
                while "es" not in first:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        assert first["es"].position == len(PROMPT_IDS)
        assert seen_by_second == len(PROMPT_IDS), \
            f"the second resume reported position {seen_by_second}, before the replay of acknowledged input"

    anyio.run(main)


def test_a_concurrent_resume_gets_a_session_the_first_resume_then_closes(tmp_path):
    """The first resume's replay fails (no free slot: every slot generates) and it closes the record it
    registered; a second resume meanwhile got that record: its client holds a closed session."""
    async def main():
        sid = await journaled_then_crashed(tmp_path)
        engine = Engine(text_model(), max_active=1, store=sg.DirectorySnapshotStore(tmp_path))
        slow_restore(engine, 0.0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            busy = await engine.open()
            await engine.consumed(engine.append(busy, [2, 3, 4]))
            stream = await engine.generate(busy, SamplingParams(max_tokens=2000, stop_token_ids=()))
            results = {}

            async def resume_as(name):
                try:
                    results[name] = await engine.resume(sid)
                except EngineError as e:
                    results[name] = e.code

            async with engine._model_lock:  # (a tick in progress: the first resume waits to replay)
                tg.start_soon(resume_as, "first")
                await anyio.sleep(0.2)  # (it has read the store, and waits for the lock to replay)
                tg.start_soon(resume_as, "second")
                await anyio.sleep(0.1)
            with anyio.fail_after(10):
                while len(results) < 2:
                    await anyio.sleep(0.01)
            await stream.aclose()
            tg.cancel_scope.cancel()
        assert results["first"] == "capacity"
        second = results["second"]
        # (with every slot generating, the second resume should fail as the first did, not hold a dead record)
        assert second == "capacity", f"the second resume returned {second!r}, which the first closed " \
            f"under it (closed: {getattr(second, 'closed', None)})"

    anyio.run(main)


class GatedGetStore(sg.DirectorySnapshotStore):
    """A durable store whose `get` reads the snapshot, then waits for `gate` (a slow read)."""

    def __init__(self, root):
        super().__init__(root)
        self.gate = threading.Event()
        self.gate.set()
        self.reading = threading.Event()

    def get(self, session_id):
        blob = super().get(session_id)
        self.reading.set()
        assert self.gate.wait(10)
        return blob


def test_a_session_discarded_while_it_is_being_resumed_comes_back(tmp_path):
    """discard() of a session only in the store, while a resume of it reads the store: discard deletes
    the snapshot and journal and returns; the resume then registers the session anyway. The session
    the client was told is deleted is open again (and its store copy and journal are gone)."""
    async def main():
        sid = await journaled_then_crashed(tmp_path)
        store = GatedGetStore(tmp_path)
        engine = Engine(text_model(), max_active=2, store=store)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            store.gate.clear()
            result = {}

            async def resume():
                try:
                    result["es"] = await engine.resume(sid)
                except EngineError as e:
                    result["error"] = e.code

            tg.start_soon(resume)
            await anyio.to_thread.run_sync(store.reading.wait, 10)  # the resume has read the snapshot
            discarded = anyio.Event()

            async def discard():
                await engine.discard(sid)  # succeeds: the session is gone...
                discarded.set()

            tg.start_soon(discard)
            await anyio.sleep(0.2)  # (on the current code discard returns here, before the read ends)
            store.gate.set()
            with anyio.fail_after(10):
                await discarded.wait()
                while not result:
                    await anyio.sleep(0.01)
            in_engine, in_store = sid in engine.sessions, sid in store
            tg.cancel_scope.cancel()
        resumed = result.get("es")
        assert not in_engine and (resumed is None or resumed.closed), \
            f"discard() returned, then the concurrent resume registered the session anyway " \
            f"({result}, in the engine: {in_engine}, in the store: {in_store})"

    anyio.run(main)


class GatedPutStore(sg.DirectorySnapshotStore):
    def __init__(self, root):
        super().__init__(root)
        self.gate = threading.Event()
        self.gate.set()

    def put(self, session_id, blob):
        assert self.gate.wait(10)
        super().put(session_id, blob)


def test_a_cancelled_durable_open_leaves_no_snapshot_in_the_store(tmp_path, monkeypatch):
    """An open cancelled while store_new captures the new session's state: the capture's write is
    queued on the writer already; store_new closes the session and releases its id, but the write
    still lands: a snapshot of a session nobody knows stays in the store (and is listed)."""
    capture = sg.Session.capture

    def slow_capture(self):
        time.sleep(0.3)  # (a large state: the cancellation arrives while it is copied)
        return capture(self)

    async def main():
        store = GatedPutStore(tmp_path)
        engine = Engine(text_model(), max_active=2, store=store)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            monkeypatch.setattr(sg.Session, "capture", slow_capture)
            with anyio.move_on_after(0.1) as scope:
                await engine.open()
            monkeypatch.setattr(sg.Session, "capture", capture)
            assert scope.cancelled_caught
            await anyio.to_thread.run_sync(engine.offloader._writer.submit(lambda: None).result)  # writes done
            listed = store.list()
            tg.cancel_scope.cancel()
        assert engine.sessions == {} and engine.active == 0
        assert listed == [], f"a cancelled open left a snapshot in the store: {listed}"

    anyio.run(main)


def test_a_session_closed_but_kept_leaves_nothing_in_the_journal_books(tmp_path):
    """close(delete=False) (a hand-over, a drop) kept the session's count of tokens since its snapshot: a long-running
    worker held one entry for every session ever handed over."""
    async def main():
        engine = Engine(text_model(), max_active=2, store=sg.DirectorySnapshotStore(tmp_path))
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            es = await engine.open()
            await engine.consumed(engine.append(es, PROMPT_IDS))
            await engine.close(es, delete=False)
            tg.cancel_scope.cancel()
        return engine.journal._since_snapshot  # (no public view of these books)

    assert anyio.run(main) == {}
