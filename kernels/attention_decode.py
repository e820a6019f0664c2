"""Local-attention decode over the ring buffer: multi-query (one key/value
head), one query token per row at its own position, the current key plus the
`window` previous ones (2049 keys for RecurrentGemma).

Split-KV in two launches:
- `_attn_partial_kernel`, grid (rows, splits): each program applies RoPE to the
  row's queries, scans its slice of the ring with an online softmax, and
  writes (max, sum, weighted values) for every head. MQA: a key tile is loaded
  once and used by all heads.
- `_attn_combine_kernel`, grid (rows, heads): merges the splits and the current
  token's key/value, writes the output, then stores the current key (roped) and
  value into the ring at pos % window. It runs after every partial program, so
  the entry it overwrites (position pos - window, still inside this query's
  window) has been read.
With one split a row (large batches: the rows alone fill the GPU) the partial
program does the combine's work itself (FINAL) and the second launch is skipped.
Rows whose slot is -1 are padding: their output row is zeroed, nothing else.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import gdc_launch_dependents, gdc_wait, launch_kwargs

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": keeps exp(m - m_new) defined when a split has no valid key


@triton.jit
def _rope_rows(base_ptr, heads, dims, p, inv_freq_ptr, row_mask, HD: tl.constexpr):
    """Load [heads x dims] values at base_ptr + head * HD + dim and rotate the first
    half of each head as the reference does (pairs d, d + HD/4 within that half)."""
    Q4: tl.constexpr = HD // 4
    R: tl.constexpr = HD // 2
    offs = heads[:, None] * HD + dims[None, :]
    x = tl.load(base_ptr + offs, mask=row_mask[:, None], other=0.0).to(tl.float32)
    partner = tl.where(dims < Q4, dims + Q4, tl.where(dims < R, dims - Q4, dims))
    xp = tl.load(base_ptr + heads[:, None] * HD + partner[None, :], mask=row_mask[:, None], other=0.0)
    xp = xp.to(tl.float32)
    fi = tl.where(dims < R, dims % Q4, 0)
    theta = p.to(tl.float32) * tl.load(inv_freq_ptr + fi)
    sign = tl.where(dims < Q4, -1.0, 1.0)
    rotated = x * tl.cos(theta)[None, :] + sign[None, :] * xp * tl.sin(theta)[None, :]
    return tl.where((dims < R)[None, :], rotated, x)


@triton.jit
def _attend_tile(q, k, v, valid, m, l, acc, IEEE: tl.constexpr):
    """One tile of keys into the online softmax: (m, l, acc) updated. q: [HP, HD]
    scaled queries; k, v: the tile's keys and values [BN, HD] (zeros where not
    valid); valid: [BN]."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(valid[None, :], s, _NEG)
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp(m - m_new)
    pexp = tl.where(valid[None, :], tl.exp(s - m_new[:, None]), 0.0)
    l = l * alpha + tl.sum(pexp, axis=1)
    if IEEE:
        pv = tl.dot(pexp.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(pexp.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l, acc


@triton.jit
def _attn_partial_kernel(qkv_ptr, qkv_stride, ring_k_ptr, ring_v_ptr, slots_ptr, pos_ptr, inv_freq_ptr,
                         m_ptr, l_ptr, acc_ptr, out_ptr, W, NSPLIT, split_len, scale, H,
                         HP: tl.constexpr, HD: tl.constexpr, BN: tl.constexpr, ONE_TILE: tl.constexpr,
                         IEEE: tl.constexpr, PDL: tl.constexpr, FINAL: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    dims = tl.arange(0, HD)
    slot = tl.load(slots_ptr + row, cache_modifier=".cg")
    p = tl.load(pos_ptr + row, cache_modifier=".cg")
    ring_base = tl.maximum(slot, 0).to(tl.int64) * W * HD
    start = split * split_len
    # ring index j holds a real key iff j < p (before the first wrap) or p >= W:
    # stop at min(p, W) (early positions, idle splits); a padding row reads nothing
    stop = tl.where(slot >= 0, tl.minimum(start + split_len, tl.minimum(p, W)), start)
    if ONE_TILE:
        # The ring holds keys of earlier steps only (this step's key is written by
        # the combine kernel): a split of one tile requests it before waiting for
        # the q|k|v product (PDL), read past L1. (Holding a tile across the wait
        # costs registers: with longer splits, occupancy matters more.)
        idx = start + tl.arange(0, BN)
        valid = idx < stop
        kv_off = ring_base + idx[:, None] * HD + dims[None, :]
        k_first = tl.load(ring_k_ptr + kv_off, mask=valid[:, None], other=0.0, cache_modifier=".cg")
        v_first = tl.load(ring_v_ptr + kv_off, mask=valid[:, None], other=0.0, cache_modifier=".cg")
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    if slot >= 0:
        heads = tl.arange(0, HP)
        hmask = heads < H
        q = _rope_rows(qkv_ptr + row * qkv_stride, heads, dims, p, inv_freq_ptr, hmask, HD)
        q = (q * scale).to(ring_k_ptr.dtype.element_ty)
        m = tl.full((HP,), _NEG, tl.float32)
        l = tl.zeros((HP,), tl.float32)
        acc = tl.zeros((HP, HD), tl.float32)
        if ONE_TILE:
            m, l, acc = _attend_tile(q, k_first, v_first, valid, m, l, acc, IEEE)
        else:
            for n0 in range(start, stop, BN):
                tile = n0 + tl.arange(0, BN)
                in_tile = tile < stop
                tile_off = ring_base + tile[:, None] * HD + dims[None, :]
                k = tl.load(ring_k_ptr + tile_off, mask=in_tile[:, None], other=0.0)
                v = tl.load(ring_v_ptr + tile_off, mask=in_tile[:, None], other=0.0)
                m, l, acc = _attend_tile(q, k, v, in_tile, m, l, acc, IEEE)
        if FINAL:
            _merge_current(qkv_ptr + row * qkv_stride, ring_k_ptr, ring_v_ptr, inv_freq_ptr, out_ptr, slot, p,
                           q.to(tl.float32), m, l, acc, heads, hmask, dims, row, W, H, HD)
        else:
            stat = (row * NSPLIT + split) * HP + heads
            tl.store(m_ptr + stat, m)
            tl.store(l_ptr + stat, l)
            tl.store(acc_ptr + stat[:, None] * HD + dims[None, :], acc)
    elif FINAL:
        heads = tl.arange(0, HP)
        tl.store(out_ptr + row * H * HD + heads[:, None] * HD + dims[None, :],
                 tl.zeros((HP, HD), tl.float32).to(out_ptr.dtype.element_ty), mask=(heads < H)[:, None])


@triton.jit
def _current_kv(base, ring_k_ptr, ring_v_ptr, inv_freq_ptr, p, H, dims, HD: tl.constexpr):
    """This step's key (roped, [1, HD]) and value ([HD]) of a row whose q|k|v
    starts at `base`, rounded to the ring's dtype as what the ring holds is
    (float32 values)."""
    one = tl.arange(0, 1)
    k_cur = _rope_rows(base + H * HD, one, dims, p, inv_freq_ptr, one >= 0, HD)
    v_cur = tl.load(base + (H + 1) * HD + dims).to(tl.float32)
    return (k_cur.to(ring_k_ptr.dtype.element_ty).to(tl.float32),
            v_cur.to(ring_v_ptr.dtype.element_ty).to(tl.float32))


@triton.jit
def _store_current(ring_k_ptr, ring_v_ptr, slot, p, W, k_cur, v_cur, dims, HD: tl.constexpr):
    """This step's key and value into the row's ring at p % W (after every read of that entry)."""
    one = tl.arange(0, 1)
    ring_off = slot.to(tl.int64) * W * HD + (p % W) * HD
    tl.store(ring_k_ptr + ring_off + one[:, None] * HD + dims[None, :], k_cur.to(ring_k_ptr.dtype.element_ty))
    tl.store(ring_v_ptr + ring_off + dims, v_cur.to(ring_v_ptr.dtype.element_ty))


@triton.jit
def _merge_current(base, ring_k_ptr, ring_v_ptr, inv_freq_ptr, out_ptr, slot, p, q, m, l, acc, heads, hmask, dims,
                   row, W, H, HD: tl.constexpr):
    """The combine of a row's one split (`_attn_combine_kernel` for every head
    at once): the current key and value merged into (m, l, acc), the output
    written, then the current key (roped) and value stored in the ring. q:
    the scaled queries as the ring's dtype rounds them, in float32 [HP, HD]."""
    k_cur, v_cur = _current_kv(base, ring_k_ptr, ring_v_ptr, inv_freq_ptr, p, H, dims, HD)
    s_cur = tl.sum(q * k_cur, axis=1)  # [HP]
    mx = tl.maximum(m, s_cur)
    w = tl.exp(m - mx)
    w_cur = tl.exp(s_cur - mx)
    total = l * w + w_cur
    o = acc * w[:, None] + w_cur[:, None] * v_cur[None, :]
    tl.store(out_ptr + row * H * HD + heads[:, None] * HD + dims[None, :],
             (o / total[:, None]).to(out_ptr.dtype.element_ty), mask=hmask[:, None])
    tl.debug_barrier()  # every thread's reads of the ring are done before its oldest entry is overwritten
    _store_current(ring_k_ptr, ring_v_ptr, slot, p, W, k_cur, v_cur, dims, HD)


@triton.jit
def _attn_combine_kernel(qkv_ptr, qkv_stride, ring_k_ptr, ring_v_ptr, slots_ptr, pos_ptr, inv_freq_ptr,
                         m_ptr, l_ptr, acc_ptr, out_ptr, W, NSPLIT, scale, H,
                         HP: tl.constexpr, HD: tl.constexpr, NSP: tl.constexpr, PDL: tl.constexpr):
    # one program per (row, head): the merge is split across heads so it is not
    # one long serial program per row
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0)
    head = tl.program_id(1)
    dims = tl.arange(0, HD)
    one = tl.arange(0, 1)
    out_off = row * H * HD + head * HD + dims
    slot = tl.load(slots_ptr + row)
    if slot < 0:
        tl.store(out_ptr + out_off, tl.zeros((HD,), tl.float32).to(out_ptr.dtype.element_ty))
    else:
        p = tl.load(pos_ptr + row)
        base = qkv_ptr + row * qkv_stride
        q = _rope_rows(base, one + head, dims, p, inv_freq_ptr, one >= 0, HD)  # [1, HD]
        # what the ring holds is in the model dtype: score the current key the same way
        k_cur, v_cur = _current_kv(base, ring_k_ptr, ring_v_ptr, inv_freq_ptr, p, H, dims, HD)
        q = (q * scale).to(ring_k_ptr.dtype.element_ty).to(tl.float32)  # as the partial pass rounds it
        s_cur = tl.sum(tl.sum(q * k_cur, axis=1), axis=0)

        splits = tl.arange(0, NSP)
        smask = splits < NSPLIT
        stat = (row * NSPLIT + splits) * HP + head
        m_all = tl.load(m_ptr + stat, mask=smask, other=_NEG)
        l_all = tl.load(l_ptr + stat, mask=smask, other=0.0)
        mx = tl.maximum(tl.max(m_all, axis=0), s_cur)
        w_all = tl.exp(m_all - mx)
        w_cur = tl.exp(s_cur - mx)
        total = tl.sum(l_all * w_all, axis=0) + w_cur
        acc = tl.load(acc_ptr + stat[:, None] * HD + dims[None, :], mask=smask[:, None], other=0.0)
        o = tl.sum(acc * w_all[:, None], axis=0) + w_cur * v_cur
        tl.store(out_ptr + out_off, (o / total).to(out_ptr.dtype.element_ty))
        if head == 0:  # after every partial program has read the ring: store the current key/value
            _store_current(ring_k_ptr, ring_v_ptr, slot, p, W, k_cur, v_cur, dims, HD)


DEFAULT_BLOCK = 64  # keys per tile


def splits_for(batch: int, window: int, block: int, target_programs: int = 264) -> tuple[int, int]:
    """(number of splits, keys per split): enough programs to fill the GPU at
    small batch, one split per row once the batch alone fills it."""
    blocks = triton.cdiv(window, block)
    per_split = max(1, triton.cdiv(blocks, max(1, target_programs // max(batch, 1))))
    split_len = per_split * block
    return triton.cdiv(window, split_len), split_len


def attention_decode(qkv: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor, slots: torch.Tensor,
                     pos: torch.Tensor, inv_freq: torch.Tensor, num_heads: int, out: torch.Tensor, *,
                     block: int | None = None, pdl: bool = False) -> torch.Tensor:
    """qkv: [B, (H + 2) * hd] = q (H heads) | k | v before RoPE (model dtype);
    ring_k/ring_v: pool rings [S, W, hd] (the current k/v are written at pos % W);
    slots, pos: [B] int64; inv_freq: [hd / 4] float32 RoPE frequencies;
    out: [B, H * hd] model dtype. block: keys per tile (default DEFAULT_BLOCK);
    pdl: launch with programmatic dependent launch (see pdl.py)."""
    batch = qkv.shape[0]
    _, window, hd = ring_k.shape
    hp = max(16, triton.next_power_of_2(num_heads))
    block = min(block or DEFAULT_BLOCK, max(16, triton.next_power_of_2(window)))
    nsplit, split_len = splits_for(batch, window, block)
    final = nsplit == 1  # the partial programs combine and write the output themselves
    # float32 partial results of the split-KV pass (max, sum, weighted values)
    m = torch.empty(0 if final else batch * nsplit * hp, dtype=torch.float32, device=qkv.device)
    l = torch.empty_like(m)
    acc = torch.empty(0 if final else batch * nsplit * hp * hd, dtype=torch.float32, device=qkv.device)
    scale = hd ** -0.5
    ieee = qkv.dtype == torch.float32
    warps = 8 if hd >= 256 else 4
    _attn_partial_kernel[(batch, nsplit)](
        qkv, qkv.stride(0), ring_k, ring_v, slots, pos, inv_freq, m, l, acc, out,
        window, nsplit, split_len, scale, num_heads, HP=hp, HD=hd, BN=block, ONE_TILE=split_len == block, IEEE=ieee,
        PDL=pdl, FINAL=final, num_warps=warps, **launch_kwargs(pdl))
    if final:
        return out
    _attn_combine_kernel[(batch, num_heads)](
        qkv, qkv.stride(0), ring_k, ring_v, slots, pos, inv_freq, m, l, acc, out,
        window, nsplit, scale, num_heads, HP=hp, HD=hd, NSP=triton.next_power_of_2(nsplit),
        PDL=pdl, num_warps=warps, **launch_kwargs(pdl))
    return out
