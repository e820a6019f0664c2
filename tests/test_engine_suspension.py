"""The engine's suspension: a suspended session's state is captured at once
and written to the store in the background (write-behind). Until the write
has succeeded the engine resumes it from memory; shutdown, snapshot and close
wait for or account for pending writes; a store that fails loses nothing."""

from __future__ import annotations

import logging
import threading
import time

import anyio
import pytest
import torch
from textfixtures import text_model

import streamgemma as sg
from streamgemma.sampling.params import SamplingParams
from streamgemma.serve import expiry
from streamgemma.serve.engine import Engine
from streamgemma.serve.offload import MemoryStore
from streamgemma.serve.record import EngineError

PROMPT = "the quick brown fox jumps over the lazy dog"


class GatedStore(MemoryStore):
    """An in-memory store whose `put` waits until `gate` is set (a slow
    disk), and fails while `failing` is set (a broken one)."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.failing = False
        self.puts = 0

    def put(self, session_id: str, blob: bytes) -> None:
        if not self.gate.wait(10):  # a test that failed with the gate closed ends, not hangs
            raise TimeoutError("the test never opened the gate")
        self.puts += 1
        if self.failing:
            raise OSError("disk full")
        super().put(session_id, blob)


def plain_after(prompt: str, seed: int | None = None, n: int = 0) -> sg.Session:
    """A plain session after `prompt` and `n` generated tokens (seeded with `seed`)."""
    s = text_model().session()
    s.feed(prompt)
    if n:
        list(s.generate(max_tokens=n, seed=seed, stop_token_ids=[]))
    return s


def tokens_after(prompt: str, seed: int, n: int) -> list[int]:
    return [t.id for t in plain_after(prompt).generate(max_tokens=n, seed=seed, stop_token_ids=[])]


async def generate(engine: Engine, es, seed: int, n: int) -> list[int]:
    stream = await engine.generate(es, SamplingParams(max_tokens=n, seed=seed, stop_token_ids=()))
    return [t.id async for t in stream]


def same_state(blob: bytes, plain: sg.Session) -> bool:
    """Whether the snapshot `blob` holds the state of `plain`: same position,
    logits, and the same tokens next."""
    restored = text_model().restore(blob)
    if restored.position != plain.position or not torch.equal(restored.logits, plain.logits):
        return False
    return ([t.id for t in restored.generate(max_tokens=5, seed=11, stop_token_ids=[])]
            == [t.id for t in plain.generate(max_tokens=5, seed=11, stop_token_ids=[])])


def test_a_session_resumed_before_its_write_finished_continues_exactly():
    model, store = text_model(), GatedStore()
    prompts = [PROMPT + " a", PROMPT + " b"]

    async def main():
        engine = Engine(model, max_active=1, store=store)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            a = await engine.open()
            await engine.consumed(engine.append(a, prompts[0]))
            store.gate.clear()  # the disk stalls: no write finishes until the gate opens
            b = await engine.open()  # suspends a; its snapshot waits for the writer
            assert a.live is None and engine.unwritten == 1 and store.list() == []
            await engine.consumed(engine.append(b, prompts[1]))
            with anyio.fail_after(10):
                got_a = await generate(engine, a, seed=3, n=8)  # restored from memory; b suspended
            assert engine.unwritten == 2 and store.list() == [] and engine.stats.resumptions == 1
            store.gate.set()
            got_b = await generate(engine, b, seed=4, n=8)  # a suspended again, b from memory or store
            await engine.suspend_all()
            assert engine.unwritten == 0
            tg.cancel_scope.cancel()
        return a, b, got_a, got_b

    a, b, got_a, got_b = anyio.run(main, backend="asyncio")
    assert got_a == tokens_after(prompts[0], 3, 8)
    assert got_b == tokens_after(prompts[1], 4, 8)
    # The store ends with the latest state of each (writes of one session land in order).
    assert same_state(store.get(a.id), plain_after(prompts[0], 3, 8))
    assert same_state(store.get(b.id), plain_after(prompts[1], 4, 8))


def test_shutdown_waits_for_pending_writes_and_stores_every_session():
    model, store = text_model(), GatedStore()

    async def main():
        engine = Engine(model, max_active=1, store=store)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            sessions = []
            for i in range(3):
                es = await engine.open()
                await engine.consumed(engine.append(es, PROMPT + f" {i}"))
                sessions.append(es)
                store.gate.clear()  # later writes stall
            assert engine.unwritten == 2 and store.list() == []
            done = []

            async def shutdown():
                done.append(await engine.suspend_all())

            tg.start_soon(shutdown)
            await anyio.sleep(0.2)
            assert not done  # waiting for the writer
            store.gate.set()
            with anyio.fail_after(10):
                while not done:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        return sessions, done[0]

    sessions, stored = anyio.run(main, backend="asyncio")
    assert sorted(stored) == sorted(es.id for es in sessions) == store.list()
    for i, es in enumerate(sessions):
        assert same_state(store.get(es.id), plain_after(PROMPT + f" {i}"))


def test_a_failing_store_loses_no_session(caplog):
    model, store = text_model(), GatedStore()

    async def main():
        engine = Engine(model, max_active=1, store=store, max_unwritten=2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            a, b = await engine.open(), await engine.open()  # a is suspended (at position 0)
            await engine.consumed(engine.append(b, PROMPT + " b"))
            with anyio.fail_after(10):  # a's write runs in a thread: let it land before the disk breaks
                while a.id not in store.list():
                    await anyio.sleep(0.01)
            store.failing = True
            await engine.consumed(engine.append(a, PROMPT + " a"))  # a restored, b suspended: put fails
            with anyio.fail_after(10):
                while store.puts < 2:
                    await anyio.sleep(0.01)
            await anyio.sleep(0.05)
            assert "could not write session" in caplog.text and engine.unwritten == 1
            with pytest.raises(OSError, match="disk full"):
                await engine.snapshot(b)  # retried, fails again: the caller hears of it
            # b is still resumable, from memory, exactly.
            got_b = await generate(engine, b, seed=7, n=6)
            # The writer may hold at most max_unwritten snapshots: with all of them
            # failed, a suspension is refused instead of piling up state in memory.
            c = await engine.open()  # suspends b (its write fails too)
            await engine.consumed(engine.append(c, PROMPT + " c"))
            with pytest.raises(sg.EngineError) as refused:
                await engine.consumed(engine.append(b, " more"))  # needs a slot: would suspend c
            assert refused.value.code == "capacity" and "could not be written" in str(refused.value)
            assert c.live is not None and a.live is None  # nothing was dropped
            # The store recovers: everything is stored at shutdown.
            store.failing = False
            stored = await engine.suspend_all()
            tg.cancel_scope.cancel()
        return a, b, c, got_b, stored

    with caplog.at_level(logging.ERROR, logger="streamgemma.engine"):
        a, b, c, got_b, stored = anyio.run(main, backend="asyncio")
    assert got_b == tokens_after(PROMPT + " b", 7, 6)
    assert sorted(stored) == store.list() == sorted([a.id, b.id, c.id])
    assert same_state(store.get(a.id), plain_after(PROMPT + " a"))
    assert same_state(store.get(b.id), plain_after(PROMPT + " b", 7, 6))
    assert same_state(store.get(c.id), plain_after(PROMPT + " c"))


def test_snapshot_waits_for_a_pending_write_and_close_deletes_after_it():
    model, store = text_model(), GatedStore()

    async def main():
        engine = Engine(model, max_active=1, store=store)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            a = await engine.open()
            await engine.consumed(engine.append(a, PROMPT))
            store.gate.clear()
            b = await engine.open()  # a's write stalls
            await engine.consumed(engine.append(b, PROMPT + " b"))
            c = await engine.open()  # b's write stalls behind it
            events = []

            async def snapshot_a():
                events.append(("snapshot", await engine.snapshot(a)))

            async def close_b():
                await engine.close(b)
                events.append(("closed", b.id in store.list()))

            tg.start_soon(snapshot_a)
            tg.start_soon(close_b)
            await anyio.sleep(0.2)
            assert events == []  # both wait for the writer
            store.gate.set()
            with anyio.fail_after(10):
                while len(events) < 2:
                    await anyio.sleep(0.01)
            await engine.close(c)
            tg.cancel_scope.cancel()
        return a, events

    a, events = anyio.run(main, backend="asyncio")
    assert sorted(events) == [("closed", False), ("snapshot", len(text_model().tokenizer.encode(PROMPT,
                                                                                                add_bos=True)))]
    assert store.list() == [a.id]  # b's write landed before its delete, not after
    assert same_state(store.get(a.id), plain_after(PROMPT))


def test_engine_rejects_bad_write_behind_settings():
    with pytest.raises(ValueError, match="max_unwritten"):
        Engine(text_model(), max_unwritten=0)
    with pytest.raises(ValueError, match="compression_level"):
        Engine(text_model(), compression_level=23)

# -- found by a review: resume under slot pressure, expiry racing a use, a tick cancelled mid-way ------------
PROMPT_IDS = [2, 5, 7, 11, 13, 17]


async def journaled_then_crashed(tmp_path) -> str:
    """A session whose input is acknowledged (journaled, durable) past its first snapshot, in an engine
    that then stops without suspending anything; its id."""
    engine = Engine(text_model(), max_active=2, store=sg.DirectorySnapshotStore(tmp_path))
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        es = await engine.open()
        assert await engine.consumed(engine.append(es, PROMPT_IDS)) == len(PROMPT_IDS)
        tg.cancel_scope.cancel()
    return es.id


def test_resume_under_capacity_keeps_journaled_input(tmp_path):
    """resume() of a stored session whose journal goes past its snapshot, while every slot is busy
    generating, fails with capacity; it left the record registered without the replay, and the next
    resume returned it at the snapshot's position: acknowledged input was lost."""
    async def main():
        sid = await journaled_then_crashed(tmp_path)
        engine = Engine(text_model(), max_active=1, store=sg.DirectorySnapshotStore(tmp_path))
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            busy = await engine.open()
            await engine.consumed(engine.append(busy, [2, 3, 4]))
            stream = await engine.generate(busy, SamplingParams(max_tokens=2000, stop_token_ids=()))
            with pytest.raises(EngineError) as err:
                await engine.resume(sid)
            assert err.value.code == "capacity"
            await stream.aclose()
            with anyio.fail_after(10):
                while busy.generation is not None:
                    await anyio.sleep(0.01)
            es = await engine.resume(sid)  # a slot is free now
            positions = [es.position]
            await engine.capture(es)
            positions.append(es.position)
            tg.cancel_scope.cancel()
        assert positions == [len(PROMPT_IDS)] * 2
        # With a slot free from the start, the same replay succeeds at once.
        engine = Engine(text_model(), max_active=1, store=sg.DirectorySnapshotStore(tmp_path))
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            assert (await engine.resume(sid)).position == len(PROMPT_IDS)
            tg.cancel_scope.cancel()

    anyio.run(main)


