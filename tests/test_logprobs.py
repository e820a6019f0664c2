"""Token log-probabilities (opt-in): their definition (the distribution the
token was drawn from: penalties, temperature, filters), the same values
alone and in the engine's batches, over the websocket protocol, and nothing
at all when not asked for."""

from __future__ import annotations

import math

import anyio
import pytest
import torch

import streamgemma as sg
from streamgemma.sampling.logprobs import score_rows
from streamgemma.sampling.sampler import SampleRow
from streamgemma.serve.engine import Engine
from streamgemma.serve.server import Server, serve_in_thread

PROMPT = [2, 17, 99, 5, 42, 7]


@pytest.fixture(scope="module")
def model():
    return sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0, device="cpu", dtype="float32")


def replay(model, tokens):
    """The logits each token was sampled from, by stepping a fresh session through them."""
    s = model.session()
    logits = [s.feed(PROMPT).clone()]
    for t in tokens[:-1]:
        logits.append(s.step(t.id).clone())
    return logits


def test_sampled_logprobs_follow_temperature_and_top_k(model):
    s = model.session(seed=3)
    s.feed(PROMPT)
    tokens = list(s.generate(max_tokens=6, temperature=0.7, top_k=5, logprobs=8, stop_token_ids=[]))
    for tok, logits in zip(tokens, replay(model, tokens)):
        x = logits / 0.7
        kth = x.topk(5).values[-1]
        expected = torch.log_softmax(x.masked_fill(x < kth, -math.inf), -1)
        assert tok.logprob == pytest.approx(expected[tok.id].item(), rel=1e-5, abs=1e-6)
        assert len(tok.top_logprobs) == 5  # the filter keeps 5: the 3 others are not listed
        assert [i for i, _ in tok.top_logprobs] == expected.topk(5).indices.tolist()
        assert sum(math.exp(lp) for _, lp in tok.top_logprobs) == pytest.approx(1.0, rel=1e-5)


def test_greedy_logprobs_with_a_penalty(model):
    s = model.session()
    s.feed(PROMPT)
    tokens = list(s.generate(max_tokens=4, temperature=0, repetition_penalty=1.3, logprobs=1, stop_token_ids=[]))
    history = list(PROMPT)
    for tok, logits in zip(tokens, replay(model, tokens)):
        x = logits.clone()
        seen = torch.tensor(sorted(set(history)))
        x[seen] = torch.where(x[seen] > 0, x[seen] / 1.3, x[seen] * 1.3)
        expected = torch.log_softmax(x, -1)
        assert tok.id == int(x.argmax())
        assert tok.logprob == pytest.approx(expected[tok.id].item(), rel=1e-5, abs=1e-6)
        assert tok.top_logprobs == ((tok.id, tok.logprob),)
        history.append(tok.id)


def test_off_means_no_work_and_no_fields(model):
    s = model.session(seed=1)
    s.feed(PROMPT)
    assert all(t.logprob is None and t.top_logprobs is None for t in s.generate(max_tokens=3))
    logits = torch.zeros(2, model.config.vocab_size)
    rows = [SampleRow(sg.SamplingParams(temperature=0))] * 2
    assert score_rows(logits, torch.zeros(2, dtype=torch.int64), rows) is None
    with pytest.raises(ValueError, match="logprobs"):
        sg.SamplingParams(logprobs=21)


@pytest.mark.parametrize("coalesce, host_work", [(True, "thread"), (False, "thread"), (True, "loop")])
def test_the_engine_and_the_websocket_give_the_same_logprobs_as_a_session(model, coalesce, host_work):
    settings = dict(max_tokens=5, temperature=0.9, top_p=0.9, seed=11, logprobs=3, stop_token_ids=[])
    alone = model.session()
    alone.feed(PROMPT)
    expected = list(alone.generate(**settings))

    async def main(url):
        async with sg.Client(url, coalesce=coalesce) as client:
            sessions = [await client.open() for _ in range(3)]
            for s in sessions:
                await s.append(PROMPT)
            results = []

            async def run(s):
                results.append([t async for t in s.generate(**settings)])

            async with anyio.create_task_group() as tg:
                for s in sessions:
                    tg.start_soon(run, s)
            return results

    with serve_in_thread(Server(Engine(model, max_active=4, host_work=host_work), port=0)) as url:
        results = anyio.run(main, url, backend="asyncio")
    for got in results:
        assert [t.id for t in got] == [t.id for t in expected]
        assert [t.logprob for t in got] == pytest.approx([t.logprob for t in expected], rel=1e-5)
        assert [[i for i, _ in t.top_logprobs] for t in got] == [[i for i, _ in t.top_logprobs] for t in expected]


def test_the_protocol_refuses_out_of_range_logprobs(model):
    async def main(url):
        async with sg.Client(url) as client:
            s = await client.open()
            await s.append(PROMPT)
            with pytest.raises(sg.ServerError, match="invalid: generate: logprobs must be in"):
                async for _ in s.generate(max_tokens=2, logprobs=99):
                    pass

    with serve_in_thread(Server(Engine(model, max_active=2), port=0)) as url:
        anyio.run(main, url, backend="asyncio")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_logprobs_match_the_definition_alone_and_batched():
    model = sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0, device="cuda", dtype="float32")
    s = model.session()
    s.feed(PROMPT)
    tokens = list(s.generate(max_tokens=6, temperature=0.7, top_k=5, seed=2, logprobs=4, stop_token_ids=[]))
    for tok, logits in zip(tokens, replay(model, tokens)):
        x = logits.float().cpu() / 0.7
        expected = torch.log_softmax(x.masked_fill(x < x.topk(5).values[-1], -math.inf), -1)
        assert tok.logprob == pytest.approx(expected[tok.id].item(), rel=1e-4, abs=1e-5)

    async def main(url):
        async with sg.Client(url) as client:
            session = await client.open()
            await session.append(PROMPT)
            return [t async for t in session.generate(max_tokens=6, temperature=0.7, top_k=5, seed=2, logprobs=4,
                                                      stop_token_ids=[])]

    with serve_in_thread(Server(Engine(model, max_active=4), port=0)) as url:
        served = anyio.run(main, url, backend="asyncio")
    assert [t.id for t in served] == [t.id for t in tokens]
    assert [t.logprob for t in served] == pytest.approx([t.logprob for t in tokens], rel=1e-4, abs=1e-5)
