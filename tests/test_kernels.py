"""The Triton decode kernels against the PyTorch reference path. On a machine
without a GPU they run under Triton's interpreter (set in conftest.py), on
tiny shapes; on a GPU the same tests run compiled (and bench/ checks 2B shapes).

Inputs are fresh random values (states included, never zeros), outputs are
poisoned with NaN first so an unwritten element fails the comparison."""

import pytest
import torch
from conftest import random_tokens
from reference import conv1d_step_ref, rel_err

import streamgemma as sg
from streamgemma.fast.decode import KernelDecoder
from streamgemma.fast.fused_weights import FusedWeights
from streamgemma.model.pool import StatePool

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


@pytest.mark.parametrize("path", ["gemv", "matmul"])
@pytest.mark.parametrize("dtype", dtypes())
def test_decode_step_matches_reference_mixed_positions_and_padding(dtype, path):
    """Six rows: the fused small-batch GEMV path and the matmul path (larger batches)."""
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
    decoder.gemv_max_batch = 8 if path == "gemv" else 0
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


@pytest.mark.slow
def test_sessions_with_kernels_equal_reference_across_ring_wraps():
    cfg = sg.GriffinConfig.preset("tiny")
    ref = sg.Model.random(cfg, seed=6, device=DEV, dtype="float32", kernels=False)
    fast = sg.Model.random(cfg, seed=6, device=DEV, dtype="float32", kernels=True)
    prompt = random_tokens(5, cfg.vocab_size, seed=7)
    tail = random_tokens(2 * cfg.attention_window + 3, cfg.vocab_size, seed=8)  # past two wraps
    rs, fs = ref.session(), fast.session()
    rs.feed(prompt)
    fs.feed(prompt)
    for t in tail:
        assert rel_err(fs.step(t), rs.step(t)) < TOL[torch.float32]


def test_kernel_decode_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(sg.DeviceError, match="TRITON_INTERPRET"):
        sg.Model.random(sg.GriffinConfig.preset("tiny"), device="cpu", kernels=True)


def _check_step_against_reference(cfg, seed: int, capacity: int, slots: list[int], positions: list[int],
                                  kernel_config=None):
    """Random pools of `capacity` slots in two models with the same weights; one
    KernelDecoder step on the given rows vs the reference step: logits and every
    slot's state (rows not decoded must be untouched)."""
    ref = sg.Model.random(cfg, seed=seed, device=DEV, dtype="float32", kernels=False)
    fast = sg.Model.random(cfg, seed=seed, device=DEV, dtype="float32", kernels=True)
    for m in (ref, fast):
        while m.pool.capacity < capacity:
            m.pool._grow()
        random_pool(m, seed=seed + 1)
    tokens = random_tokens(len(slots), cfg.vocab_size, seed=seed + 2)
    want = reference_step(ref, tokens, slots, positions)
    decoder = KernelDecoder(fast.network, fast.pool, FusedWeights(fast.network), kernel_config)
    as_t = lambda v: torch.tensor(v, device=DEV)  # noqa: E731
    got = decoder.step(as_t(tokens), as_t(slots), as_t(positions))
    assert rel_err(got, want) < TOL[torch.float32]
    for rl, fl in zip(ref.pool.layers, fast.pool.layers):
        for rt, ft in zip(rl, fl):
            assert rel_err(ft, rt) < TOL[torch.float32]


@pytest.mark.slow
def test_decode_step_matches_reference_at_a_larger_batch():
    """40 rows: the RG-LRU kernel then takes 64 rows per program; every other row is idle."""
    _check_step_against_reference(sg.GriffinConfig.preset("tiny"), seed=5, capacity=80,
                                  slots=list(range(0, 80, 2)), positions=[(7 * i) % 50 for i in range(40)])


@pytest.mark.parametrize("batch", [1, 3])
def test_attention_splits_of_several_key_tiles_match_reference(monkeypatch, batch):
    """At large batches a split of the ring holds several key tiles, scanned in a
    loop after the wait (one-tile splits request theirs before it). Tiny shapes
    need a longer window, 16-key tiles and few splits for that: 2 splits of 32."""
    import dataclasses

    from streamgemma.fast.tuning import KernelConfig
    from streamgemma.kernels import attention_decode

    cfg = dataclasses.replace(sg.GriffinConfig.preset("tiny"), attention_window=64)
    monkeypatch.setattr(attention_decode, "splits_for", lambda b, window, block, target_programs=264: (2, 32))
    # inside the first tile, across both splits, past several wraps of the ring
    _check_step_against_reference(cfg, seed=8, capacity=4, slots=[0, 2, 3][:batch],
                                  positions=[5, 40, 3 * 64 + 7][-batch:],
                                  kernel_config=KernelConfig(attention_blocks={batch: 16}))