class SlowDeleteStore(MemoryStore):
    def __init__(self):
        super().__init__()
        self.gate = threading.Event()

    def delete(self, session_id):
        assert self.gate.wait(10)
        super().delete(session_id)


def test_a_session_used_during_expiry_is_not_closed():
    """expire() closed every session it found stale, also one attached to or given input meanwhile."""
    async def main():
        store = SlowDeleteStore()
        engine = Engine(text_model(), max_active=4, store=store, session_ttl=60.0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)  # (its periodic expiry waits 15 s: not in this test)
            a, b = await engine.open(), await engine.open()
            for es in (a, b):
                es.last_active = time.monotonic() - 120  # unused for two ttls
            pending = {}

            async def use_b_while_a_is_closed():
                await anyio.sleep(0.2)  # expire is inside close(a), waiting for the store
                b.owner = object()  # a client attaches to b and appends
                pending["b"] = engine.append(b, [2, 5, 7])
                store.gate.set()

            tg.start_soon(use_b_while_a_is_closed)
            await expiry.expire(engine)
            closed = b.closed
            error = None
            try:
                await engine.consumed(pending["b"])
            except Exception as e:  # noqa: BLE001
                error = e
            tg.cancel_scope.cancel()
        assert a.closed
        assert not closed, f"b was closed although used during expiry ({error!r})"

    anyio.run(main)


