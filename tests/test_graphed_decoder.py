"""`GraphedDecoder`'s own logic on the CPU: buckets, padding rows, the input
copy, and what a step returns (the soft-cap after the graph above the GEMV
batches, a copy of the graph's rows within them). The CUDA graph is replaced
by a stand-in that reruns the captured function into the same output
tensor, as a replay rewrites the graph's buffers; the kernels run under
Triton's interpreter. tests/test_gpu.py checks the real graphs on a GPU."""

import pytest
import torch
from test_kernels import random_pool

import streamgemma as sg
from streamgemma.fast import decode
from streamgemma.fast.decode import GraphedDecoder, KernelDecoder
from streamgemma.fast.fused_weights import FusedWeights

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU stand-in for CUDA graphs")


class StandInGraph:
    def __init__(self, fn, out):
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self):
        self.out.copy_(self.fn())
        self.replays += 1


class StandInEvent:
    def record(self):
        pass

    def synchronize(self):
        pass


@pytest.fixture
def cpu_graphs(monkeypatch):
    graphs = []

    def graph_of(fn):
        out = fn()
        graphs.append(StandInGraph(fn, out))
        return graphs[-1], out

    monkeypatch.setattr(decode, "graph_of", graph_of)
    monkeypatch.setattr(torch.cuda, "Event", StandInEvent)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    return graphs


def twin_decoders(seed: int):
    """Two kernel decoders over equal weights and equal (random) pools of 8 slots."""
    cfg = sg.GriffinConfig.preset("tiny")
    out = []
    for _ in range(2):
        model = sg.Model.random(cfg, seed=seed, device="cpu", dtype="float32", kernels=True)
        while model.pool.capacity < 8:
            model.pool._grow()
        random_pool(model, seed=seed + 1)
        out.append(KernelDecoder(model.network, model.pool, FusedWeights(model.network)))
    return out


@pytest.mark.parametrize("batch", [1, 3])  # bucket 1: capped in the step (GEMV); bucket 4: capped after the graph
def test_graphed_steps_equal_eager_steps_and_return_new_tensors(cpu_graphs, batch):
    graphed_dec, eager = twin_decoders(seed=11)
    graphed = GraphedDecoder(graphed_dec, buckets=(1, 4))
    bucket = 1 if batch == 1 else 4
    assert graphed_dec.caps_in_step(bucket) == (batch == 1)
    slots, positions = [5, 1, 6][:batch], [3, 40, 17][:batch]
    pad = bucket - batch
    results = []
    for tokens in ([7, 2, 9][:batch], [4, 4, 1][:batch]):
        got = graphed.step(tokens, slots, positions)
        results.append((got, got.clone()))
        want = eager.step(torch.tensor(tokens + [0] * pad), torch.tensor(slots + [-1] * pad),
                          torch.tensor(positions + [0] * pad))[:batch]
        assert got.dtype == torch.float32 and got.shape == (batch, graphed_dec.config.vocab_size)
        assert torch.equal(got, want)
        positions = [p + 1 for p in positions]
    assert len(cpu_graphs) == 1 and cpu_graphs[0].replays == 2  # one capture, then replays
    (first, first_then), _ = results
    assert torch.equal(first, first_then)  # the second step did not write into the first's logits
    for a, b in zip(graphed_dec.pool.layers, eager.pool.layers):
        for x, y in zip(a, b):
            assert torch.equal(x, y)  # live slots advanced alike, padding rows touched nothing


def test_graphed_steps_take_device_tokens_and_split_above_the_largest_bucket(cpu_graphs):
    graphed_dec, eager = twin_decoders(seed=12)
    graphed = GraphedDecoder(graphed_dec, buckets=(1, 2))
    slots, positions, tokens = [0, 3, 7], [5, 9, 2], [6, 8, 10]
    got = graphed.step(torch.tensor(tokens), slots, positions)  # pieces of 2 and 1 rows
    want = torch.cat([eager.step(torch.tensor(tokens[:2]), torch.tensor(slots[:2]), torch.tensor(positions[:2])),
                      eager.step(torch.tensor(tokens[2:]), torch.tensor(slots[2:]), torch.tensor(positions[2:]))])
    assert torch.equal(got, want)