def test_attention_at_one_split_combines_as_the_combine_kernel_does(monkeypatch):
    """Above 132 rows each row has one split and its partial program combines, writes the output and
    stores the current key/value itself: the same output (to rounding) and the same rings as two splits
    merged by the combine kernel. On a GPU at RecurrentGemma-2B's head shapes and a batch of 160 (a
    padding row, positions at 0, inside the window, at it and past wraps); on the CPU at small ones."""
    from streamgemma.kernels import attention_decode as attn

    if DEV == "cuda":
        heads, hd, window, batch, dtype, block = 10, 256, 2048, 160, torch.bfloat16, None
        assert attn.splits_for(batch, window, attn.DEFAULT_BLOCK)[0] == 1
    else:
        heads, hd, window, batch, dtype, block = 2, 16, 32, 5, torch.float32, 16
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(batch, (heads + 2) * hd, generator=g).to(DEV, dtype)
    rings = [torch.randn(batch, window, hd, generator=g).to(DEV, dtype) for _ in range(2)]
    slots = torch.arange(batch, device=DEV)
    slots[1] = -1
    pos = torch.tensor([(0, 5, window, 3 * window + 7, window - 1)[i % 5] for i in range(batch)], device=DEV)
    inv_freq = (1.0 / 10000.0 ** (torch.arange(0, hd // 2, 2) / (hd // 2))).float().to(DEV)
    results = []
    for splits in ((1, window), (2, window // 2)):
        monkeypatch.setattr(attn, "splits_for", lambda b, w, block, target_programs=264, s=splits: s)
        ring_k, ring_v = (r.clone() for r in rings)
        out = torch.full((batch, heads * hd), float("nan"), device=DEV, dtype=dtype)
        attn.attention_decode(qkv, ring_k, ring_v, slots, pos, inv_freq, heads, out, block=block)
        results.append((out, ring_k, ring_v))
    (one, k1, v1), (two, k2, v2) = results
    assert torch.equal(one[1], torch.zeros_like(one[1])) and not one.isnan().any()
    torch.testing.assert_close(one.float(), two.float(), **({} if dtype == torch.float32 else
                                                            dict(rtol=2e-2, atol=2e-2)))
    # Each live row stores its current key/value at pos % window, the same in both paths (on a GPU the
    # two kernels may round the rotation differently: to bfloat16's last bit); the rest is untouched.
    written = torch.zeros(batch, window, dtype=torch.bool, device=DEV)
    live = slots >= 0
    written[live, pos[live] % window] = True
    for new1, new2, old in ((k1, k2, rings[0]), (v1, v2, rings[1])):
        assert torch.equal(new1[~written], old[~written]) and torch.equal(new2[~written], old[~written])
        torch.testing.assert_close(new1[written].float(), new2[written].float(),
                                   **({"rtol": 0, "atol": 0} if DEV == "cpu" else dict(rtol=8e-3, atol=1e-5)))
    assert not torch.equal(k1[written], rings[0][written])


@pytest.mark.slow
def test_prefill_with_kernels_equals_reference_steps_for_any_split():
    """feed() on the Triton scan + fused attention vs the reference one-token path:
    splits straddling ring wraps, starting at position 0 and mid-session."""
    cfg = sg.GriffinConfig.preset("tiny")
    ref = sg.Model.random(cfg, seed=11, device=DEV, dtype="float32", kernels=False)
    fast = sg.Model.random(cfg, seed=11, device=DEV, dtype="float32", kernels=True)
    tokens = random_tokens(3 * cfg.attention_window + 3, cfg.vocab_size, seed=12)  # three ring wraps
    rs = ref.session()
    want = torch.stack([rs.step(t) for t in tokens])
    for cuts in ([1, 9, 20], [7, 8, 16, 25], [19]):
        fs = fast.session()
        bounds = [0, *cuts, len(tokens)]
        for a, b in zip(bounds, bounds[1:]):
            got = fast.prefill(fs.slot, tokens[a:b], all_logits=True, chunk_size=6)  # chunks inside each feed
            assert rel_err(got, want[a:b]) < TOL[torch.float32]
        assert fs.position == len(tokens)
    fs = fast.session()
    got = fast.prefill(fs.slot, tokens, all_logits=True, chunk_size=11)
    assert rel_err(got, want) < TOL[torch.float32]


def _gemv_case(epilogue: str, batch: int, seed: int):
    """Random inputs for one fused GEMV call and what it must produce (torch, float32)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(DEV)  # noqa: E731
    k, n = 50, 37  # neither a multiple of the blocks below
    w = rnd(2 * n if epilogue == "geglu" else n, k) / k ** 0.5
    bias = rnd(w.shape[0])
    x, delta, scale = rnd(batch, k), rnd(batch, k), rnd(k) * 0.1
    x_new = x + delta
    normed = x_new / torch.sqrt(x_new.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + scale)
    call = dict(src=x, delta=delta, norm_scale=scale, eps=1e-6, bias=bias, epilogue=epilogue)
    y = normed @ w.T + bias
    want = {"residual": x_new}
    if epilogue == "geglu":
        want["out"] = torch.nn.functional.gelu(y[:, :n], approximate="tanh") * y[:, n:]
    elif epilogue == "softcap":
        call.update(bias=None, cap=3.0)
        want["out"] = 3.0 * torch.tanh((normed @ w.T) / 3.0)
    elif epilogue == "conv":
        # the first L = 20 features are conv channels, the other 17 y; slot -1: a padding row
        l, ck = 20, 4
        state = rnd(batch + 2, ck - 1, l)
        cw, cb = rnd(ck, l), rnd(l)
        slots = torch.tensor([-1] + list(range(2, batch + 1)), device=DEV)[:batch]
        slots[0] = -1 if batch > 1 else 0
        pos = torch.tensor([0, 1, 2, 3, 100, 7, 9, 11][:batch], device=DEV)
        conv, new_state, live = conv1d_step_ref(state, slots, pos, cw, cb, y[:, :l])
        call["conv"] = (state, slots, pos, cw, cb)
        want.update(out=torch.cat([conv, y[:, l:]], dim=1), state=new_state, live=live)
    else:
        want["out"] = y
    return w, call, want


@pytest.mark.parametrize("epilogue", ["plain", "geglu", "conv", "softcap"])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_gemv_fused_variants_match_torch(epilogue, batch):
    """Small blocks (8 features x 16 columns) so a call spans several programs and
    K tiles with ragged edges; outputs poisoned so every element is proven written."""
    from streamgemma.kernels.gemv import gemv

    w, call, want = _gemv_case(epilogue, batch, seed=batch * 10 + len(epilogue))
    n_out = w.shape[0] // 2 if epilogue == "geglu" else w.shape[0]
    out = torch.full((batch, n_out), float("nan"), device=DEV)
    residual = torch.full_like(call["src"], float("nan"))
    gemv(weight=w, out=out, residual_out=residual, config=(8, 16, 4), **call)
    rows = want.get("live", torch.ones(batch, dtype=torch.bool, device=DEV))
    if epilogue == "conv":  # padding rows' conv outputs are unspecified; their state is untouched
        assert rel_err(out[rows], want["out"][rows]) < 1e-5
        assert rel_err(out[:, 20:], want["out"][:, 20:]) < 1e-5
        assert torch.equal(call["conv"][0], want["state"]) or rel_err(call["conv"][0], want["state"]) < 1e-6
    else:
        assert rel_err(out, want["out"]) < 1e-5
    assert rel_err(residual, want["residual"]) < 1e-6


def test_gemv_plain_input_and_embedding_source():
    """No norm (the output projections: input read as is, strided output rows) and
    the first layer's source (embedding rows of tokens, scaled)."""
    from streamgemma.kernels.gemv import gemv

    g = torch.Generator().manual_seed(1)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(DEV)  # noqa: E731
    x, w = rnd(3, 70), rnd(45, 70)
    out = torch.full((3, 60), float("nan"), device=DEV)[:, 5:50]  # a strided view: row stride 60
    gemv(x, w, out, config=(16, 32, 4))
    assert rel_err(out, x @ w.T) < 1e-5
    table, scale = rnd(30, 70), rnd(70) * 0.1
    tokens = torch.tensor([4, 29], device=DEV)
    res = torch.full((2, 70), float("nan"), device=DEV)
    out = torch.full((2, 45), float("nan"), device=DEV)
    gemv(weight=w, out=out, src=table, tokens=tokens, emb_scale=2.5, norm_scale=scale, residual_out=res,
         config=(16, 32, 4))
    e = table[tokens] * 2.5
    normed = e / torch.sqrt(e.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + scale)
    assert rel_err(res, e) < 1e-6
    assert rel_err(out, normed @ w.T) < 1e-5
