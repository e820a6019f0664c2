"""The filtered draw when every row has a small top_k: the kept set is a subset
of the top_k survivors, so only they are read after the tile maxima (the same
tokens as `sampling_filters.filtered_gumbel_argmax` and the definition,
`streamgemma.sampling.filters.keep_mask`).

1. tile maxima and per-row bounds (`sampling_filters`): the k-th largest tile
   maximum, tau, is a lower bound of the k-th largest value;
2. one compaction pass over the tiles whose maximum reaches tau: the sort key
   of every finite entry >= tau goes to a per-row buffer of CAP slots (an
   atomic counter per row; -inf entries weigh nothing and are never drawn
   from a row with a finite entry, so they need no slot);
3. one program per row sorts its candidates (value descending, ties by id),
   takes the k-th value, the exact integer masses and the top_p cut in that
   order, min_p, and draws with the Philox noise of `gumbel_argmax`. A row
   whose candidates overflow CAP (huge ties, flat rows) is finished by the
   same program over its whole row with binary searches on the key: slow but
   exact, rare, and decided on the device (no host sync: graph-capturable).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gumbel_argmax import float32_rows, gumbel_score, tile_words
from .sampling_filters import (
    FLOOR_WORD,
    STATE_WORDS,
    TAU_WORD,
    bounds_kernel,
    filtered_gumbel_argmax,
    kept_ties,
    mass_weight,
    scaled_logits,
    tile_max_kernel,
    ukey,
)

_NO_INDEX = tl.constexpr(2147483647)
_PAD = tl.constexpr(-(1 << 63))  # below every candidate's sort key


@triton.jit(do_not_specialize=["x_ptr", "stride", "temps_ptr", "V", "n_tiles"])
def _compact_kernel(x_ptr, stride, temps_ptr, tile_max_ptr, state_ptr, count_ptr, cand_ptr, V, n_tiles,
                    CAP: tl.constexpr, HAS_TEMP: tl.constexpr, TILE: tl.constexpr, GROUP: tl.constexpr):
    """Sort keys ((key - 2**31) << 32 | (2**32 - 1 - id): descending order is
    value descending, ties by smaller id) of the finite entries >= tau."""
    row = tl.program_id(0)
    tau = tl.load(state_ptr + row * STATE_WORDS + TAU_WORD)
    temp = 1.0
    if HAS_TEMP:
        temp = tl.load(temps_ptr + row)
    for g in range(GROUP):
        tile = tl.program_id(1) * GROUP + g
        if tile < n_tiles:
            if ukey(tl.load(tile_max_ptr + row * n_tiles + tile)) >= tau:
                v = tile * TILE + tl.arange(0, TILE)
                x = scaled_logits(x_ptr + row.to(tl.int64) * stride, v, V, temp, HAS_TEMP)
                u = ukey(x)
                take = (v < V) & (u >= tau) & (x > float("-inf"))
                n = tl.sum(take.to(tl.int32), axis=0)
                if n > 0:
                    base = tl.atomic_add(count_ptr + row, n)
                    at = base + tl.cumsum(take.to(tl.int32), axis=0) - take.to(tl.int32)
                    low = tl.full([], 4294967295, tl.int64)
                    key = ((u - 2147483648) << 32) | (low - v.to(tl.int64))
                    tl.store(cand_ptr + row.to(tl.int64) * CAP + at, key, mask=take & (at < CAP))


@triton.jit
def _draw(words_ptr, row, v, x, keep, BLOCK: tl.constexpr):
    """(best score, smallest id reaching it) of the kept entries v (int64 [BLOCK]),
    with the noise `gumbel_argmax` gives entry v: word v & 3 of Philox call v >> 2."""
    w0, w1, w2, w3 = tile_words(words_ptr, row, (v >> 2).to(tl.int32), BLOCK)
    lane = v & 3
    w = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    s = tl.where(keep, gumbel_score(x, w), float("-inf"))
    best = tl.max(s, axis=0)
    return best, tl.min(tl.where(keep & (s == best), v, _NO_INDEX), axis=0)


@triton.jit
def _count_at_least(row_ptr, V, temp, t, HAS_TEMP: tl.constexpr, TILE: tl.constexpr):
    n = tl.zeros([], dtype=tl.int64)
    for start in range(0, V, TILE):
        v = start + tl.arange(0, TILE)
        n += tl.sum(((v < V) & (ukey(scaled_logits(row_ptr, v, V, temp, HAS_TEMP)) >= t)).to(tl.int64), axis=0)
    return n


@triton.jit
def _mass_above(row_ptr, V, temp, m, scale, lo, t, HAS_TEMP: tl.constexpr, TILE: tl.constexpr):
    """Weight of the entries with key > t and >= lo."""
    total = tl.zeros([], dtype=tl.int64)
    for start in range(0, V, TILE):
        v = start + tl.arange(0, TILE)
        x = scaled_logits(row_ptr, v, V, temp, HAS_TEMP)
        u = ukey(x)
        total += tl.sum(tl.where((v < V) & (u > t) & (u >= lo), mass_weight(x, m, scale), 0), axis=0)
    return total


@triton.jit
def _whole_row(row_ptr, words_ptr, row, V, temp, k, top_p, m, floor, scale, HAS_TEMP: tl.constexpr,
               TILE: tl.constexpr):
    """The token of a row whose candidates overflowed: binary searches on the
    key over the whole row (the k-th key; the top_p boundary), then a draw."""
    k = tl.where(k > 0, k, V).to(tl.int64)  # top_k off (callers should not send it here): every entry
    lo = tl.zeros([], dtype=tl.int64)  # the k-th largest key: the largest t with k keys >= t
    hi = tl.full([], 4294967296, tl.int64)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _count_at_least(row_ptr, V, temp, mid, HAS_TEMP, TILE) >= k:
            lo = mid
        else:
            hi = mid
    kth = lo
    total = _mass_above(row_ptr, V, temp, m, scale, kth, -1, HAS_TEMP, TILE)
    limit = top_p.to(tl.float64) * total.to(tl.float64)
    cut = (top_p < 1.0) & (total > 0)
    boundary = tl.full([], -1, tl.int64)  # tokens with key > boundary stay, below it go, `ties` of it stay
    ties = tl.zeros([], dtype=tl.int64)
    if cut:
        # t1: the largest t whose weight above reaches the limit; every key <= t1 is dropped and every
        # key above it but the lowest present one is kept whole.
        lo = tl.full([], -1, tl.int64)
        hi = tl.full([], 4294967296, tl.int64)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _mass_above(row_ptr, V, temp, m, scale, kth, mid, HAS_TEMP, TILE).to(tl.float64) >= limit:
                lo = mid
            else:
                hi = mid
        boundary = tl.full([], 4294967296, tl.int64)
        for start in range(0, V, TILE):
            v = start + tl.arange(0, TILE)
            u = ukey(scaled_logits(row_ptr, v, V, temp, HAS_TEMP))
            boundary = tl.minimum(boundary, tl.min(tl.where((v < V) & (u > lo) & (u >= kth), u, 4294967296), 0))
        bits = (boundary - 2147483648).to(tl.int32)
        xb = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.float32, bitcast=True)
        above = _mass_above(row_ptr, V, temp, m, scale, kth, boundary, HAS_TEMP, TILE)
        ties = kept_ties(above, mass_weight(xb, m, scale), limit)
    lo = tl.maximum(kth, floor)
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], 0, tl.int64)
    seen = tl.zeros([], dtype=tl.int64)  # boundary-key tokens before this tile, in id order
    for start in range(0, V, TILE):
        v = start + tl.arange(0, TILE).to(tl.int64)
        x = scaled_logits(row_ptr, v, V, temp, HAS_TEMP)
        u = ukey(x)
        at = ((v < V) & (u == boundary)).to(tl.int64)
        rank = seen + tl.cumsum(at, axis=0) - at
        seen += tl.sum(at, axis=0)
        keep = (v < V) & (u >= lo) & ((u > boundary) | ((u == boundary) & (rank < ties)))
        s, i = _draw(words_ptr, row, v, x, keep, TILE)
        if s > best:
            best, best_i = s, i
    return best_i


@triton.jit(do_not_specialize=["x_ptr", "stride", "words_ptr", "temps_ptr", "top_k_ptr", "top_p_ptr", "V"])
def _finish_kernel(x_ptr, stride, words_ptr, temps_ptr, top_k_ptr, top_p_ptr, row_max_ptr, state_ptr, count_ptr,
                   cand_ptr, out_ptr, V, scale, CAP: tl.constexpr, HAS_TEMP: tl.constexpr, TILE: tl.constexpr):
    row = tl.program_id(0)
    n = tl.load(count_ptr + row)
    k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    m = tl.load(row_max_ptr + row)
    m = tl.where(m == float("-inf"), 0.0, m)  # a row of only -inf: every weight is 0
    floor = tl.load(state_ptr + row * STATE_WORDS + FLOOR_WORD)
    temp = 1.0
    if HAS_TEMP:
        temp = tl.load(temps_ptr + row)
    row_ptr = x_ptr + row.to(tl.int64) * stride
    if n <= CAP:
        i = tl.arange(0, CAP)
        key = tl.load(cand_ptr + row.to(tl.int64) * CAP + i, mask=i < n, other=_PAD)
        key = tl.sort(key, descending=True)
        valid = i < n
        low = tl.full([], 4294967295, tl.int64)
        v = tl.where(valid, low - (key & low), 0)
        u = (key >> 32) + 2147483648
        x = scaled_logits(row_ptr, v, V, temp, HAS_TEMP)
        # Fewer finite candidates than k (tau was -inf): the k-th value is -inf and every finite entry stays.
        kth = tl.max(tl.where(i == k - 1, u, 0), axis=0)
        keep = valid & (u >= kth)
        w = tl.where(keep, mass_weight(x, m, scale), 0)
        total = tl.sum(w, axis=0)
        before = tl.cumsum(w, axis=0) - w
        limit = top_p.to(tl.float64) * total.to(tl.float64)
        limit = tl.where((top_p >= 1.0) | (total == 0), float("inf"), limit)  # no cut: everything stays
        keep = keep & (before.to(tl.float64) < limit) & (u >= floor)
        best, best_i = _draw(words_ptr, row, v, x, keep, CAP)
        tl.store(out_ptr + row, tl.where(n == 0, 0, best_i))  # no finite entry: the reference's argmax, 0
    else:
        tl.store(out_ptr + row, _whole_row(row_ptr, words_ptr, row, V, temp, k, top_p, m, floor, scale,
                                           HAS_TEMP, TILE))


def small_k_gumbel_argmax(x: torch.Tensor, words: torch.Tensor, temps: torch.Tensor | None, top_k: torch.Tensor,
                          top_p: torch.Tensor, log_min_p: torch.Tensor, *, tile: int = 512, cap: int = 2048,
                          group: int | None = None) -> torch.Tensor:
    """`filtered_gumbel_argmax` (same arguments, same tokens) for rows that
    all have 0 < top_k < V, in four launches and a memset, reading about k
    tiles per row after the tile maxima. cap: candidate slots per row (a power
    of two); a row with more candidates >= tau takes the whole-row path."""
    from streamgemma.sampling.filters import mass_bits

    x, out = float32_rows(x, "small_k_gumbel_argmax")
    rows, vocab = x.shape
    if rows == 0:
        return out
    n_tiles = triton.cdiv(vocab, tile)
    words, top_k, top_p, log_min_p = (t.contiguous() for t in (words, top_k, top_p, log_min_p))
    has_temp = temps is not None
    temps = temps.contiguous() if has_temp else x
    if group is None:
        group = 1 if rows <= 16 else 4 if rows <= 64 else 8
    dev = x.device
    tile_max = torch.empty(rows, n_tiles, dtype=torch.float32, device=dev)
    row_max = torch.empty(rows, dtype=torch.float32, device=dev)
    state = torch.empty(rows, STATE_WORDS.value, dtype=torch.int64, device=dev)
    count = torch.zeros(rows, dtype=torch.int32, device=dev)
    cand = torch.empty(rows, cap, dtype=torch.int64, device=dev)
    tile_max_kernel[(rows, n_tiles)](x, x.stride(0), temps, tile_max, vocab, n_tiles, HAS_TEMP=has_temp, TILE=tile)
    bounds_kernel[(rows,)](tile_max, n_tiles, top_k, top_p, log_min_p, row_max, state, STATE_WORDS.value,
                           BLOCK_T=triton.next_power_of_2(n_tiles))
    _compact_kernel[(rows, triton.cdiv(n_tiles, group))](x, x.stride(0), temps, tile_max, state, count, cand, vocab,
                                                         n_tiles, CAP=cap, HAS_TEMP=has_temp, TILE=tile, GROUP=group)
    _finish_kernel[(rows,)](x, x.stride(0), words, temps, top_k, top_p, row_max, state, count, cand, out, vocab,
                            float(2 ** mass_bits(vocab)), CAP=cap, HAS_TEMP=has_temp, TILE=tile,
                            num_warps=8 if cap >= 1024 else 4)
    return out


def filtered_draw(x: torch.Tensor, words: torch.Tensor, temps: torch.Tensor | None, top_k: torch.Tensor,
                  top_p: torch.Tensor, log_min_p: torch.Tensor, *, has_top_k: bool = True, has_top_p: bool = True,
                  small_k: int = 0) -> torch.Tensor:
    """The filtered draw of `streamgemma.sampling.filters`: `small_k_gumbel_argmax`
    with `small_k` candidate slots where the host knows every row has a small
    top_k (`filters.small_k_slots`), else the radix pipeline
    `filtered_gumbel_argmax`. Same tokens either way."""
    if small_k:
        return small_k_gumbel_argmax(x, words, temps, top_k, top_p, log_min_p, cap=small_k)
    return filtered_gumbel_argmax(x, words, temps, top_k, top_p, log_min_p, has_top_k=has_top_k, has_top_p=has_top_p)