def test_an_append_consumed_in_a_cancelled_tick_is_answered_at_shutdown(tmp_path):
    """A tick cancelled after its input turn left that turn's journal group unsubmitted: the append it
    consumed was neither acknowledged nor failed, and its waiters hung."""
    async def main():
        engine = Engine(text_model(), max_active=4, store=sg.DirectorySnapshotStore(tmp_path))
        feeding = threading.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            a, b = await engine.open(), await engine.open()
            await engine.consumed(engine.append(a, [2, 5, 7]))
            await engine.consumed(engine.append(b, [2, 5]))
            stream = await engine.generate(a, SamplingParams(max_tokens=500, stop_token_ids=()))
            live_b = b.live
            real_feed = live_b.feed

            def slow_feed(chunk, *args, **kw):
                feeding.set()
                time.sleep(0.3)
                return real_feed(chunk, *args, **kw)

            live_b.feed = slow_feed
            pending = engine.append(b, list(range(3, 3 + 40)))  # > step_input_tokens: a prefill turn
            while not feeding.is_set():
                await anyio.sleep(0.005)
            tg.cancel_scope.cancel()  # shutdown while the prefill runs
        position_b = b.position
        with anyio.move_on_after(5):
            await engine.suspend_all()
        done = pending.done
        with anyio.move_on_after(2):
            await pending.consumed.wait()
        del stream
        assert position_b == 2 + 40  # the chunk was consumed (state, snapshot)...
        assert done or pending.done, "...but its append is neither acknowledged nor failed: waiters hang"

    anyio.run(main)


