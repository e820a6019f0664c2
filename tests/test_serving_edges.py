"""The engine's input turns and limits at their edges: restore turns that kept two sessions swapping slots, one
session holding the whole queued-text pool, the mean batch size of /metrics, restores for a client's generate or
capture outside the input share (each found by a review)."""

from __future__ import annotations

import time

import anyio
import pytest
from textfixtures import text_model

import streamgemma as sg
from streamgemma.serve.engine import Engine


def test_sessions_swapping_the_last_slot_do_not_starve_a_long_append():
    """Every slot busy; A and B keep short input queued (a live transcript's appends), so each tick restores one
    of them into the free slot, suspending the other. A restore turn left the restored session at the head of
    the input turns, so L's long append, queued after theirs, never got a turn."""
    async def main():
        engine = Engine(text_model(), max_active=2, input_share=1.0, journal=False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            g = await engine.open(seed=0)
            await engine.consumed(engine.append(g, [2, 5, 6]))
            await engine.generate(g, sg.SamplingParams(max_tokens=100000, stop_token_ids=[]))
            a, b, long = await engine.open(seed=1), await engine.open(seed=2), await engine.open(seed=3)

            async def transcript(es):
                while True:
                    if es.queued_tokens < 8:
                        engine.append(es, [7] * 8)
                    await anyio.sleep(0.001)

            engine.append(a, [7] * 8)
            engine.append(b, [7] * 8)
            tg.start_soon(transcript, a)
            tg.start_soon(transcript, b)
            with anyio.fail_after(20):
                await engine.consumed(engine.append(long, [9] * 100))
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_one_session_cannot_hold_the_whole_queued_text_pool():
    """A long text reserves one token of its session's budget until it is tokenized, so one session could queue
    text until the server's pool was full, and every other session's text over 1 KiB was refused."""
    from streamgemma.serve.record import EngineError, SessionRecord

    engine = Engine(text_model(), max_active=4, journal=False, max_queued_text_bytes=60 * 1024)
    hog, other = SessionRecord("hog", None, 0), SessionRecord("other", None, 0)
    engine.sessions.update(hog=hog, other=other)  # (not run: appends stay queued)
    text = "hello world " * 512  # 6 KiB: tokenized in an input turn, not as it is appended
    queued = 0
    try:
        while True:
            engine.append(hog, text)
            queued += 1
    except EngineError as e:
        assert e.code == "limit" and "this session's text" in str(e)
    assert queued == 2  # up to a quarter of the pool
    engine.append(other, "quick brown fox " * 100)  # (refused before)
    big = engine.sessions["big"] = SessionRecord("big", None, 0)
    engine.append(big, "x" * (40 * 1024))  # one text of any size the pool has room for
    assert big.queued_text_bytes == 40 * 1024


@pytest.mark.parametrize("request_kind", ["generate", "capture"])
def test_a_restore_for_a_generate_or_capture_is_input_work(request_kind):
    """A tick's restore counts against the input share; the one a client's generate or capture of a suspended
    session needs did not (nor waited for its turn), so such requests could take the device from the sessions
    generating for as long as they kept coming."""
    async def main():
        engine = Engine(text_model(), max_active=2, journal=False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            suspended = await engine.open(seed=1)
            await engine.consumed(engine.append(suspended, [2, 5]))
            await engine.open(seed=2)
            g = await engine.open(seed=0)  # the least recently used one makes room: suspended
            await engine.consumed(engine.append(g, [2, 5, 6]))
            await engine.generate(g, sg.SamplingParams(max_tokens=100000, stop_token_ids=[]))
            assert suspended.live is None
            budget = engine.scheduler.budget
            budget.next_turn_at = time.monotonic() + 0.5  # the input share is spent for the next half second

            async def request():
                if request_kind == "generate":
                    await engine.generate(suspended, sg.SamplingParams(max_tokens=1))
                else:
                    await engine.capture(suspended)

            started = time.monotonic()
            charged_from = budget.next_turn_at
            await request()
            waited = time.monotonic() - started
            tg.cancel_scope.cancel()
        return waited, budget.next_turn_at > charged_from

    waited, charged = anyio.run(main)
    assert waited >= 0.4 and charged


def test_an_append_that_landed_in_part_waits_for_a_slot_instead_of_failing():
    """Its first chunk was consumed, then every slot was taken by a generation: the append failed with
    "capacity" although part of it was in the session, so a client's retry would feed that part twice."""
    from streamgemma.sampling.params import SamplingParams

    async def main():
        engine = Engine(text_model(), max_active=1, input_chunk=8, step_input_tokens=0, idle_step_input_tokens=0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            a, b = await engine.open(seed=1), await engine.open(seed=2)
            await engine.consumed(engine.append(b, [2, 5, 6]))
            pending = engine.append(a, list(range(10, 110)))  # 13 chunks of 8
            with anyio.fail_after(10):
                while a.position < 8:
                    await anyio.sleep(0)
            await engine.generate(b, SamplingParams(max_tokens=20, stop_token_ids=()))  # takes a's slot
            with anyio.fail_after(30):
                position = await engine.consumed(pending)  # (EngineError "capacity" before, at position 8)
            tg.cancel_scope.cancel()
        return position

    assert anyio.run(main) == 100


def test_no_more_sessions_than_max_active_hold_a_slot_while_one_is_being_opened(tmp_path):
    """A generate restored its session while another being opened (its first snapshot being written) held the
    last slot: past max_active, and three rows decoded together with max_active 2."""
    import threading

    from streamgemma.sampling.params import SamplingParams

    writing = threading.Event()

    class SlowStore(sg.DirectorySnapshotStore):
        def put(self, session_id, blob):
            if writing.is_set():
                time.sleep(0.3)
            super().put(session_id, blob)

    async def main():
        engine = Engine(text_model(), max_active=2, store=SlowStore(tmp_path))
        most = 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            c = await engine.open(seed=3)
            await engine.consumed(engine.append(c, [2, 7, 8]))
            a = await engine.open(seed=1)
            await engine.consumed(engine.append(a, [2, 5, 6]))
            await engine.generate(a, SamplingParams(max_tokens=3000, stop_token_ids=()))
            writing.set()
            tg.start_soon(engine.open)  # suspends c, holds the slot while its snapshot is written
            await anyio.sleep(0.1)

            async def watch():
                nonlocal most
                while True:
                    most = max(most, engine.active)
                    await anyio.sleep(0.005)

            tg.start_soon(watch)
            await engine.generate(c, SamplingParams(max_tokens=5, stop_token_ids=()))  # waits for the open
            await anyio.sleep(1.0)  # (c's suspension is written first, then the open's snapshot)
            writing.clear()
            tg.cancel_scope.cancel()
        return most

    assert anyio.run(main) <= 2


@pytest.mark.parametrize("second", ["short text", "long text"])
def test_text_queued_behind_a_failed_first_input_begins_with_bos(second):
    """Whether text starts with BOS was decided when it was appended: behind a first input that then failed,
    a session's first text was consumed at position 0 without one."""
    from streamgemma.serve.inputs import INLINE_TEXT_BYTES, InputQueues
    from streamgemma.serve.record import EngineError, SessionRecord

    tokenizer = sg.load("demo").tokenizer
    inputs = InputQueues(tokenizer, tokenizer.vocab_size)
    es = SessionRecord("s", None, 0)
    inputs.add(es, [5, 6])  # ids: taken as they are, no BOS
    text = "hello there" if second == "short text" else "hello there " * (INLINE_TEXT_BYTES // 8)
    pending = inputs.add(es, text)
    inputs.fail_first(es, EngineError("capacity", "no slot"))
    if pending.ids is None:
        inputs.tokenized(es, pending, inputs.tokenize(pending))
    assert pending.ids[0] == tokenizer.bos_id and list(pending.ids[1:]) == tokenizer.encode(text)
    assert es.queued_tokens == inputs.tokens == len(pending.ids)


def test_closing_a_stream_from_another_task_ends_its_reader():
    """The reader waited for an item forever: once the stream was closed, nothing more was queued."""
    from streamgemma.sampling.params import SamplingParams

    async def main():
        engine = Engine(text_model(), max_active=2, journal=False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            es = await engine.open(seed=1)
            await engine.consumed(engine.append(es, [2, 5, 6]))
            stream = await engine.generate(es, SamplingParams(max_tokens=100000, stop_token_ids=()))
            read = []

            async def reader():
                async for token in stream:
                    read.append(token)

            with anyio.fail_after(10):
                async with anyio.create_task_group() as readers:
                    readers.start_soon(reader)
                    while not read:
                        await anyio.sleep(0.001)
                    await stream.aclose()
            tg.cancel_scope.cancel()
        return es.generation is None or es.generation.cancelled

    assert anyio.run(main)  # the reader ended, the generation is cancelled


def test_a_request_waiting_for_an_open_does_not_restore_over_a_session_restored_or_closed_meanwhile(tmp_path):
    """While a capture or generate waited for a session being opened (the model lock released), a tick restored
    the session and fed it acknowledged input, or a close ended it; the request then restored it again from its
    suspension, over the newer state (the input lost), or brought the closed session back into a slot."""
    import threading

    from streamgemma.sampling.params import SamplingParams
    from streamgemma.serve.record import EngineError

    gate = threading.Event()
    gate.set()

    class GatedStore(sg.DirectorySnapshotStore):
        def put(self, session_id, blob):
            assert gate.wait(10)
            super().put(session_id, blob)

    async def main(request_kind):
        engine = Engine(text_model(), max_active=3, store=GatedStore(tmp_path / request_kind))
        out = {}
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            c = await engine.open(seed=3)
            await engine.consumed(engine.append(c, [2, 7, 8]))
            a, b = await engine.open(seed=1), await engine.open(seed=2)
            for es in (a, b):
                await engine.consumed(engine.append(es, [2, 5, 6]))
                await engine.generate(es, SamplingParams(max_tokens=3000, stop_token_ids=()))
            gate.clear()
            tg.start_soon(engine.open)  # c is suspended; the open holds the last slot while its write waits
            while c.live is not None:
                await anyio.sleep(0.01)

            async def request():
                try:
                    out["captured"] = (await engine.capture(c)).position
                except EngineError as e:
                    out["error"] = e.code

            tg.start_soon(request)
            await anyio.sleep(0.2)  # the request waits for the open
            await engine.close(a, delete=False)
            await engine.close(b, delete=False)
            if request_kind == "restored":
                out["consumed"] = await engine.consumed(engine.append(c, [11, 12, 13, 14]))
            else:
                await engine.close(c, delete=False)
            gate.set()
            with anyio.fail_after(10):
                while not ("captured" in out or "error" in out):
                    await anyio.sleep(0.01)
            out["position"], out["live"] = c.position, c.live is not None
            tg.cancel_scope.cancel()
        return out

    restored = anyio.run(main, "restored")
    assert restored["consumed"] == restored["position"] == restored["captured"] == 7, restored
    closed = anyio.run(main, "closed")
    assert closed["error"] == "closed" and not closed["live"], closed
