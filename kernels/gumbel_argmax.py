"""Sampling of many rows in two launches: Philox4x32-10 noise, the Gumbel-max
trick and the argmax, reading each row's logits once.

The definition (and its pure-PyTorch reference, which these kernels are
tested against) is `streamgemma.sampling.philox`: for row s with stream words
(key0, key1, counter1, counter2) and vocab entry v, Philox4x32-10 of counter
(v >> 2, counter1, counter2, 0) under key (key0, key1) gives four words; word
v & 3, w, gives u = (2 * (w >> 9) + 1) * 2**-24, and the token is the smallest
v maximising x[s, v] / T[s] - log(-log(u)).

- `_gumbel_tiles_kernel`, grid (rows, tiles): each program makes BLOCK Philox
  calls (4 * BLOCK vocab entries; lane l of call j is entry 4j + l, loaded
  with a stride of 4 per lane: the four lanes together read contiguous
  memory) and writes its tile's (max score, smallest index reaching it).
- `argmax_tiles_kernel`, grid (rows,): the smallest index among the tiles
  that reach the row's maximum.
Every value of a row depends only on that row's inputs, so a row samples the
same token alone or in any batch. The Philox rounds and the two logs per
entry bound it, not memory, so the tile size matters little.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Philox4x32 multipliers and Weyl key increments (Random123's PHILOX_M4x32_0/1, PHILOX_W32_0/1).
_M0 = tl.constexpr(0xD2511F53)
_M1 = tl.constexpr(0xCD9E8D57)
_W0 = tl.constexpr(0x9E3779B9)
_W1 = tl.constexpr(0xBB67AE85)
_TWO_M24 = tl.constexpr(1.0 / 16777216.0)  # 2**-24
_NO_INDEX = tl.constexpr(2147483647)  # loses every "smallest index" comparison


@triton.jit
def tile_words(words_ptr, row, j, BLOCK: tl.constexpr):
    """The four Philox words of calls j ([BLOCK]) of row's stream, whose (seed,
    counter) is words_ptr[row * 4 .. row * 4 + 3] (`philox.stream_words`)."""
    k0 = tl.load(words_ptr + row * 4).to(tl.uint32)
    k1 = tl.load(words_ptr + row * 4 + 1).to(tl.uint32)
    ctr_lo = tl.load(words_ptr + row * 4 + 2).to(tl.uint32)
    ctr_hi = tl.load(words_ptr + row * 4 + 3).to(tl.uint32)
    zero = tl.zeros([BLOCK], dtype=tl.uint32)
    return philox4x32_10(j.to(tl.uint32), zero + ctr_lo, zero + ctr_hi, zero, k0, k1)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors (the round of Random123: the key is
    bumped between rounds). Products and sums wrap modulo 2**32 on purpose."""
    for r in tl.static_range(10):
        if r > 0:
            k0 = tl.add(k0, _W0, sanitize_overflow=False)
            k1 = tl.add(k1, _W1, sanitize_overflow=False)
        a0, a2 = c0, c2
        c0 = tl.math.umulhi(_M1, a2) ^ c1 ^ k0
        c2 = tl.math.umulhi(_M0, a0) ^ c3 ^ k1
        c1 = tl.mul(_M1, a2, sanitize_overflow=False)
        c3 = tl.mul(_M0, a0, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def gumbel_score(x, w):
    """x - log(-log(u)), u from the raw Philox words w of x's entries: the score
    the token maximises (also the filtered draw's, `sampling_filters`)."""
    u = ((w >> 9) * 2 + 1).to(tl.float32) * _TWO_M24  # < 2**24 times a power of two: exact
    return x - tl.log(-tl.log(u))


@triton.jit
def _lane_score(row_ptr, w, v, V, temp, HAS_TEMP: tl.constexpr):
    """x[v] / T - log(-log(u)) for one lane's entries v (int32 [BLOCK]); -inf past V."""
    mask = v < V
    x = tl.load(row_ptr + v, mask=mask, other=float("-inf"))
    if HAS_TEMP:
        x = tl.math.div_rn(x, temp)  # correctly rounded, as torch's x / T in the reference and the filters
    return tl.where(mask, gumbel_score(x, w), float("-inf"))


# Pointers too: the rows' words and temperatures are slices of one upload at
# varying offsets, and a new alignment would compile a new variant mid-service.
@triton.jit(do_not_specialize=["x_ptr", "stride", "words_ptr", "temps_ptr", "V", "n_tiles"])
def _gumbel_tiles_kernel(x_ptr, stride, words_ptr, temps_ptr, tile_max_ptr, tile_idx_ptr, V, n_tiles,
                         HAS_TEMP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    tile = tl.program_id(1)
    j = tile * BLOCK + tl.arange(0, BLOCK)  # Philox call j serves entries 4j .. 4j + 3
    w0, w1, w2, w3 = tile_words(words_ptr, row, j, BLOCK)
    row_ptr = x_ptr + row.to(tl.int64) * stride
    temp = 1.0
    if HAS_TEMP:
        temp = tl.load(temps_ptr + row)
    v = 4 * j
    best = _lane_score(row_ptr, w0, v, V, temp, HAS_TEMP)
    best_idx = v
    # Lanes in increasing v: a later lane takes an entry only when strictly greater
    # (ties go to the smaller index, as torch.argmax's first maximum).
    s = _lane_score(row_ptr, w1, v + 1, V, temp, HAS_TEMP)
    best_idx = tl.where(s > best, v + 1, best_idx)
    best = tl.maximum(best, s)
    s = _lane_score(row_ptr, w2, v + 2, V, temp, HAS_TEMP)
    best_idx = tl.where(s > best, v + 2, best_idx)
    best = tl.maximum(best, s)
    s = _lane_score(row_ptr, w3, v + 3, V, temp, HAS_TEMP)
    best_idx = tl.where(s > best, v + 3, best_idx)
    best = tl.maximum(best, s)
    m = tl.max(best, axis=0)
    idx = tl.min(tl.where(best == m, best_idx, _NO_INDEX), axis=0)
    tl.store(tile_max_ptr + row * n_tiles + tile, m)
    tl.store(tile_idx_ptr + row * n_tiles + tile, idx)


@triton.jit(do_not_specialize=["n_tiles"])
def argmax_tiles_kernel(tile_max_ptr, tile_idx_ptr, out_ptr, n_tiles, BLOCK_T: tl.constexpr):
    row = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    mask = t < n_tiles
    m = tl.load(tile_max_ptr + row * n_tiles + t, mask=mask, other=float("-inf"))
    idx = tl.load(tile_idx_ptr + row * n_tiles + t, mask=mask, other=_NO_INDEX)
    best = tl.max(m, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(mask & (m == best), idx, _NO_INDEX), axis=0).to(tl.int64))


@triton.jit
def _philox_words_kernel(words_ptr, out_ptr, calls, BLOCK: tl.constexpr):
    """The raw words of `philox_words` (tests: the kernels' Philox against the reference)."""
    row = tl.program_id(0)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dtype=tl.uint32)
    k0 = tl.load(words_ptr + row * 4).to(tl.uint32)
    k1 = tl.load(words_ptr + row * 4 + 1).to(tl.uint32)
    c1 = tl.load(words_ptr + row * 4 + 2).to(tl.uint32)
    c2 = tl.load(words_ptr + row * 4 + 3).to(tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(j.to(tl.uint32), zero + c1, zero + c2, zero, k0, k1)
    base = out_ptr + row.to(tl.int64) * 4 * calls + 4 * j
    mask = j < calls
    tl.store(base, w0.to(tl.int64), mask=mask)
    tl.store(base + 1, w1.to(tl.int64), mask=mask)
    tl.store(base + 2, w2.to(tl.int64), mask=mask)
    tl.store(base + 3, w3.to(tl.int64), mask=mask)


_MAX_TILES = 1 << 14  # the second stage reduces a row's tiles in one block



def float32_rows(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` with unit stride along the vocabulary, and the int64 [rows] output
    of a row-wise sampler; TypeError unless x is float32."""
    if x.dtype != torch.float32:
        raise TypeError(f"{name} needs float32 logits, got {x.dtype}")
    return (x if x.stride(1) == 1 else x.contiguous()), torch.empty(x.shape[0], dtype=torch.int64, device=x.device)

def gumbel_argmax(x: torch.Tensor, words: torch.Tensor, temps: torch.Tensor | None = None,
                  block: int | None = None) -> torch.Tensor:
    """The sampled token of every row: argmax over v of x[s, v] / temps[s] -
    log(-log(u[s, v])), the smallest v on ties, u from row s's Philox stream
    (see the module docstring; `streamgemma.sampling.philox.gumbel_argmax_reference`
    is the same function in PyTorch).

    x: float32 [S, V], any row stride, column stride 1 (a view of the first V
    columns of a wider tensor is fine). words: int64 [S, 4], each row the
    32-bit words (key0, key1, counter1, counter2) of `philox.stream_words`
    (tensors, so one compiled kernel serves every seed and counter). temps:
    float32 [S] or None (x used as is). block: Philox calls per program (a
    power of two; tests use small ones to get several tiles). Returns int64
    [S] on x's device, after two launches and no host synchronisation."""
    x, out = float32_rows(x, "gumbel_argmax")
    rows, vocab = x.shape
    if rows == 0:
        return out
    if words.shape != (rows, 4) or words.dtype != torch.int64:
        raise ValueError(f"words must be int64 [{rows}, 4], got {words.dtype} {list(words.shape)}")
    words = words.contiguous()
    if block is None:
        block = 512  # 2048 entries per program: 125 tiles per row at V = 256,000
    n_tiles = triton.cdiv(vocab, 4 * block)
    if n_tiles > _MAX_TILES:
        raise ValueError(f"vocabulary {vocab} needs {n_tiles} tiles of {4 * block}; at most {_MAX_TILES}")
    tile_max = torch.empty(rows, n_tiles, dtype=torch.float32, device=x.device)
    tile_idx = torch.empty(rows, n_tiles, dtype=torch.int32, device=x.device)
    has_temp = temps is not None
    _gumbel_tiles_kernel[(rows, n_tiles)](x, x.stride(0), words, temps.contiguous() if has_temp else x,
                                          tile_max, tile_idx, vocab, n_tiles, HAS_TEMP=has_temp, BLOCK=block,
                                          num_warps=4)
    argmax_tiles_kernel[(rows,)](tile_max, tile_idx, out, n_tiles, BLOCK_T=triton.next_power_of_2(n_tiles),
                                  num_warps=4 if n_tiles > 256 else 1)
    return out


def philox_words(words: torch.Tensor, vocab: int, block: int = 64) -> torch.Tensor:
    """Raw 32-bit words, as the sampling kernel draws them: int64 [S, 4 *
    ceil(vocab / 4)] (entry v of row s at [s, v]), for testing the kernel's
    Philox against `streamgemma.sampling.philox.noise_words`. words: int64 [S, 4]."""
    rows = words.shape[0]
    calls = triton.cdiv(vocab, 4)
    out = torch.empty(rows, 4 * calls, dtype=torch.int64, device=words.device)
    _philox_words_kernel[(rows, triton.cdiv(calls, block))](words.contiguous(), out, calls, BLOCK=block)
    return out
