"""The draw of the sort-free filters (`sampling_filters`), and what their
search shares with it: the order-preserving keys, the per-row state words,
the ticket of a fused pass.

The draw: each tile's best kept score x / T - log(-log(u)) and its smallest
index (the lane layout of `gumbel_argmax`), then the argmax over the tiles.
Tokens tied at the top_p boundary key stay by smallest id while the row's
kept count `ties` lasts. Unfused, a pass before the draw counts them per
tile (`tie_count_kernel`) and each tile ranks its own. Fused (small batch),
each tile reports its best with every boundary token and without any, and
their count; the last program to finish then takes, per tile, the one its
rank range allows (all of them before `ties`, none after) and recomputes the
one tile the count straddles: the same tokens, a launch fewer.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .gumbel_argmax import gumbel_score, tile_words

NO_INDEX = tl.constexpr(2147483647)
# Per-row state, int64 words at the start of the row's work area.
STATE_WORDS = tl.constexpr(16)
TAU = tl.constexpr(0)  # key of the k-th largest tile maximum: no top_k token is below it
FLOOR = tl.constexpr(1)  # key of the min_p floor
K_PREFIX = tl.constexpr(2)  # top_k digits found so far; after the search, the k-th largest key
K_ABOVE = tl.constexpr(3)  # tokens above the digits found so far
P_PREFIX = tl.constexpr(4)  # top_p: likewise, the key of the first dropped token
P_ABOVE = tl.constexpr(5)  # weight above the digits found so far
P_STATE = tl.constexpr(6)  # 0 searching, 1 no cut (off, or nothing dropped), 2 cut found
P_TIES = tl.constexpr(7)  # tokens kept at the boundary key
P_TOTAL = tl.constexpr(8)  # weight of the top_k-kept tokens
COUNTER_WORDS = 32  # int32 ticket counters per row of the fused pipeline: the pass's, then one per replica
COUNTERS = tl.constexpr(COUNTER_WORDS)


@triton.jit
def ukey(x):
    """Order-preserving int64 key in [0, 2**32) of float32 x (-0.0 and 0.0 one key)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2147483648


@triton.jit
def scaled(row_ptr, v, V, temp, HAS_TEMP: tl.constexpr):
    """x[v] / T (correctly rounded, as the reference's division); -inf past V."""
    x = tl.load(row_ptr + v, mask=v < V, other=float("-inf"))
    if HAS_TEMP:
        x = tl.math.div_rn(x, temp)
    return x


@triton.jit
def ticket(counter):
    """The arrival number of this program at `counter` (the last one resets it to 0 for the next pass, call or
    replay). The barrier puts every thread's writes before the acq_rel atomic, which releases them to the last."""
    tl.debug_barrier()
    return tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")


@triton.jit(do_not_specialize=["x_ptr", "stride", "temps_ptr", "row_words", "V", "n_tiles"])
def tie_count_kernel(x_ptr, stride, temps_ptr, tile_max_ptr, work_ptr, row_words, ties_ptr, V, n_tiles,
                     HAS_TEMP: tl.constexpr, TILE: tl.constexpr, GROUP: tl.constexpr):
    """Per tile, the tokens at the row's top_p boundary key (where some of them stay)."""
    row = tl.program_id(0)
    state = work_ptr + row.to(tl.int64) * row_words
    boundary = tl.load(state + P_PREFIX)
    wanted = (tl.load(state + P_STATE) == 2) & (tl.load(state + P_TIES) > 0)
    temp = 1.0
    if HAS_TEMP:
        temp = tl.load(temps_ptr + row)
    for g in range(GROUP):
        tile = tl.program_id(1) * GROUP + g
        if tile < n_tiles:
            n = tl.zeros([], dtype=tl.int32)
            if wanted & (ukey(tl.load(tile_max_ptr + row * n_tiles + tile)) >= boundary):
                v = tile * TILE + tl.arange(0, TILE)
                x = scaled(x_ptr + row.to(tl.int64) * stride, v, V, temp, HAS_TEMP)
                n = tl.sum(((ukey(x) == boundary) & (v < V)).to(tl.int32), axis=0)
            tl.store(ties_ptr + row * n_tiles + tile, n)


