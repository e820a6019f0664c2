"""The journal off the tick: a tick's records are written while the next
tick runs, and what they report (tokens, `appended`) reaches a client only
once they are durable, in order. A journal whose appends the test holds,
slows, fails or refuses shows each part: the ticks run ahead (by at most
`in_flight` groups), nothing leaves early, a failed commit holds back its
outputs and every later one's, a refused one drops its session's, close and
shutdown wait for what is pending, and a background snapshot taken while a
commit is pending recovers correctly after a crash."""

from __future__ import annotations

import contextlib
import threading
import time

import anyio
import pytest
from textfixtures import text_model

import streamgemma as sg
from streamgemma.sampling.params import SamplingParams
from streamgemma.serve.engine import Engine
from streamgemma.session.journal import Journal

PROMPT = [2, 5, 7, 11]


class HeldJournal(Journal):
    """A directory journal whose appends wait for `gate`, take `delay` s, fail
    `failures` times, or refuse the ids in `refuse`; `dead`: fail forever
    (the process died before this append)."""

    def __init__(self, inner: Journal):
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.delay = 0.0
        self.failures = 0
        self.refuse: set[str] = set()
        self.dead = False
        self.appends = 0

    def append(self, batch):
        assert self.gate.wait(30)
        if self.dead or self.failures:
            self.failures = max(0, self.failures - 1)
            raise OSError("the journal's disk is gone")
        time.sleep(self.delay)
        refused = set(batch) & self.refuse
        self.inner.append({sid: records for sid, records in batch.items() if sid not in refused})
        self.appends += 1
        return refused

    def read(self, session_id):
        return self.inner.read(session_id)

    def compact(self, session_id, position):
        self.inner.compact(session_id, position)

    def delete(self, session_id):
        self.inner.delete(session_id)


class HeldStore(sg.DirectorySnapshotStore):
    def __init__(self, directory):
        super().__init__(directory)
        self.held = HeldJournal(super().journal())

    def journal(self) -> HeldJournal:
        return self.held


def reference(model, seed: int, tokens: int) -> list[int]:
    session = model.session(seed=seed)
    session.feed(PROMPT)
    return [t.id for t in session.generate(max_tokens=tokens, stop_token_ids=[])]


async def wait_for(condition, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.002)


@contextlib.asynccontextmanager
async def running(engine: Engine):
    """The engine's scheduler running in a task group (yielded for other tasks),
    cancelled when the block ends."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        yield tg
        tg.cancel_scope.cancel()


async def prompted(engine: Engine, *seeds: int) -> list:
    """Sessions of `engine` opened with `seeds`, each having consumed PROMPT."""
    sessions = [await engine.open(seed=seed) for seed in seeds]
    for es in sessions:
        await engine.consumed(engine.append(es, PROMPT))
    return sessions


def test_ticks_run_ahead_of_a_held_commit_and_nothing_leaves_before_it_is_durable(tmp_path):
    model = text_model()

    async def main():
        store = HeldStore(tmp_path)
        engine = Engine(model, store=store)
        held = store.held
        async with running(engine):
            a, b = await prompted(engine, 1, 2)
            start = a.position
            held.gate.clear()
            stream = await engine.generate(a, SamplingParams(max_tokens=20, stop_token_ids=()))
            appended = engine.append(b, [9, 10, 12])  # consumed by a tick, acknowledged only once durable
            await wait_for(lambda: engine.journal.pending > engine.journal.in_flight)
            await anyio.sleep(0.1)
            # The device ran ahead of the store by in_flight + 1 ticks, then waited (back-pressure).
            assert engine.journal.pending == engine.journal.in_flight + 1
            assert a.position - start == engine.journal.in_flight + 1
            assert b.position > start and not appended.done  # (riding along: a token a tick)
            assert stream.take_ready() == []  # not one token before its record is durable
            held.gate.set()
            ids = [t.id async for t in stream]
            assert await engine.consumed(appended) == start + 3
        assert ids == reference(model, 1, 20)
        assert stream.done.reason == "length" and stream.done.position == start + 20
        records = store.journal().read(a.id)
        assert records[-1].end == start + 20  # everything sent is in the journal

    anyio.run(main)


def test_a_failed_commit_holds_back_its_outputs_and_every_later_ones(tmp_path):
    model = text_model()

    async def main():
        store = HeldStore(tmp_path)
        engine = Engine(model, store=store)
        async with running(engine):
            (es,) = await prompted(engine, 3)
            store.held.failures = 3  # retried after 0.05, 0.1, 0.2 s
            stream = await engine.generate(es, SamplingParams(max_tokens=12, stop_token_ids=()))
            await wait_for(lambda: engine.stats.journal_failures >= 2)
            assert stream.take_ready() == [] and es.position > PROMPT[0]
            ids = [t.id async for t in stream]
        assert engine.stats.journal_failures == 3
        assert ids == reference(model, 3, 12)
        assert [r.end for r in store.journal().read(es.id)][-1] == es.position  # nothing lost, in order

    anyio.run(main)


def test_a_refused_commit_drops_its_sessions_outputs_only(tmp_path):
    model = text_model()

    async def main():
        store = HeldStore(tmp_path)
        engine = Engine(model, store=store)
        async with running(engine):
            a, b = await prompted(engine, 4, 5)
            store.held.refuse = {a.id}  # another worker took a over
            sa = await engine.generate(a, SamplingParams(max_tokens=6, stop_token_ids=()))
            sb = await engine.generate(b, SamplingParams(max_tokens=6, stop_token_ids=()))
            ids_a = [t.id async for t in sa]
            ids_b = [t.id async for t in sb]
            assert a.id in engine.journal.lost
            pending = engine.append(a, [9])
            with pytest.raises(sg.EngineError, match="another worker"):
                await engine.consumed(pending)
        assert ids_a == [] and sa.done is not None  # its stream still ends
        assert ids_b == reference(model, 5, 6)

    anyio.run(main)


@pytest.mark.parametrize("ending", ["length", "dropped", "cancelled"])
def test_a_generation_refused_midway_ends_at_the_position_its_client_was_told(tmp_path, ending):
    """The store starts refusing a generating session's records (another worker took it): the
    tokens of the refused ticks are never sent, so its `done` must not count them (a client that
    reopens with `since` would skip tokens it never got). Ended by its length, or by the fleet's drop."""
    from streamgemma.serve.fleet import drop

    model = text_model()

    async def main():
        store = HeldStore(tmp_path)
        engine = Engine(model, store=store)
        async with running(engine):
            (a,) = await prompted(engine, 4)
            start = a.position
            stream = await engine.generate(a, SamplingParams(max_tokens=40 if ending == "length" else 200,
                                                             stop_token_ids=()))
            got = []
            async for token in stream:
                got.append(token.id)
                if len(got) == 3 and ending == "cancelled":  # while the refused tick is being committed
                    store.held.gate.clear()
                    await wait_for(lambda: engine.journal.pending >= 1)
                    store.held.refuse = {a.id}
                    engine.cancel(a)
                    await wait_for(lambda: a.generation is None)  # (its tick had no records of a)
                    store.held.gate.set()
                elif len(got) == 3:
                    store.held.refuse = {a.id}
                    if ending == "dropped":
                        await wait_for(lambda: a.id in engine.journal.lost)
                        await drop(engine, a.id)
            assert a.id not in engine.journal.refused_at or ending != "dropped"
        return start, got, stream.done

    start, got, done = anyio.run(main)
    assert 3 <= len(got) < 40 and done.reason == {"length": "length"}.get(ending, "cancelled")
    assert got == reference(model, 4, len(got))
    assert done.position == start + len(got), (done, start, len(got))