class GatedDirectoryStore(sg.DirectorySnapshotStore):
    """A durable store whose `put` waits until `gate` is set."""

    def __init__(self, root):
        super().__init__(root)
        self.gate = threading.Event()

    def put(self, session_id, blob):
        assert self.gate.wait(10)
        super().put(session_id, blob)


def test_concurrent_durable_opens_stay_within_max_active(tmp_path):
    """A durable open holds its new session's slot while the store writes its first snapshot; opens running
    meanwhile did not count it, so a burst of opens held more slots than max_active, and kept them."""
    async def main():
        store = GatedDirectoryStore(tmp_path)
        engine = Engine(text_model(), max_active=2, store=store)
        pool, held, most = engine.model.pool, [0], [0]
        allocate, release = pool.allocate, pool.release

        def counted_allocate():
            held[0] += 1
            most[0] = max(most[0], held[0])
            return allocate()

        def counted_release(slot):
            held[0] -= 1
            release(slot)

        pool.allocate, pool.release = counted_allocate, counted_release
        opened = []

        async def open_one():
            opened.append(await engine.open())

        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            async with anyio.create_task_group() as opens:
                for _ in range(5):
                    opens.start_soon(open_one)
                await anyio.sleep(0.3)  # every open has started; the first snapshots wait for the store
                store.gate.set()
            for es in opened:
                await engine.consumed(engine.append(es, [2, 5, 7]))  # each usable, restored in turn
            tg.cancel_scope.cancel()
        return len(opened), most[0], engine.active

    assert anyio.run(main) == (5, 2, 2)


class FailingDeleteStore(sg.DirectorySnapshotStore):
    """Deletes of `broken` ids fail (a permissions problem, a flaky backend)."""

    broken: set[str] = frozenset()

    def delete(self, session_id):
        if session_id in self.broken:
            raise sg.StoreError(f"cannot delete {session_id}")
        super().delete(session_id)


@pytest.mark.parametrize("where", ["open", "stored"])
def test_one_session_that_cannot_be_deleted_does_not_stop_the_expiry_of_the_others(where, tmp_path, caplog):
    """The first failing delete ended the pass: every session after it stayed, every pass."""
    async def main():
        store = FailingDeleteStore(tmp_path)
        engine = Engine(text_model(), max_active=4, store=store, session_ttl=0.05)
        sessions = [await engine.open() for _ in range(3)]
        store.broken = {sessions[0].id}
        if where == "stored":  # sessions of an earlier process, only in the store
            for es in sessions:
                await engine.close(es, delete=False)
        else:
            for es in sessions:
                es.last_active = time.monotonic() - 1
        await anyio.sleep(0.1)
        expired = await engine.expire()
        return expired, store.list(), sessions[0].id

    expired, left, broken = anyio.run(main)
    assert (expired, left) == (2, [broken])
    assert "could not expire session" in caplog.text


def test_a_session_being_closed_cannot_be_resumed():
    """resume() returned the record of a session whose close was in progress (closed, waiting for the tick
    to end, then deleted): the websocket answered `opened` for it, and its next request failed with `closed`."""
    async def main():
        model = text_model()
        decode = model.decode

        def slow_decode(slots, tokens):  # a long tick: the close waits for it
            time.sleep(0.2)
            return decode(slots, tokens)

        model.decode = slow_decode
        engine = Engine(model, max_active=4, step_input_tokens=0, idle_step_input_tokens=0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            other, victim = await engine.open(seed=1), await engine.open(seed=2)
            await engine.consumed(engine.append(other, [2, 5, 6]))
            await engine.generate(other, SamplingParams(max_tokens=20, stop_token_ids=()))
            await anyio.sleep(0.05)  # a tick decodes, holding the model lock
            tg.start_soon(engine.close, victim)
            await anyio.sleep(0)
            assert victim.closed and victim.id in engine.sessions
            with pytest.raises(EngineError, match="no such session"):
                await engine.resume(victim.id)
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_expiry_while_the_store_is_down_logs_one_line_a_pass(caplog):
    class DownStore(MemoryStore):
        def older_than(self, seconds):
            raise sg.StoreUnavailable("the Redis store is unavailable (older_than): connection refused")

    async def main():
        engine = Engine(text_model(), max_active=2, store=DownStore(), session_ttl=0.2)
        with anyio.move_on_after(0.3):  # one pass, after a quarter of the ttl
            await expiry.expire_periodically(engine)

    with caplog.at_level(logging.WARNING, logger="streamgemma.engine"):
        anyio.run(main)
    failures = [r for r in caplog.records if "expiring idle sessions failed" in r.getMessage()]
    assert failures and all(r.levelname == "WARNING" and r.exc_info is None for r in failures)  # (tracebacks)