@triton.jit
def _lanes(x_ptr, stride, words_ptr, temps_ptr, row, tile, V, lo, HAS_TEMP: tl.constexpr, BLOCK: tl.constexpr):
    """A tile's entries v = 4j + l (Philox call j, lane l): per lane its score,
    key, and whether the key bounds keep it."""
    j = tile * BLOCK + tl.arange(0, BLOCK)  # Philox call j serves entries 4j .. 4j + 3
    w0, w1, w2, w3 = tile_words(words_ptr, row, j, BLOCK)
    temp = 1.0
    if HAS_TEMP:
        temp = tl.load(temps_ptr + row)
    row_ptr = x_ptr + row.to(tl.int64) * stride
    v = 4 * j
    x0 = scaled(row_ptr, v, V, temp, HAS_TEMP)
    x1 = scaled(row_ptr, v + 1, V, temp, HAS_TEMP)
    x2 = scaled(row_ptr, v + 2, V, temp, HAS_TEMP)
    x3 = scaled(row_ptr, v + 3, V, temp, HAS_TEMP)
    u0, u1, u2, u3 = ukey(x0), ukey(x1), ukey(x2), ukey(x3)
    return (v, gumbel_score(x0, w0), gumbel_score(x1, w1), gumbel_score(x2, w2), gumbel_score(x3, w3), u0, u1, u2, u3,
            (v < V) & (u0 >= lo), (v + 1 < V) & (u1 >= lo), (v + 2 < V) & (u2 >= lo), (v + 3 < V) & (u3 >= lo))


@triton.jit
def _best(v, s0, s1, s2, s3, k0, k1, k2, k3):
    """(best kept score, its smallest index) of a tile; (-inf, the tile's first
    index) when nothing kept scores above -inf."""
    # Lanes in increasing v: a later lane takes an entry only when strictly greater.
    best = tl.where(k0, s0, float("-inf"))
    best_idx = v
    s = tl.where(k1, s1, float("-inf"))
    best_idx = tl.where(s > best, v + 1, best_idx)
    best = tl.maximum(best, s)
    s = tl.where(k2, s2, float("-inf"))
    best_idx = tl.where(s > best, v + 2, best_idx)
    best = tl.maximum(best, s)
    s = tl.where(k3, s3, float("-inf"))
    best_idx = tl.where(s > best, v + 3, best_idx)
    best = tl.maximum(best, s)
    best_m = tl.max(best, axis=0)
    return best_m, tl.min(tl.where(best == best_m, best_idx, NO_INDEX), axis=0)


@triton.jit
def _ranked_best(v, s0, s1, s2, s3, u0, u1, u2, u3, k0, k1, k2, k3, boundary, ties, earlier):
    """`_best` with the tile's boundary-key tokens kept in id order while
    `ties` last (`earlier` of them in the tiles before)."""
    t0 = (k0 & (u0 == boundary)).to(tl.int64)
    t1 = (k1 & (u1 == boundary)).to(tl.int64)
    t2 = (k2 & (u2 == boundary)).to(tl.int64)
    t3 = (k3 & (u3 == boundary)).to(tl.int64)
    per_call = t0 + t1 + t2 + t3
    rank = earlier.to(tl.int64) + tl.cumsum(per_call, axis=0) - per_call
    k0 = k0 & ((u0 != boundary) | (rank < ties))
    k1 = k1 & ((u1 != boundary) | (rank + t0 < ties))
    k2 = k2 & ((u2 != boundary) | (rank + t0 + t1 < ties))
    k3 = k3 & ((u3 != boundary) | (rank + t0 + t1 + t2 < ties))
    return _best(v, s0, s1, s2, s3, k0, k1, k2, k3)