def test_close_and_shutdown_wait_for_the_pending_commit(tmp_path):
    model = text_model()

    async def main():
        store = HeldStore(tmp_path)
        engine = Engine(model, store=store)
        closed = anyio.Event()

        async def close(es):
            await engine.close(es)
            closed.set()

        async with running(engine) as tg:
            a, b = await prompted(engine, 6, 7)
            store.held.gate.clear()
            sa = await engine.generate(a, SamplingParams(max_tokens=50, stop_token_ids=()))
            sb = await engine.generate(b, SamplingParams(max_tokens=50, stop_token_ids=()))
            await wait_for(lambda: engine.journal.pending > engine.journal.in_flight)
            tg.start_soon(close, a)
            await anyio.sleep(0.1)
            assert not closed.is_set() and sa.take_ready() == []
            store.held.gate.set()
            await closed.wait()
            ids_a = [t.id async for t in sa]
            # Shutdown with commits pending: the scheduler stops, then suspend_all writes them first.
            store.held.gate.clear()
            await wait_for(lambda: engine.journal.pending > engine.journal.in_flight)
            threading.Timer(0.1, store.held.gate.set).start()  # the append being written ends, the rest wait
        assert engine.journal.pending >= 1
        assert 3 <= len(ids_a) < 50 and ids_a == reference(model, 6, len(ids_a))
        assert sa.done.reason == "cancelled" and sa.done.position == len(PROMPT) + len(ids_a)
        assert not store.journal().inner.path(a.id).exists()  # deleted after its last records landed
        with anyio.fail_after(10):
            assert await engine.suspend_all() == [b.id]
        assert engine.journal.pending == 0
        ids_b = [t.id for t in sb.take_ready()]
        assert sb.done is not None and sb.done.position == b.position == len(PROMPT) + len(ids_b)
        assert model.restore(store.get(b.id)).position == b.position
        assert store.journal().read(b.id) == [] or store.journal().read(b.id)[-1].end <= b.position

    anyio.run(main)


