"""The engine's batched tick: sessions generating side by side, with
different parameters and a batch that changes, get exactly the tokens of
`Session.generate` (the batched sampler itself: tests/test_sampling.py)."""

from __future__ import annotations

import anyio
import pytest
import torch
from textfixtures import text_model

from streamgemma.sampling.params import SamplingParams
from streamgemma.serve.engine import Engine

PROMPTS = ["the quick brown fox", "hello world", "stream gemma token", "café naïve über", "jumps over lazy dog",
           "123 4567 . , ! ?"]
ENGINE_KINDS = [
    dict(seed=1),
    dict(seed=2, temperature=0.0),
    dict(seed=3, temperature=0.7, top_k=8),
    dict(seed=4, temperature=1.2, top_p=0.8),
    dict(seed=5, min_p=0.1, repetition_penalty=1.3, presence_penalty=0.4),
    dict(seed=6, temperature=0.9, stop=["o"]),  # ends early: the batch shrinks mid-way
]


def reference(model, prompt: str, kind: dict, max_tokens: int) -> list[int]:
    s = model.session()
    s.feed(prompt)
    ids = [t.id for t in s.generate(max_tokens=max_tokens, stop_token_ids=[], **kind)]
    s.close()
    return ids


@pytest.mark.parametrize("host_work_in_loop", [False, True], ids=["cpu-tick", "cuda-style-tick"])
def test_engine_tokens_equal_session_generate_with_mixed_params_and_a_changing_batch(host_work_in_loop):
    """Also with the tick CUDA uses (host work on the event loop, only the
    waits in a thread), forced here on the CPU."""
    model, plain = text_model(), text_model()
    lengths = [12, 20, 7, 16, 25, 30]
    expected = [reference(plain, p, k, n) for p, k, n in zip(PROMPTS, ENGINE_KINDS, lengths)]

    on_device = []  # per decode call: were the tokens a tensor (the sampled ids, never read back first)?
    decode = model.decode

    def recording_decode(slots, tokens):
        on_device.append(isinstance(tokens, torch.Tensor))
        return decode(slots, tokens)

    model.decode = recording_decode

    async def main():
        engine = Engine(model, max_active=8, host_work="loop" if host_work_in_loop else "thread")
        got = {}
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            sessions = [await engine.open() for _ in PROMPTS]

            async def one(i, es):
                await anyio.sleep(0.002 * i)  # staggered starts: rows join a running batch
                await engine.consumed(engine.append(es, PROMPTS[i]))
                params = SamplingParams(max_tokens=lengths[i], stop_token_ids=(), **ENGINE_KINDS[i])
                got[i] = [t.id async for t in await engine.generate(es, params)]

            async with anyio.create_task_group() as gens:
                for i, es in enumerate(sessions):
                    gens.start_soon(one, i, es)
            # A session that left the batch holds its own logits row, not the batch's buffer.
            vocab = model.config.vocab_size
            for es in sessions:
                if es.live.logits is not None and es.live.logits.untyped_storage().nbytes() != 4 * vocab:
                    assert es.live.logits._base is engine.executor.kept  # only rows of the last tick's copy
            tg.cancel_scope.cancel()
        return engine, got

    engine, got = anyio.run(main, backend="asyncio")
    assert [got[i] for i in range(len(PROMPTS))] == expected
    assert engine.stats.decode_calls < sum(lengths)  # rows did share decode calls
    assert len(expected[5]) < lengths[5]  # the stop string did end one early
    # The CUDA arrangement queues each decode on the sampled ids where they are;
    # the CPU's samples and decodes in one worker call, with host ids.
    assert any(on_device) if host_work_in_loop else not any(on_device)


def test_engine_continues_exactly_after_a_session_leaves_and_rejoins():
    """A generating session that gets input sits out ticks (its row leaves
    the batch) and then rejoins: tokens as a plain session that fed the same."""
    model, plain = text_model(), text_model()
    s = plain.session()
    s.feed(PROMPTS[0])
    first = [t.id for t in s.generate(max_tokens=5, seed=11, stop_token_ids=[])]
    s.feed(" hello")
    second = [t.id for t in s.generate(max_tokens=6, stop_token_ids=[])]

    async def main():
        engine = Engine(model, max_active=4)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            es, other = await engine.open(), await engine.open()
            await engine.consumed(engine.append(other, PROMPTS[1]))
            background = await engine.generate(other, SamplingParams(max_tokens=4000, stop_token_ids=()))
            await background.__anext__()
            await engine.consumed(engine.append(es, PROMPTS[0]))
            a = [t.id async for t in await engine.generate(es, SamplingParams(max_tokens=5, seed=11,
                                                                              stop_token_ids=()))]
            await engine.consumed(engine.append(es, " hello"))
            b = [t.id async for t in await engine.generate(es, SamplingParams(max_tokens=6, stop_token_ids=()))]
            await background.aclose()
            tg.cancel_scope.cancel()
        return a, b

    assert anyio.run(main, backend="asyncio") == (first, second)


