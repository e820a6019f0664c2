"""The engine keeps one sampling plan while its batch is unchanged
(`sampler.SamplingPlan`, `BatchExecutor`): a long generation sampled from a
reused plan gets the ids, and leaves the random streams, of `Session.generate`,
which makes a plan per token."""

from __future__ import annotations

import anyio
import pytest
import torch
from textfixtures import text_model

from streamgemma.sampling.params import SamplingParams
from streamgemma.sampling.philox import RandomStream
from streamgemma.sampling.sampler import SampleRow, SamplingPlan, sample_rows
from streamgemma.serve.engine import Engine

KINDS = [
    dict(seed=11),
    dict(seed=12, temperature=0.0),
    dict(seed=13, temperature=0.7, top_k=8),
    dict(seed=14, temperature=1.2, top_p=0.8, min_p=0.05),
    dict(seed=15, temperature=0.0, repetition_penalty=1.3),  # a penalized greedy row
    dict(seed=16, temperature=0.9, repetition_penalty=1.2, presence_penalty=0.5),
]
TOKENS = 120


def alone(model, prompt: str, kind: dict) -> tuple[list[int], tuple[int, int]]:
    s = model.session()
    s.feed(prompt)
    ids = [t.id for t in s.generate(max_tokens=TOKENS, stop_token_ids=[], **kind)]
    rng = s.state.rng
    s.close()
    return ids, (rng.seed, rng.counter)


@pytest.mark.parametrize("host_work", ["thread", "loop"])
def test_a_long_generation_from_a_reused_plan_equals_a_plan_per_token(host_work):
    model, plain = text_model(), text_model()
    prompts = [f"prompt number {i} says hello" for i in range(len(KINDS))]
    expected = [alone(plain, p, k) for p, k in zip(prompts, KINDS)]

    async def main():
        engine = Engine(model, max_active=8, host_work=host_work)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            sessions = [await engine.open() for _ in prompts]
            for es, p in zip(sessions, prompts):
                await engine.consumed(engine.append(es, p))
            streams = [await engine.generate(es, SamplingParams(max_tokens=TOKENS, stop_token_ids=(), **k))
                       for es, k in zip(sessions, KINDS)]
            ids = []
            for stream in streams:
                ids.append([t.id async for t in stream])
            rngs = [(es.live.state.rng.seed, es.live.state.rng.counter) for es in sessions]
            tg.cancel_scope.cancel()
        return engine, ids, rngs

    engine, ids, rngs = anyio.run(main, backend="asyncio")
    assert ids == [e[0] for e in expected]
    assert rngs == [e[1] for e in expected]  # the streams advanced exactly as alone (snapshots hold them)
    # Rows join over the first ticks and leave over the last (a plan each change); in between the
    # batch holds for over 100 ticks on one plan.
    assert engine.stats.sampling_plans <= 2 * len(KINDS)
    assert engine.stats.decode_calls >= TOKENS


def test_a_plan_launched_many_times_equals_sample_rows_each_time():
    """The plan's static settings and per-launch streams and recent ids give
    sample_rows' tokens, launch after launch (here on changing logits)."""
    vocab = 300
    params = [SamplingParams(**{k: v for k, v in kind.items() if k != "seed"}) for kind in KINDS]
    plan = SamplingPlan(params, vocab, torch.device("cpu"))
    assert plan.sampled_rows == [0, 2, 3, 5] and plan.penalized_rows == [4, 5]
    streams = [RandomStream(k["seed"], 0) for k in KINDS]
    recent = [torch.randint(0, vocab + 5, (n,)) for n in (3, 9)]  # ids past the vocabulary are ignored
    twins = [RandomStream(k["seed"], 0) for k in KINDS]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        logits = torch.randn(len(params), vocab, generator=g) * 3
        got = plan.launch(logits, [streams[i].take() for i in plan.sampled_rows], recent).tolist()
        rows = [SampleRow(p, twins[i].take() if not p.greedy else None,
                          recent[plan.penalized_rows.index(i)] if i in plan.penalized_rows else None)
                for i, p in enumerate(params)]
        assert got == sample_rows(logits, rows)


def test_a_plan_refuses_logits_of_another_shape():
    plan = SamplingPlan([SamplingParams()] * 2, 10, torch.device("cpu"))
    with pytest.raises(ValueError, match="plan of 2 rows of 10"):
        plan.launch(torch.zeros(3, 10), [(1, 0)] * 3, [])
