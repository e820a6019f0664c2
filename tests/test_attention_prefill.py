"""The prefill attention kernel (kernels/attention_prefill.py) against PyTorch's
attention with today's explicit mask, on small shapes: chunks starting at
position 0, inside the first window, past it, with the ring wrapped; chunks
longer than the window; several tile shapes so blocks hold partial queries,
masked edge tiles and unmasked inner tiles. On a machine without a GPU the
kernel runs under Triton's interpreter (set in conftest.py).

The inputs are strided views of one q|k|v buffer as in the prefill; ring
entries that hold no key yet and the output are NaN beforehand, so a read
of the former or an unwritten element of the latter fails the comparison."""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_tokens
from reference import rel_err

import streamgemma as sg
from streamgemma.kernels.attention_prefill import PrefillTiles, attention_prefill

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def reference(q, k, v, ring_k, ring_v, p0):
    """The attention of fast/prefill.py before this kernel: ring entries in logical
    order, then the chunk; mask (kpos <= qpos) & (kpos >= qpos - W); float32 math."""
    steps, heads, hd = q.shape
    w = ring_k.shape[0]
    prev = min(p0, w)
    idx = torch.arange(p0 - prev, p0, device=q.device) % w
    keys = torch.cat([ring_k.index_select(0, idx), k]).float()
    values = torch.cat([ring_v.index_select(0, idx), v]).float()
    kpos = torch.arange(p0 - prev, p0 + steps, device=q.device)
    qpos = kpos[prev:, None]
    mask = (kpos[None] <= qpos) & (kpos[None] >= qpos - w)
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1)[None], keys[None, None].expand(1, heads, -1, -1),
        values[None, None].expand(1, heads, -1, -1), attn_mask=mask[None, None], scale=hd ** -0.5)
    return out[0].transpose(0, 1).reshape(steps, heads * hd)


def case(steps, heads, hd, window, p0, dtype=torch.float32, seed=0):
    """q, k, v as views of a [T, (H + 2) * hd] q|k|v buffer; a random ring whose
    entries without a key yet (p0 < window) are NaN."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(steps, (heads + 2) * hd, generator=g).to(dtype).to(DEV)
    q = qkv[:, :heads * hd].view(steps, heads, hd)
    k, v = qkv[:, heads * hd:(heads + 1) * hd], qkv[:, (heads + 1) * hd:]
    rings = torch.randn(2, window, hd, generator=g).to(dtype).to(DEV)
    if p0 < window:
        rings[:, p0:] = float("nan")
    return q, k, v, rings[0], rings[1]


def check(steps, heads, hd, window, p0, tiles=None, dtype=torch.float32):
    q, k, v, ring_k, ring_v = case(steps, heads, hd, window, p0, dtype, seed=steps * 7 + p0)
    before = ring_k.clone(), ring_v.clone()
    out = torch.full((steps, heads * hd), float("nan"), dtype=dtype, device=DEV)
    got = attention_prefill(q, k, v, ring_k, ring_v, p0, out, tiles)
    assert got is out
    assert not torch.isnan(out).any()
    assert rel_err(out.float(), reference(q, k, v, ring_k, ring_v, p0)) < TOL[dtype]
    # the ring is read only (NaN entries compared as equal)
    assert torch.equal(ring_k.nan_to_num(), before[0].nan_to_num())
    assert torch.equal(ring_v.nan_to_num(), before[1].nan_to_num())


# (T, H, hd, window, p0): start of the sequence, inside the first window, exactly
# one window in, past it, with the ring wrapped; one query; chunks longer than the window
CASES = [
    (1, 2, 16, 16, 0), (1, 3, 32, 16, 9), (1, 2, 16, 16, 16), (1, 3, 16, 32, 101),
    (7, 2, 16, 16, 0), (7, 3, 32, 32, 5), (7, 2, 16, 16, 21), (7, 3, 16, 16, 3 * 16 + 11),
    (40, 3, 16, 16, 0), (40, 2, 32, 32, 13), (40, 3, 16, 16, 16), (40, 2, 16, 32, 5 * 32 + 7),
    (100, 3, 16, 16, 0), (100, 2, 16, 32, 30), (100, 3, 32, 16, 2 * 16 + 5),
]


@pytest.mark.parametrize("steps,heads,hd,window,p0", CASES)
def test_matches_masked_attention(steps, heads, hd, window, p0):
    check(steps, heads, hd, window, p0, PrefillTiles(block_m=32, block_n=16, num_warps=4))


# block_m not a multiple of H (blocks split a query's heads), block_n larger
# than the window, blocks spanning more queries than the window
@pytest.mark.parametrize("tiles", [PrefillTiles(16, 16, 4), PrefillTiles(64, 32, 4), PrefillTiles(128, 64, 8)],
                         ids=["16x16", "64x32", "128x64"])
@pytest.mark.parametrize("steps,p0", [(40, 0), (100, 16 * 4 + 3)])
def test_tile_shapes(tiles, steps, p0):
    check(steps, 3, 16, 16, p0, tiles)


def test_first_unmasked_tile_starts_where_the_last_query_s_window_does():
    """A block's inner (unmasked) tiles begin at the window start of its last
    query: here the tile before it holds a key outside that query's window."""
    check(5, 5, 16, 32, 31, PrefillTiles(block_m=16, block_n=32, num_warps=4))


@pytest.mark.skipif(DEV != "cuda",
                    reason="bfloat16 needs the compiled kernel (Triton's CPU interpreter misreads bfloat16)")
@pytest.mark.parametrize("steps,p0", [(2048, 0), (2048, 2048), (2048, 5 * 2048 + 17), (300, 1000)])
def test_real_shapes_bfloat16(steps, p0):
    check(steps, 10, 256, 2048, p0, dtype=torch.bfloat16)


def test_bad_layouts_are_refused():
    q, k, v, ring_k, ring_v = case(4, 2, 16, 16, 3)
    out = torch.empty(4, 32, device=DEV)
    with pytest.raises(ValueError, match="contiguous"):
        attention_prefill(q.transpose(1, 2), k, v, ring_k, ring_v, 3, out)
    with pytest.raises(ValueError, match="contiguous"):
        attention_prefill(q, k, v, ring_k, ring_v, 3, torch.empty(32, 4, device=DEV).t())
    with pytest.raises(ValueError, match="power of two"):
        PrefillTiles(block_m=48)


def test_feed_with_the_kernel_equals_feed_with_pytorch_attention():
    """The whole kernel prefill with this kernel (tiles from the KernelConfig)
    and with `prefill_attention="sdpa"`: the same logits and state, chunks
    straddling the tiny model's ring wraps (window 8)."""
    cfg = sg.GriffinConfig.preset("tiny")
    tokens = random_tokens(21, cfg.vocab_size, seed=3)
    results = []
    for config in (sg.KernelConfig(prefill_attention_tiles=(16, 16, 4, 2)), sg.KernelConfig(prefill_attention="sdpa")):
        model = sg.Model.random(cfg, seed=2, device=DEV, dtype="float32", kernels=True, kernel_config=config)
        s = model.session()
        logits = model.prefill(s.slot, tokens, all_logits=True, chunk_size=9)
        results.append((logits, [t.clone() for layer in model.pool.layers for t in layer]))
    (got, got_state), (want, want_state) = results
    assert rel_err(got, want) < TOL[torch.float32]
    for g, w in zip(got_state, want_state):
        assert rel_err(g.float(), w.float()) < TOL[torch.float32]