def test_short_input_rides_along_in_decode_rows_and_long_input_is_prefilled():
    """While others generate, input of at most step_input_tokens is consumed
    one token per tick as extra decode rows (no prefill call), exactly as
    `Session.step` would; longer input goes through prefill chunks."""
    model, plain = text_model(), text_model()
    short = model.tokenizer.encode(" hello there", add_bos=False)
    long = model.tokenizer.encode(" and a much longer line of transcript text that keeps going on", add_bos=False)
    assert len(short) <= 4 < len(long)
    s = plain.session()
    s.feed(PROMPTS[0])
    for t in short:
        s.step(t)
    expected = [t.id for t in s.generate(max_tokens=6, seed=5, stop_token_ids=[])]

    async def main():
        engine = Engine(model, max_active=4, step_input_tokens=4)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            es, other = await engine.open(), await engine.open()
            await engine.consumed(engine.append(other, PROMPTS[1]))
            await engine.consumed(engine.append(es, PROMPTS[0]))
            background = await engine.generate(other, SamplingParams(max_tokens=4000, stop_token_ids=()))
            await background.__anext__()
            prefills, rows = engine.stats.prefill_calls, engine.stats.decoded_input_tokens
            position = await engine.consumed(engine.append(es, short))
            assert (engine.stats.prefill_calls, engine.stats.decoded_input_tokens) == (prefills, rows + len(short))
            assert position == es.position
            got = [t.id async for t in await engine.generate(es, SamplingParams(max_tokens=6, seed=5,
                                                                                stop_token_ids=()))]
            prefills = engine.stats.prefill_calls
            await engine.consumed(engine.append(es, long))
            assert engine.stats.prefill_calls > prefills  # too long to ride along
            await background.aclose()
            tg.cancel_scope.cancel()
        return got

    assert anyio.run(main, backend="asyncio") == expected


def test_engine_rejects_a_negative_step_input_tokens():
    with pytest.raises(ValueError, match="step_input_tokens"):
        Engine(text_model(), step_input_tokens=-1)


@pytest.mark.parametrize("host_work_in_loop", [False, True], ids=["cpu-tick", "cuda-style-tick"])
def test_short_input_on_an_idle_engine_is_consumed_in_decode_rows(host_work_in_loop):
    """With nobody generating, input of at most idle_step_input_tokens is
    consumed one token per tick in a decode of input rows only, batched
    across sessions: what `Session.step` gives (bit for bit in a batch of
    one; in a larger batch the CPU's matmuls may round the last bits
    differently, as for generation rows: the same tokens follow), and what
    `Session.feed` gives up to rounding. A suspended session with such input
    is restored and rides along. Nothing is prefilled."""
    model, plain = text_model(), text_model()
    tails = [model.tokenizer.encode(t, add_bos=False)[:3] for t in (" hello there world", " the lazy dog jumps")]
    assert all(len(t) == 3 for t in tails)
    expected_logits, expected_ids = [], []
    for prompt, tail in zip(PROMPTS, tails):
        s = plain.session()
        s.feed(prompt)
        fed = s.fork()
        for t in tail:
            s.step(t)
        assert torch.allclose(s.logits, fed.feed(tail), atol=1e-5)
        expected_logits.append(s.logits.clone())
        expected_ids.append([t.id for t in s.generate(max_tokens=5, seed=9, stop_token_ids=[])])

    async def main():
        engine = Engine(model, max_active=2, idle_step_input_tokens=4,
                        host_work="loop" if host_work_in_loop else "thread")
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            a, b = await engine.open(), await engine.open()
            for es, prompt in zip((a, b), PROMPTS):
                await engine.consumed(engine.append(es, prompt))
            counts = engine.stats.prefill_calls, engine.stats.decode_calls, engine.stats.decoded_input_tokens
            await engine.consumed(engine.append(a, tails[0]))  # alone: three decodes of one row
            assert (engine.stats.prefill_calls, engine.stats.decode_calls, engine.stats.decoded_input_tokens) == \
                (counts[0], counts[1] + 3, counts[2] + 3)
            logits = [a.live.logits.clone()]
            third = await engine.open()  # suspends b, the least recently used
            assert b.live is None
            counts = engine.stats.prefill_calls, engine.stats.decode_calls, engine.stats.resumptions
            # b is restored by the tick (a is suspended for it), then rides along with third.
            pending = [engine.append(b, tails[1]), engine.append(third, tails[0][:2])]
            for p in pending:
                await engine.consumed(p)
            assert (engine.stats.prefill_calls, engine.stats.decode_calls, engine.stats.resumptions) == \
                (counts[0], counts[1] + 3, counts[2] + 1)
            logits.append(b.live.logits.clone())
            await engine.close(third)
            ids = []
            for es in (a, b):
                stream = await engine.generate(es, SamplingParams(max_tokens=5, seed=9, stop_token_ids=()))
                ids.append([t.id async for t in stream])
            tg.cancel_scope.cancel()
        return logits, ids

    logits, ids = anyio.run(main, backend="asyncio")
    assert torch.equal(logits[0], expected_logits[0])  # batches of one row: bit for bit
    assert torch.allclose(logits[1], expected_logits[1], atol=1e-5)
    assert ids == expected_ids


