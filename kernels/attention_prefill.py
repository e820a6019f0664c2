"""Local attention of one session's prefill chunk: a flash-attention forward
over the ring's previous keys plus the chunk's own, multi-query (one key/value
head), sliding window.

Query i of the chunk sits at position p0 + i and attends to the keys at
positions [p0 + i - window, p0 + i] (window + 1 keys once the ring is full).
The keys are, in logical order j = 0 .. prev + T - 1: the ring's `prev`
entries (positions p0 - prev .. p0 - 1, ring index (p0 - prev + j) % window,
read in place) then the chunk's T keys (read from the q|k|v projection rows).

The M dimension of a program is a block of (query, head) pairs, flattened
query-major (pair m = i * H + h): all heads of a query share every key/value
tile (MQA), and no lane is wasted on padding heads (10 heads are not a power
of two). A block's pairs span about BLOCK_M / H consecutive queries, so it
visits only the key tiles of their windows' union: about window + BLOCK_M / H
keys, not prev + T. Tiles inside every pair's window skip the mask. The ring's
keys and the chunk's are separate spans of tiles, so each tile is one load
from one source, which Triton pipelines (asynchronous copies to shared memory).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": exp2 of (it - max) stays 0, never NaN
_LOG2E = 1.4426950408889634


@triton.jit
def _tile(q, j0, qj, m_i, l_i, acc, k_ptr, v_ptr, kv_stride, dims, p0, prev, span_hi, W, qk_scale,
          HD: tl.constexpr, BN: tl.constexpr, IN_RING: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr):
    """One key tile [j0, j0 + BN) into the online softmax of the block's pairs.
    IN_RING: the tile's keys are ring entries (k_ptr, v_ptr: the ring, row
    (p0 - prev + j) % W), else chunk rows j - prev (row stride kv_stride); keys
    from span_hi on belong to the next span or do not exist. qj: [BM] the
    logical index of each pair's own key (i + prev); its window is [qj - W, qj].
    MASKED=False: the caller knows the whole tile is inside every pair's window
    and the span."""
    j = j0 + tl.arange(0, BN)
    if IN_RING:
        rows = ((p0 - prev + j) % W) * HD
    else:
        rows = (j - prev) * kv_stride
    offs = rows[:, None] + dims[None, :]
    if MASKED:
        k = tl.load(k_ptr + offs, mask=(j < span_hi)[:, None], other=0.0)
        v = tl.load(v_ptr + offs, mask=(j < span_hi)[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + offs)
        v = tl.load(v_ptr + offs)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    if MASKED:
        valid = (j[None, :] <= qj[:, None]) & (j[None, :] >= qj[:, None] - W) & (j < span_hi)[None, :]
        s = tl.where(valid, s, _NEG)
    # m_i is in scaled log2 units: the scale folds into the exponent's argument (one FMA)
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    if MASKED:
        p = tl.where(valid, p, 0.0)  # a row with no valid key yet: s - m_new is 0, not -inf
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _span(q, qj, m_i, l_i, acc, k_ptr, v_ptr, kv_stride, dims, p0, prev, W, qk_scale, lo, hi, all_lo, all_hi,
          HD: tl.constexpr, BN: tl.constexpr, IN_RING: tl.constexpr, IEEE: tl.constexpr):
    """Key tiles from lo up to hi (exclusive) of one source: masked tiles up to
    the first one inside [all_lo, all_hi) (every pair's window), unmasked
    tiles while they stay inside it, masked tiles for the rest."""
    a_end = tl.minimum(lo + (tl.maximum(all_lo - lo, 0) + BN - 1) // BN * BN, hi)
    b_end = a_end + tl.maximum(tl.minimum(all_hi, hi) - a_end, 0) // BN * BN
    for j0 in range(lo, a_end, BN):
        m_i, l_i, acc = _tile(q, j0, qj, m_i, l_i, acc, k_ptr, v_ptr, kv_stride, dims, p0, prev, hi, W, qk_scale,
                              HD, BN, IN_RING, True, IEEE)
    for j0 in range(a_end, b_end, BN):
        m_i, l_i, acc = _tile(q, j0, qj, m_i, l_i, acc, k_ptr, v_ptr, kv_stride, dims, p0, prev, hi, W, qk_scale,
                              HD, BN, IN_RING, False, IEEE)
    for j0 in range(b_end, hi, BN):
        m_i, l_i, acc = _tile(q, j0, qj, m_i, l_i, acc, k_ptr, v_ptr, kv_stride, dims, p0, prev, hi, W, qk_scale,
                              HD, BN, IN_RING, True, IEEE)
    return m_i, l_i, acc


# p0, prev, T change from call to call: unspecialised, so they do not multiply compiled variants
@triton.jit(do_not_specialize=["p0", "prev", "T"])
def _attn_prefill_kernel(q_ptr, q_stride, ring_k_ptr, ring_v_ptr, k_ptr, v_ptr, kv_stride, out_ptr,
                         p0, prev, T, W, H, qk_scale,
                         HD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    pairs = tl.program_id(0) * BM + tl.arange(0, BM)
    live = pairs < T * H
    qi = tl.minimum(pairs // H, T - 1)  # dead lanes (past the last pair) repeat the last query
    head = pairs % H
    dims = tl.arange(0, HD)
    q = tl.load(q_ptr + qi[:, None] * q_stride + head[:, None] * HD + dims[None, :])
    qj = qi + prev
    # the block's queries are i_lo .. i_hi: keys in the union of their windows,
    # and the tiles inside all of them (the intersection) need no mask
    i_lo = (tl.program_id(0) * BM) // H
    i_hi = tl.minimum((tl.program_id(0) * BM + BM - 1) // H, T - 1)
    lo = tl.maximum(i_lo + prev - W, 0)
    hi = i_hi + prev + 1  # exclusive
    all_lo = tl.maximum(i_hi + prev - W, 0)
    all_hi = i_lo + prev + 1  # exclusive

    m_i = tl.full((BM,), _NEG, tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, HD), tl.float32)
    # two spans, so that every tile reads one source: the ring's keys [lo, prev),
    # then the chunk's [max(lo, prev), hi)
    m_i, l_i, acc = _span(q, qj, m_i, l_i, acc, ring_k_ptr, ring_v_ptr, 0, dims, p0, prev, W, qk_scale,
                          lo, prev, all_lo, all_hi, HD, BN, True, IEEE)
    m_i, l_i, acc = _span(q, qj, m_i, l_i, acc, k_ptr, v_ptr, kv_stride, dims, p0, prev, W, qk_scale,
                          tl.maximum(lo, prev), hi, all_lo, all_hi, HD, BN, False, IEEE)
    # every pair has at least its own key, so l_i > 0
    out = acc / l_i[:, None]
    tl.store(out_ptr + pairs[:, None] * HD + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=live[:, None])


@dataclasses.dataclass(frozen=True)
class PrefillTiles:
    """Launch shape: block_m (query, head) pairs and block_n keys per tile
    (powers of two >= 16), num_warps, num_stages (software pipelining depth)."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"PrefillTiles.{name} must be a power of two, got {value!r}")
        if self.block_m < 16 or self.block_n < 16:
            raise ValueError(f"block_m and block_n must be >= 16, got {self.block_m}, {self.block_n}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"PrefillTiles.num_stages must be an int >= 1, got {self.num_stages!r}")


def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring_k: torch.Tensor,
                      ring_v: torch.Tensor, p0: int, out: torch.Tensor, tiles: PrefillTiles | None = None
                      ) -> torch.Tensor:
    """q: [T, H, hd] queries after RoPE (rows may be strided, heads contiguous);
    k, v: [T, hd] the chunk's key (after RoPE) and value rows (row stride shared);
    ring_k, ring_v: [W, hd] contiguous, one slot's ring, read only (it holds
    positions p0 - min(p0, W) .. p0 - 1 at position % W); p0: position of the
    chunk's first token; out: [T, H * hd] contiguous, model dtype. Query i
    attends to positions [p0 + i - W, p0 + i], scale hd ** -0.5."""
    steps, heads, hd = q.shape
    window = ring_k.shape[0]
    tiles = tiles or PrefillTiles()
    if q.stride(2) != 1 or q.stride(1) != hd or k.stride(1) != 1 or v.stride(1) != 1 or k.stride(0) != v.stride(0):
        raise ValueError("attention_prefill: q heads and k/v rows must be contiguous, k and v rows equally strided")
    if not (ring_k.is_contiguous() and ring_v.is_contiguous() and out.is_contiguous()):
        raise ValueError("attention_prefill: ring_k, ring_v and out must be contiguous")
    if hd & (hd - 1) or hd < 16:
        raise ValueError(f"attention_prefill: head_dim must be a power of two >= 16, got {hd}")
    prev = min(p0, window)
    grid = (triton.cdiv(steps * heads, tiles.block_m),)
    _attn_prefill_kernel[grid](
        q, q.stride(0), ring_k, ring_v, k, v, k.stride(0), out, p0, prev, steps, window, heads,
        hd ** -0.5 * _LOG2E, HD=hd, BM=tiles.block_m, BN=tiles.block_n, IEEE=q.dtype == torch.float32,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out