def test_a_background_snapshot_taken_while_a_commit_is_pending_recovers(tmp_path):
    """The snapshot holds tokens whose records never landed (the process dies
    first): recovery restores it, a true state of the session that includes
    everything acknowledged, and its recent ids give the client what it missed."""
    model = text_model()

    async def main():
        store = HeldStore(tmp_path)
        engine = Engine(model, store=store, snapshot_every=1)  # a background snapshot every tick
        received = []
        async with running(engine):
            (es,) = await prompted(engine, 8)
            stream = await engine.generate(es, SamplingParams(max_tokens=40, stop_token_ids=()))
            await wait_for(lambda: received.extend(stream.take_ready()) or len(received) >= 4)
            store.held.gate.clear()
            await wait_for(lambda: engine.journal.pending > engine.journal.in_flight)  # the ticks wait now
            await wait_for(lambda: model.restore(store.get(es.id)).position == es.position)  # the last snapshot
            store.held.dead = True  # the crash: nothing pending is ever written
            store.held.gate.set()
        received += stream.take_ready()
        snapped = model.restore(store.get(es.id)).position
        assert snapped > len(PROMPT) + len(received)  # it holds tokens no client saw and no record holds
        survivor = Engine(model, store=sg.DirectorySnapshotStore(tmp_path))
        recovered = await survivor.resume(es.id)
        assert recovered.position == snapped
        ids = [int(i) for i in (await survivor.capture(recovered)).extra["recent_ids"]]
        generated = reference(model, 8, 40)
        assert ids == PROMPT + generated[:snapped - len(PROMPT)]  # what `open` with since returns
        assert [t.id for t in received] == generated[:len(received)]

    anyio.run(main)


def test_reopening_a_crashed_session_replays_its_journal_without_stalling_the_others(tmp_path):
    """The journal of a crashed session (400 decode steps here, up to 4096) was replayed in one go
    under the model lock: every other generation stopped for as long. Now in slices between ticks;
    the session continues exactly."""
    model = text_model()

    async def main():
        first = Engine(model, store=sg.DirectorySnapshotStore(tmp_path))
        async with running(first):
            (a,) = await prompted(first, 3)
            stream = await first.generate(a, SamplingParams(max_tokens=400, stop_token_ids=()))
            before = [t.id async for t in stream]
        # a crash: nothing suspended; the store has a's snapshot at open and its journal
        second = Engine(model, store=sg.DirectorySnapshotStore(tmp_path))
        gaps = []
        async with running(second) as tg:
            (b,) = await prompted(second, 4)
            stream_b = await second.generate(b, SamplingParams(max_tokens=150, stop_token_ids=()))

            async def read_b():
                last = time.monotonic()
                async for _ in stream_b:
                    gaps.append(time.monotonic() - last)
                    last = time.monotonic()

            tg.start_soon(read_b)
            await wait_for(lambda: len(gaps) >= 3)
            again = await second.resume(a.id)
            assert again.position == len(PROMPT) + 400
            stream = await second.generate(again, SamplingParams(max_tokens=5, stop_token_ids=()))
            after = [t.id async for t in stream]
        return before + after, max(gaps[1:])

    ids, worst_gap = anyio.run(main)
    assert ids == reference(model, 3, 405)
    assert worst_gap < 0.5, f"b waited {worst_gap:.2f} s for a token while a was replayed"


def test_shutdown_gives_up_on_a_journal_that_cannot_be_written(tmp_path):
    """The store's journal is gone for good while sessions generate: shutdown (`suspend_all`) retried
    the pending commit forever, so `serve` never exited and saved nothing. Now it gives up after
    `shutdown_retry_s` and suspends the sessions (their snapshots hold their state)."""
    model = text_model()

    async def main():
        store = HeldStore(tmp_path)
        engine = Engine(model, store=store)
        engine.journal.shutdown_retry_s = 0.5
        async with running(engine):
            (a,) = await prompted(engine, 3)
            stream = await engine.generate(a, SamplingParams(max_tokens=500, stop_token_ids=()))
            got = [await stream.__anext__() for _ in range(3)]
            store.held.dead = True  # the journal's disk is gone
            await wait_for(lambda: engine.stats.journal_failures >= 1)
        started = time.monotonic()
        with anyio.fail_after(30):
            saved = await engine.suspend_all()
        return a, got, saved, time.monotonic() - started, a.position

    a, got, saved, took, position = anyio.run(main)
    assert took < 5 and saved == [a.id]
    restored = model.restore(sg.DirectorySnapshotStore(tmp_path).get(a.id))
    assert restored.position == position >= len(PROMPT) + len(got)


def test_a_server_whose_journal_is_gone_still_stops(tmp_path):
    """... through `Server`: its connections' clean-up drained the journal, whose committer retried
    forever, so `serve` hung on SIGTERM until SIGKILL."""
    from streamgemma.serve.server import Server, serve_in_thread

    store = HeldStore(tmp_path)
    engine = Engine(text_model(), store=store)
    engine.journal.shutdown_retry_s = 0.5
    server = Server(engine, port=0)
    with serve_in_thread(server) as url:
        client = sg.Client.connect_sync(url)
        session = client.open(seed=1)
        session.append(PROMPT)
        tokens = session.generate(max_tokens=2000, stop_token_ids=[])
        next(tokens)
        store.held.dead = True
        deadline = time.monotonic() + 10
        while engine.stats.journal_failures < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.monotonic()
    took = time.monotonic() - started
    with contextlib.suppress(Exception):
        client.close()
    assert took < 15, f"stopping took {took:.1f} s"
    assert server.lost == [] and session.id in store.list()  # its snapshot holds its state