@triton.jit(do_not_specialize=["x_ptr", "stride", "words_ptr", "temps_ptr", "row_words", "V", "n_tiles"])
def draw_kernel(x_ptr, stride, words_ptr, temps_ptr, tile_max_ptr, work_ptr, row_words, ties_ptr, best_ptr,
                best_idx_ptr, counters_ptr, out_ptr, V, n_tiles, HAS_TEMP: tl.constexpr, HAS_TOP_P: tl.constexpr,
                BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, GROUP: tl.constexpr, FUSED: tl.constexpr):
    """Each tile's (best, index) (tiles with nothing kept skip Philox). Unfused:
    ranked by the tie counts in ties_ptr; `argmax_tiles_kernel` follows.
    FUSED: with top_p, best_ptr / best_idx_ptr hold [2, S, n_tiles] (with every
    boundary token, without any) and ties_ptr gets the counts; the last program
    to finish picks per tile and writes the row's token to out_ptr."""
    row = tl.program_id(0)
    state = work_ptr + row.to(tl.int64) * row_words
    lo = tl.maximum(tl.load(state + K_PREFIX), tl.load(state + FLOOR))
    cut = tl.load(state + P_STATE) == 2
    boundary = tl.load(state + P_PREFIX)
    ties = tl.load(state + P_TIES)
    lo = tl.where(cut, tl.maximum(lo, tl.where(ties > 0, boundary, boundary + 1)), lo)
    ranked = cut & (ties > 0)  # tokens at the boundary key stay in id order while `ties` last
    other = n_tiles * tl.num_programs(0)  # fused: from the with-every-tie half to the without-any half
    for g in range(GROUP):
        tile = tl.program_id(1) * GROUP + g
        if tile < n_tiles:
            at = row * n_tiles + tile
            best_m = tl.full([], float("-inf"), tl.float32)
            best_i = tile * 4 * BLOCK
            no_tie_m, no_tie_i, count = best_m, best_i, tl.zeros([], dtype=tl.int32)
            if ukey(tl.load(tile_max_ptr + at)) >= lo:
                v, s0, s1, s2, s3, u0, u1, u2, u3, k0, k1, k2, k3 = _lanes(
                    x_ptr, stride, words_ptr, temps_ptr, row, tile, V, lo, HAS_TEMP, BLOCK)
                if HAS_TOP_P and not FUSED:
                    if ranked:
                        t = tl.arange(0, BLOCK_T)
                        earlier = tl.sum(tl.load(ties_ptr + row * n_tiles + t, mask=t < tile, other=0), axis=0)
                        best_m, best_i = _ranked_best(v, s0, s1, s2, s3, u0, u1, u2, u3, k0, k1, k2, k3, boundary,
                                                      ties, earlier)
                    else:
                        best_m, best_i = _best(v, s0, s1, s2, s3, k0, k1, k2, k3)
                else:
                    best_m, best_i = _best(v, s0, s1, s2, s3, k0, k1, k2, k3)
                    no_tie_m, no_tie_i = best_m, best_i
                    if HAS_TOP_P:
                        if ranked:
                            b0, b1 = k0 & (u0 == boundary), k1 & (u1 == boundary)
                            b2, b3 = k2 & (u2 == boundary), k3 & (u3 == boundary)
                            count = tl.sum(b0.to(tl.int32) + b1.to(tl.int32) + b2.to(tl.int32) + b3.to(tl.int32), 0)
                            no_tie_m, no_tie_i = _best(v, s0, s1, s2, s3, k0 & ~b0, k1 & ~b1, k2 & ~b2, k3 & ~b3)
            tl.store(best_ptr + at, best_m)
            tl.store(best_idx_ptr + at, best_i)
            if FUSED and HAS_TOP_P:
                tl.store(best_ptr + other + at, no_tie_m)
                tl.store(best_idx_ptr + other + at, no_tie_i)
                tl.store(ties_ptr + at, count)
    if FUSED:
        ctr = counters_ptr + row * COUNTERS
        if ticket(ctr) == tl.num_programs(1) - 1:
            tl.store(ctr, 0)
            _pick(x_ptr, stride, words_ptr, temps_ptr, ties_ptr, best_ptr, best_idx_ptr, out_ptr, row, V, n_tiles,
                  other, lo, ranked, boundary, ties, HAS_TEMP, HAS_TOP_P, BLOCK, BLOCK_T)


@triton.jit
def _pick(x_ptr, stride, words_ptr, temps_ptr, ties_ptr, best_ptr, best_idx_ptr, out_ptr, row, V, n_tiles, other, lo,
          ranked, boundary, ties, HAS_TEMP: tl.constexpr, HAS_TOP_P: tl.constexpr, BLOCK: tl.constexpr,
          BLOCK_T: tl.constexpr):
    """The fused draw's last step: the row's token, the smallest index among the
    best tiles (as `argmax_tiles_kernel`). .cg loads: other programs wrote them."""
    t = tl.arange(0, BLOCK_T)
    mask = t < n_tiles
    at = row * n_tiles + t
    m = tl.load(best_ptr + at, mask=mask, other=float("-inf"), cache_modifier=".cg")
    idx = tl.load(best_idx_ptr + at, mask=mask, other=NO_INDEX, cache_modifier=".cg")
    if HAS_TOP_P:
        if ranked:
            count = tl.load(ties_ptr + at, mask=mask, other=0, cache_modifier=".cg").to(tl.int64)
            earlier = tl.cumsum(count, axis=0) - count
            every = earlier + count <= ties  # all of the tile's boundary tokens stay; else none, or some
            m = tl.where(every, m, tl.load(best_ptr + other + at, mask=mask, other=float("-inf"), cache_modifier=".cg"))
            idx = tl.where(every, idx, tl.load(best_idx_ptr + other + at, mask=mask, other=NO_INDEX,
                                               cache_modifier=".cg"))
            some = tl.max(tl.where(mask & (earlier < ties) & (earlier + count > ties), t, -1), axis=0)
            if some >= 0:  # at most one tile: the one where the kept count runs out
                v, s0, s1, s2, s3, u0, u1, u2, u3, k0, k1, k2, k3 = _lanes(
                    x_ptr, stride, words_ptr, temps_ptr, row, some, V, lo, HAS_TEMP, BLOCK)
                some_m, some_i = _ranked_best(v, s0, s1, s2, s3, u0, u1, u2, u3, k0, k1, k2, k3, boundary, ties,
                                              tl.sum(tl.where(t == some, earlier, 0), axis=0))
                m = tl.where(t == some, some_m, m)
                idx = tl.where(t == some, some_i, idx)
    best = tl.max(m, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(mask & (m == best), idx, NO_INDEX), axis=0).to(tl.int64))
