"""Batched sampling and the engine's tick: a row sampled in a batch gets
exactly the token (and leaves its generator in exactly the state) that it
gets alone, so engine generations equal `Session.generate`."""

from __future__ import annotations

import random

import anyio
import pytest
import torch

from streamgemma.engine import Engine
from streamgemma.sampling import SampleRow, SamplingParams, sample, sample_rows
from textfixtures import text_model

KINDS = (
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=5),
    dict(temperature=1.0, top_k=1),
    dict(temperature=0.8, top_p=0.9),
    dict(temperature=1.0, top_p=0.5, top_k=20),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.9, min_p=0.05, top_p=0.95),
    dict(temperature=1.0, repetition_penalty=1.5),
    dict(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5),
    dict(temperature=0.6, presence_penalty=1.0, top_k=30),
    dict(temperature=1.0, repetition_penalty=0.8, min_p=0.02),
)


def make_rows(batch: int, vocab: int, seed: int):
    """Params, seeds and recent ids for `batch` rows, a random mix of KINDS."""
    rng = random.Random(seed)
    specs = []
    for i in range(batch):
        kind = rng.choice(KINDS)
        recent = torch.tensor([rng.randrange(vocab + 40) for _ in range(rng.randrange(0, 60))], dtype=torch.int64)
        specs.append((SamplingParams(**kind), 1000 * seed + i, recent))
    return specs


def rows_of(specs, generators):
    out = []
    for (params, _, recent), g in zip(specs, generators):
        penalized = params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
        out.append(SampleRow(params, g, recent if penalized else None))
    return out


@pytest.mark.parametrize("batch", [1, 2, 5, 16, 33])
@pytest.mark.parametrize("vocab", [97, 512, 1001])
def test_batched_rows_equal_single_rows(batch, vocab):
    specs = make_rows(batch, vocab, seed=batch * 7 + vocab)
    logits = torch.randn(batch, vocab + 9, generator=torch.Generator().manual_seed(vocab)) * 4
    logits = logits[:, :vocab]  # a column-sliced view, as the engine passes with spare vocabulary rows
    together = [torch.Generator().manual_seed(s) for _, s, _ in specs]
    alone = [torch.Generator().manual_seed(s) for _, s, _ in specs]
    for step in range(3):  # the generators' streams continue identically
        batched = sample_rows(logits, rows_of(specs, together))
        single = [sample_rows(logits[i:i + 1].contiguous(), rows_of(specs[i:i + 1], alone[i:i + 1]))[0]
                  for i in range(batch)]
        assert batched == single, f"step {step}"
        for i, (a, b) in enumerate(zip(together, alone)):
            assert torch.equal(a.get_state(), b.get_state()), f"row {i} generator state, step {step}"
        logits = logits.roll(1, dims=1)


def test_batched_rows_equal_single_rows_with_threads():
    """Several CPU threads split elementwise ops at places that depend on the
    batch: the tokens must not."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        test_batched_rows_equal_single_rows(24, 4099)
    finally:
        torch.set_num_threads(before)


def test_sample_is_one_row_of_sample_rows():
    logits = torch.randn(300, generator=torch.Generator().manual_seed(3))
    for kind in KINDS:
        params = SamplingParams(**kind)
        a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        assert sample(logits, params, a).item() == sample_rows(logits[None], [SampleRow(params, b)])[0]
        assert torch.equal(a.get_state(), b.get_state())


def test_greedy_rows_draw_nothing_from_their_generator():
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    logits = torch.randn(4, 50)
    assert sample_rows(logits, [SampleRow(SamplingParams(temperature=0), g)] * 4) == logits.argmax(-1).tolist()
    assert torch.equal(g.get_state(), state)


def test_penalties_in_a_batch_touch_only_their_row():
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0]])
    greedy = SamplingParams(temperature=0)
    penalized = SamplingParams(temperature=0, repetition_penalty=2.0)
    rows = [SampleRow(penalized, None, torch.tensor([0, 0, 7])), SampleRow(greedy)]  # 7: outside V, ignored
    assert sample_rows(logits, rows) == [1, 0]


def test_min_p_keeps_tokens_at_least_min_p_times_the_top_one():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    rows = [SampleRow(SamplingParams(min_p=0.2), g)] * 8
    seen = {t for _ in range(100) for t in sample_rows(logits.expand(8, 4), rows)}
    assert seen == {0, 1, 2}  # 0.05 < 0.2 x 0.5


# -- engine ------------------------------------------------------------------------------
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


def test_engine_tokens_equal_session_generate_with_mixed_params_and_a_changing_batch():
    model, plain = text_model(), text_model()
    lengths = [12, 20, 7, 16, 25, 30]
    expected = [reference(plain, p, k, n) for p, k, n in zip(PROMPTS, ENGINE_KINDS, lengths)]

    async def main():
        engine = Engine(model, max_active=8)
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
                if es.live._logits is not None and es.live._logits.untyped_storage().nbytes() != 4 * vocab:
                    assert es.live._logits._base is engine._kept  # only rows of the last tick's copy
            tg.cancel_scope.cancel()
        return engine, got

    engine, got = anyio.run(main, backend="asyncio")
    assert [got[i] for i in range(len(PROMPTS))] == expected
    assert engine.decode_calls < sum(lengths)  # rows did share decode calls
    assert len(expected[5]) < lengths[5]  # the stop string did end one early


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


def test_a_scaled_row_gets_the_same_token_beside_filtered_rows():
    """Unfiltered rows with temperature != 1 take a shorter path when no row of
    the batch has a filter: the token must not depend on that."""
    logits = torch.randn(3, 700, generator=torch.Generator().manual_seed(9)) * 5
    plain = SamplingParams(temperature=0.7)
    for neighbour in (SamplingParams(temperature=0.7, top_k=3), SamplingParams(min_p=0.3), SamplingParams()):
        for seed in range(20):
            alone = sample_rows(logits[:1], [SampleRow(plain, torch.Generator().manual_seed(seed))])
            rows = [SampleRow(plain, torch.Generator().manual_seed(seed)),
                    SampleRow(neighbour, torch.Generator().manual_seed(1)),
                    SampleRow(SamplingParams(temperature=0), None)]
            assert sample_rows(logits, rows)[0] == alone[0]