def test_idle_step_input_tokens_defaults_by_device():
    model = text_model()
    assert Engine(model).scheduler.idle_step_input_tokens == 1  # CPU: a decode row costs what a prefill does
    assert Engine(model, idle_step_input_tokens=0).scheduler.idle_step_input_tokens == 0
    with pytest.raises(ValueError, match="idle_step_input_tokens"):
        Engine(model, idle_step_input_tokens=-1)


@pytest.mark.parametrize("host_work_in_loop,when", [(False, "before"), (True, "before"), (True, "after")],
                         ids=["cpu-tick-before-the-call", "cuda-style-before-the-call", "cuda-style-after-the-launch"])
def test_a_cancellation_during_a_tick_never_splits_a_step_from_its_books(host_work_in_loop, when):
    """Shutdown cancels the scheduler at any await of a tick (a cancellation
    requested while the tick waits for a prefill's thread or the model lock
    fires at its next checkpoint). A step whose decode was launched must still
    have its token recorded and delivered (position, recent ids, random
    stream and the stream of tokens agree); a step not started must leave the
    session untouched."""
    model = text_model()

    async def main():
        engine = Engine(model, max_active=2, host_work="loop" if host_work_in_loop else "thread")
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            es = await engine.open()
            await engine.consumed(engine.append(es, "hello world"))
            stream = await engine.generate(es, SamplingParams(max_tokens=50, seed=3, stop_token_ids=()))
            async for _ in stream:
                break  # the generation is under way
            if when == "before":
                decode = engine.executor.run

                async def cancel_then_decode(*args):
                    tg.cancel_scope.cancel()
                    return await decode(*args)

                engine.executor.run = cancel_then_decode
            else:
                launch = engine.executor.launch_decode

                def launch_then_cancel(*args):
                    launch(*args)
                    tg.cancel_scope.cancel()

                engine.executor.launch_decode = launch_then_cancel
            state = (es.live.state.rng.copy(), es.live.position, stream.queued)
        return es, stream, state

    es, stream, (rng, position, queued) = anyio.run(main, backend="asyncio")
    s = es.live
    assert s.state.recent.count == s.position  # every consumed token is in the session's books
    if when == "after":  # the step ran: one more token consumed, recorded and delivered
        assert (s.position, stream.queued, s.state.rng.counter) == (position + 1, queued + 1, rng.counter + 1)
    else:  # cancelled before any work: nothing moved
        assert (s.position, stream.queued, s.state.rng) == (position, queued, rng)


def test_closing_an_ended_generations_stream_leaves_the_next_generation_alone():
    """A stream closed after its generation ended (without reading its end) must not cancel a later
    generation of the same session: its cancel belongs to its own generation."""
    model = text_model()

    async def main():
        engine = Engine(model, max_active=2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            es = await engine.open()
            await engine.consumed(engine.append(es, PROMPTS[0]))
            first = await engine.generate(es, SamplingParams(max_tokens=2, stop_token_ids=(), seed=1))
            with anyio.fail_after(30):
                while es.generation is not None:  # it ends at a tick; nobody reads it
                    await anyio.sleep(0.01)
            second = await engine.generate(es, SamplingParams(max_tokens=6, stop_token_ids=(), seed=2))
            await first.aclose()
            tokens = [t async for t in second]
            tg.cancel_scope.cancel()
        return tokens, second.done

    tokens, done = anyio.run(main, backend="asyncio")
    assert len(tokens) == 6 and done.reason == "length"
