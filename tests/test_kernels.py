"""The Triton decode kernels against the PyTorch reference path. On a machine
without a GPU they run under Triton's interpreter (set in conftest.py), on
tiny shapes; on a GPU the same tests run compiled (and bench/ checks 2B shapes).

Inputs are fresh random values (states included, never zeros), outputs are
poisoned with NaN first so an unwritten element fails the comparison."""

import pytest
import torch

import streamgemma as sg
from conftest import random_tokens
from reference import rel_err
from streamgemma.fast_decode import KernelDecoder
from streamgemma.fused_weights import FusedWeights
from streamgemma.state import StatePool

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def dtypes():
    return [torch.float32, torch.bfloat16] if DEV == "cuda" else [torch.float32]


def random_pool(model, seed: int) -> StatePool:
    """Fill the model's pool with random state (every slot, every layer)."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.pool.layers:
        for t in layer:
            t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    return model.pool


def reference_step(model, tokens, slots, positions):
    """Griffin.forward_decode on gathered state, scattered back (the reference path)."""
    dev = model.device
    slots_t = torch.tensor(slots, device=dev)
    states = model.pool.gather(slots_t)
    logits, states = model.network.forward_decode(torch.tensor(tokens, device=dev),
                                                  torch.tensor(positions, device=dev), states)
    model.pool.scatter(slots_t, states)
    return logits


@pytest.mark.parametrize("dtype", dtypes())
def test_decode_step_matches_reference_mixed_positions_and_padding(dtype):
    cfg = sg.GriffinConfig.preset("tiny")
    ref = sg.Model.random(cfg, seed=3, device=DEV, dtype=dtype, kernels=False)
    fast = sg.Model.random(cfg, seed=3, device=DEV, dtype=dtype, kernels=True)
    slots_live = [ref.pool.allocate() for _ in range(5)]
    for m in (ref, fast):
        while m.pool.capacity < 8:
            m.pool._grow()
        random_pool(m, seed=4)
    # positions: 0 (reset), before the first wrap, exactly the window, after wraps
    positions = [0, 3, cfg.attention_window, 2 * cfg.attention_window + 5, 40]
    tokens = random_tokens(5, cfg.vocab_size, seed=5)
    want = reference_step(ref, tokens, slots_live, positions)

    decoder = KernelDecoder(fast.network, fast.pool, FusedWeights(fast.network))
    # a padding row (-1) in the middle: its output is ignored, no state may change
    slots = torch.tensor(slots_live[:2] + [-1] + slots_live[2:], device=DEV)
    pos = torch.tensor(positions[:2] + [7] + positions[2:], device=DEV)
    toks = torch.tensor(tokens[:2] + [1] + tokens[2:], device=DEV)
    out = torch.full((6, cfg.vocab_size), float("nan"), device=DEV)
    got = decoder.step(toks, slots, pos, out=out)
    got = torch.cat([got[:2], got[3:]])
    assert not torch.isnan(got).any()
    assert rel_err(got, want) < TOL[dtype]
    for (rl, fl) in zip(ref.pool.layers, fast.pool.layers):
        for rt, ft in zip(rl, fl):
            assert rel_err(ft, rt) < TOL[dtype]  # live slots updated alike, idle slots untouched


def test_sessions_with_kernels_equal_reference_across_ring_wraps():
    cfg = sg.GriffinConfig.preset("tiny")
    ref = sg.Model.random(cfg, seed=6, device=DEV, dtype="float32", kernels=False)
    fast = sg.Model.random(cfg, seed=6, device=DEV, dtype="float32", kernels=True)
    prompt = random_tokens(5, cfg.vocab_size, seed=7)
    tail = random_tokens(3 * cfg.attention_window, cfg.vocab_size, seed=8)
    rs, fs = ref.session(), fast.session()
    rs.feed(prompt)
    fs.feed(prompt)
    for t in tail:
        assert rel_err(fs.step(t), rs.step(t)) < TOL[torch.float32]


def test_kernel_decode_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(sg.DeviceError, match="TRITON_INTERPRET"):
        sg.Model.random(sg.GriffinConfig.preset("tiny"), device="cpu", kernels=True)


def test_decode_step_matches_reference_at_a_larger_batch():
    """40 rows: the RG-LRU kernel then takes 64 rows per program; every other row is idle."""
    cfg = sg.GriffinConfig.preset("tiny")
    ref = sg.Model.random(cfg, seed=5, device=DEV, dtype="float32", kernels=False)
    fast = sg.Model.random(cfg, seed=5, device=DEV, dtype="float32", kernels=True)
    for m in (ref, fast):
        while m.pool.capacity < 80:
            m.pool._grow()
        random_pool(m, seed=6)
    slots = list(range(0, 80, 2))
    positions = [(7 * i) % 50 for i in range(40)]
    tokens = random_tokens(40, cfg.vocab_size, seed=7)
    want = reference_step(ref, tokens, slots, positions)
    decoder = KernelDecoder(fast.network, fast.pool, FusedWeights(fast.network))
    as_t = lambda v: torch.tensor(v, device=DEV)  # noqa: E731
    got = decoder.step(as_t(tokens), as_t(slots), as_t(positions))
    assert rel_err(got, want) < TOL[torch.float32]
    for rl, fl in zip(ref.pool.layers, fast.pool.layers):
        for rt, ft in zip(rl, fl):
            assert rel_err(ft, rt) < TOL[torch.float32]


def test_prefill_with_kernels_equals_reference_steps_for_any_split():
    """feed() on the Triton scan + fused attention vs the reference one-token path:
    splits straddling ring wraps, starting at position 0 and mid-session."""
    cfg = sg.GriffinConfig.preset("tiny")
    ref = sg.Model.random(cfg, seed=11, device=DEV, dtype="float32", kernels=False)
    fast = sg.Model.random(cfg, seed=11, device=DEV, dtype="float32", kernels=True)
    tokens = random_tokens(5 * cfg.attention_window + 3, cfg.vocab_size, seed=12)
    rs = ref.session()
    want = torch.stack([rs.step(t) for t in tokens])
    for cuts in ([1, 9, 20], [7, 8, 16, 33], [40]):
        fs = fast.session()
        bounds = [0, *cuts, len(tokens)]
        for a, b in zip(bounds, bounds[1:]):
            got = fast.prefill(fs.slot, tokens[a:b], all_logits=True, chunk_size=6)  # chunks inside each feed
            assert rel_err(got, want[a:b]) < TOL[torch.float32]
        assert fs.position == len(tokens)
    fs = fast.session()
    got = fast.prefill(fs.slot, tokens, all_logits=True, chunk_size=11)
    assert rel_err(got, want) < TOL[torch.float32]
