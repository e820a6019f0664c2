"""Top-k, top-p and min-p of many rows without a sort, and the Gumbel-max draw
over the kept tokens: the CUDA form of `streamgemma.sampling.filters`, which
defines the kept set (and holds the PyTorch form these kernels are tested
against under the interpreter).

Each token's key is its scaled logit's float32 bits as an order-preserving
integer in [0, 2**32) (`ukey`). A row's k-th largest key, and the key of the
first token top_p drops, are found by a radix search over the keys, three
digits deep (11, 11 and 10 bits): per digit one pass of histograms over the
row (token counts; or integer masses and each bin's least weight, stored as
BIG - weight under an atomic max) and one program per row that picks the
digit. Integer atomics sum in any order to the same value, so the result does
not depend on scheduling. Then one pass draws: Philox noise and the argmax
over the kept tokens, the tokens tied at the top_p boundary kept by smallest
id through a count of them per tile.

Passes touch only tiles whose largest key can matter (the first pass takes
every tile's maximum): with top_k, the searches and the draw read about k
tiles per row, so a batch reads its logits about once. At small batch the
first digit's histograms have R replicas (tile % R picks one), so the
atomics of a whole 256,000-entry row do not queue on a few bins.

Launches, by what any row asks for: tile maxima and bounds 2, top_k 6,
top_p 7, the draw 2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gumbel_argmax import argmax_tiles_kernel, float32_rows, gumbel_score, tile_words

_BIG = tl.constexpr(1 << 62)  # a bin's least weight w is stored as _BIG - w (zero: an empty bin)
_NO_INDEX = tl.constexpr(2147483647)
# Per-row state, int64 words at the start of the row's work area.
_STATE_WORDS = tl.constexpr(16)
_TAU = tl.constexpr(0)  # key of the k-th largest tile maximum: no top_k token is below it
_FLOOR = tl.constexpr(1)  # key of the min_p floor
_K_PREFIX = tl.constexpr(2)  # top_k digits found so far; after the search, the k-th largest key
_K_ABOVE = tl.constexpr(3)  # tokens above the digits found so far
_P_PREFIX = tl.constexpr(4)  # top_p: likewise, the key of the first dropped token
_P_ABOVE = tl.constexpr(5)  # weight above the digits found so far
_P_STATE = tl.constexpr(6)  # 0 searching, 1 no cut (off, or nothing dropped), 2 cut found
_P_TIES = tl.constexpr(7)  # tokens kept at the boundary key
_P_TOTAL = tl.constexpr(8)  # weight of the top_k-kept tokens
# What `bounds_kernel` leaves in a row's state, for the pipelines that reuse it (`filter_smallk`).
TAU_WORD, FLOOR_WORD, STATE_WORDS = _TAU, _FLOOR, _STATE_WORDS
# Digits: (shift, bits) per level.
_DIGITS = ((21, 11), (10, 11), (0, 10))


@triton.jit
def ukey(x):
    """Order-preserving int64 key in [0, 2**32) of float32 x (-0.0 and 0.0 one key)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2147483648


@triton.jit
def scaled_logits(row_ptr, v, V, temp, HAS_TEMP: tl.constexpr):
    """x[v] / T (correctly rounded, as the reference's division); -inf past V."""
    x = tl.load(row_ptr + v, mask=v < V, other=float("-inf"))
    if HAS_TEMP:
        x = tl.math.div_rn(x, temp)
    return x


@triton.jit(do_not_specialize=["x_ptr", "stride", "temps_ptr", "V", "n_tiles"])
def tile_max_kernel(x_ptr, stride, temps_ptr, tile_max_ptr, V, n_tiles, HAS_TEMP: tl.constexpr,
                     TILE: tl.constexpr):
    row = tl.program_id(0)
    tile = tl.program_id(1)
    temp = 1.0
    if HAS_TEMP:
        temp = tl.load(temps_ptr + row)
    x = scaled_logits(x_ptr + row.to(tl.int64) * stride, tile * TILE + tl.arange(0, TILE), V, temp, HAS_TEMP)
    tl.store(tile_max_ptr + row * n_tiles + tile, tl.max(tl.where(x == 0.0, 0.0, x), axis=0))


@triton.jit(do_not_specialize=["n_tiles", "top_k_ptr", "top_p_ptr", "log_min_p_ptr", "row_words"])
def bounds_kernel(tile_max_ptr, n_tiles, top_k_ptr, top_p_ptr, log_min_p_ptr, row_max_ptr, work_ptr, row_words,
                   BLOCK_T: tl.constexpr):
    """Per row: the maximum, the min_p floor, the top_p state, and a lower bound
    of the k-th largest value (the k-th largest tile maximum: k tokens reach it)."""
    row = tl.program_id(0)
    state = work_ptr + row.to(tl.int64) * row_words
    t = tl.arange(0, BLOCK_T)
    maxima = tl.load(tile_max_ptr + row * n_tiles + t, mask=t < n_tiles, other=float("-inf"))
    m = tl.max(maxima, axis=0)
    tl.store(row_max_ptr + row, m)
    k = tl.load(top_k_ptr + row)
    tau = tl.full([], float("-inf"), tl.float32)
    if (k > 0) & (k <= n_tiles):
        # A bitonic sort of the row's tile maxima in registers (a pairwise count was 44 us at 500 tiles).
        tau = tl.max(tl.where(t == k - 1, tl.sort(maxima, descending=True), float("-inf")), axis=0)
    tl.store(state + _TAU, ukey(tau))
    tl.store(state + _FLOOR, ukey(m + tl.load(log_min_p_ptr + row)))
    tl.store(state + _P_STATE, tl.where(tl.load(top_p_ptr + row) < 1.0, 0, 1).to(tl.int64))


# The batch-dependent sizes (replicas, offsets) are runtime values: one compiled variant serves every batch.
@triton.jit(do_not_specialize=["x_ptr", "stride", "temps_ptr", "top_k_ptr", "row_words", "V", "n_tiles",
                               "replicas", "offset", "hist_words"])
def _hist_kernel(x_ptr, stride, temps_ptr, tile_max_ptr, row_max_ptr, top_k_ptr, work_ptr, row_words, V, n_tiles,
                 scale, replicas, offset, hist_words, LEVEL: tl.constexpr, MASS: tl.constexpr, SHIFT: tl.constexpr,
                 BITS: tl.constexpr, HAS_TEMP: tl.constexpr, TILE: tl.constexpr, GROUP: tl.constexpr):
    """One digit's histograms of the row's tokens that can matter: top_k counts
    (MASS false) or top_p weights and least weights (MASS true)."""
    row = tl.program_id(0)
    state = work_ptr + row.to(tl.int64) * row_words
    if MASS:
        active = tl.load(state + _P_STATE) == 0
        lo = tl.load(state + _K_PREFIX)  # the k-th largest key (0 without top_k): top_k drops what is below
        prefix = tl.load(state + _P_PREFIX)
        hist = state + _STATE_WORDS + hist_words + offset
    else:
        active = tl.load(top_k_ptr + row) > 0
        lo = tl.load(state + _TAU)
        prefix = tl.load(state + _K_PREFIX)
        hist = state + _STATE_WORDS + offset
    for g in range(GROUP):
        tile = tl.program_id(1) * GROUP + g
        if LEVEL == 0:
            at_hist = hist + (tile % replicas) * 2048
        else:
            at_hist = hist
        if (tile < n_tiles) & active:
            if ukey(tl.load(tile_max_ptr + row * n_tiles + tile)) >= lo:
                _hist_tile(x_ptr, stride, temps_ptr, row_max_ptr, row, tile, at_hist, lo, prefix, V, scale,
                           hist_words, LEVEL, MASS, SHIFT, BITS, HAS_TEMP, TILE)


@triton.jit
def _hist_tile(x_ptr, stride, temps_ptr, row_max_ptr, row, tile, hist, lo, prefix, V, scale, hist_words,
               LEVEL: tl.constexpr, MASS: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr,
               HAS_TEMP: tl.constexpr, TILE: tl.constexpr):
    """One tile's digit counts or weights (see `_hist_kernel`)."""
    v = tile * TILE + tl.arange(0, TILE)
    temp = 1.0
    if HAS_TEMP:
        temp = tl.load(temps_ptr + row)
    x = scaled_logits(x_ptr + row.to(tl.int64) * stride, v, V, temp, HAS_TEMP)
    u = ukey(x)
    take = (v < V) & (u >= lo)
    if LEVEL > 0:
        take = take & ((u >> (SHIFT + BITS)) == prefix)
    at = hist + ((u >> SHIFT) & ((1 << BITS) - 1))
    if MASS:
        m = tl.load(row_max_ptr + row)
        m = tl.where(m == float("-inf"), 0.0, m)  # a row of only -inf: every weight is 0 (no inf - inf)
        w = mass_weight(x, m, scale)
        tl.atomic_add(at, w, mask=take)
        tl.atomic_max(at + hist_words, -(w - _BIG), mask=take)
    else:
        tl.atomic_add(at, tl.full([TILE], 1, tl.int64), mask=take)


@triton.jit
def mass_weight(x, m, scale):
    """round(exp(x - m) * scale) in float64 (`filters.mass_weights`; m finite), int64."""
    return (tl.exp(x.to(tl.float64) - m.to(tl.float64)) * scale + 0.5).to(tl.int64)


@triton.jit
def kept_ties(above, w, limit):
    """How many tokens tied at the boundary key stay: the j >= 0 with
    float64(above + j * w) < limit (w: their common weight)."""
    j = tl.zeros([], dtype=tl.int64)
    if w > 0:
        guess = tl.maximum((limit - above.to(tl.float64)) / w.to(tl.float64), 0.0)
        j = tl.minimum(guess, 4294967296.0).to(tl.int64)
        while (j > 0) & ((above + (j - 1) * w).to(tl.float64) >= limit):
            j -= 1
        while (above + j * w).to(tl.float64) < limit:
            j += 1
    return j


@triton.jit(do_not_specialize=["row_words", "hist_words"])
def _fold_kernel(work_ptr, row_words, hist_words, COPIES: tl.constexpr, MASS: tl.constexpr, CHUNK: tl.constexpr):
    """Sum the first digit's replicated histograms into the first copy, over
    many programs: one program per row reading them all took ~10 us at batch 1."""
    row = tl.program_id(0)
    b = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    hist = work_ptr + row.to(tl.int64) * row_words + _STATE_WORDS
    if MASS:
        hist += hist_words
    total = tl.load(hist + b)
    for r in tl.static_range(1, COPIES):
        total += tl.load(hist + r * 2048 + b)
    tl.store(hist + b, total)
    if MASS:  # least weights, stored as _BIG - w: the largest stored value
        least = tl.load(hist + hist_words + b)
        for r in tl.static_range(1, COPIES):
            least = tl.maximum(least, tl.load(hist + hist_words + r * 2048 + b))
        tl.store(hist + hist_words + b, least)


# COPIES is a constant so the loads of the replicas are unrolled and in flight together (a loop was ~7 us).
@triton.jit(do_not_specialize=["top_k_ptr", "top_p_ptr", "row_words", "offset", "hist_words"])
def _select_kernel(top_k_ptr, top_p_ptr, work_ptr, row_words, offset, hist_words, COPIES: tl.constexpr,
                   LEVEL: tl.constexpr, MASS: tl.constexpr, BITS: tl.constexpr):
    """Per row: the digit of this level (the highest bin holding the k-th token,
    or a token top_p drops), and at the last level the key itself."""
    row = tl.program_id(0)
    state = work_ptr + row.to(tl.int64) * row_words
    b = tl.arange(0, 1 << BITS).to(tl.int64)
    if MASS:
        hist = state + _STATE_WORDS + hist_words + offset
        if tl.load(state + _P_STATE) == 0:
            mass = tl.zeros([1 << BITS], dtype=tl.int64)
            negw = tl.zeros([1 << BITS], dtype=tl.int64)
            for r in tl.static_range(COPIES):
                mass += tl.load(hist + r * 2048 + b)
                negw = tl.maximum(negw, tl.load(hist + hist_words + r * 2048 + b))
            if LEVEL == 0:
                above = tl.zeros([], dtype=tl.int64)
                total = tl.sum(mass, axis=0)
                tl.store(state + _P_TOTAL, total)
            else:
                above = tl.load(state + _P_ABOVE)
                total = tl.load(state + _P_TOTAL)
            limit = tl.load(top_p_ptr + row).to(tl.float64) * total.to(tl.float64)
            higher = tl.sum(mass, axis=0) - tl.cumsum(mass, axis=0)  # weight of the bins above each
            last = above + higher + mass + (negw - _BIG)  # the weight before each bin's last token
            pick = tl.max(tl.where((negw > 0) & (last.to(tl.float64) >= limit), b, -1), axis=0)
            if (total == 0) | (pick < 0):
                tl.store(state + _P_STATE, 1)  # top_p drops nothing
            else:
                above += tl.sum(tl.where(b > pick, mass, 0), axis=0)
                tl.store(state + _P_PREFIX, (tl.load(state + _P_PREFIX) << BITS) | pick)
                tl.store(state + _P_ABOVE, above)
                if LEVEL == 2:  # one key per bin: its tokens all weigh its least weight
                    w = -(tl.sum(tl.where(b == pick, negw, 0), axis=0) - _BIG)
                    tl.store(state + _P_TIES, kept_ties(above, w, limit))
                    tl.store(state + _P_STATE, 2)
    else:
        k = tl.load(top_k_ptr + row)
        if k > 0:
            hist = state + _STATE_WORDS + offset
            count = tl.zeros([1 << BITS], dtype=tl.int64)
            for r in tl.static_range(COPIES):
                count += tl.load(hist + r * 2048 + b)
            above = tl.load(state + _K_ABOVE)
            at_or_above = tl.sum(count, axis=0) - tl.cumsum(count, axis=0) + count
            pick = tl.max(tl.where(above + at_or_above >= k, b, -1), axis=0)
            tl.store(state + _K_ABOVE, above + tl.sum(tl.where(b > pick, count, 0), axis=0))
            tl.store(state + _K_PREFIX, (tl.load(state + _K_PREFIX) << BITS) | pick)


@triton.jit(do_not_specialize=["x_ptr", "stride", "temps_ptr", "row_words", "V", "n_tiles"])
def _tie_count_kernel(x_ptr, stride, temps_ptr, tile_max_ptr, work_ptr, row_words, ties_ptr, V, n_tiles,
                      HAS_TEMP: tl.constexpr, TILE: tl.constexpr, GROUP: tl.constexpr):
    """Per tile, the tokens at the row's top_p boundary key (where some of them stay)."""
    row = tl.program_id(0)
    state = work_ptr + row.to(tl.int64) * row_words
    boundary = tl.load(state + _P_PREFIX)
    wanted = (tl.load(state + _P_STATE) == 2) & (tl.load(state + _P_TIES) > 0)
    temp = 1.0
    if HAS_TEMP:
        temp = tl.load(temps_ptr + row)
    for g in range(GROUP):
        tile = tl.program_id(1) * GROUP + g
        if tile < n_tiles:
            n = tl.zeros([], dtype=tl.int32)
            if wanted & (ukey(tl.load(tile_max_ptr + row * n_tiles + tile)) >= boundary):
                v = tile * TILE + tl.arange(0, TILE)
                x = scaled_logits(x_ptr + row.to(tl.int64) * stride, v, V, temp, HAS_TEMP)
                n = tl.sum(((ukey(x) == boundary) & (v < V)).to(tl.int32), axis=0)
            tl.store(ties_ptr + row * n_tiles + tile, n)


@triton.jit
def _lane(row_ptr, v, V, temp, lo, HAS_TEMP: tl.constexpr):
    """(scaled x, key, kept by the key bounds) of one lane's entries."""
    x = scaled_logits(row_ptr, v, V, temp, HAS_TEMP)
    u = ukey(x)
    return x, u, (v < V) & (u >= lo)


@triton.jit(do_not_specialize=["x_ptr", "stride", "words_ptr", "temps_ptr", "row_words", "V", "n_tiles"])
def _draw_kernel(x_ptr, stride, words_ptr, temps_ptr, tile_max_ptr, work_ptr, row_words, ties_ptr, best_ptr,
                 best_idx_ptr, V, n_tiles, HAS_TEMP: tl.constexpr, HAS_TOP_P: tl.constexpr, BLOCK: tl.constexpr,
                 BLOCK_T: tl.constexpr, GROUP: tl.constexpr):
    """Each tile's best kept score x / T - log(-log(u)) and its smallest index
    (the lane layout of `gumbel_argmax`); tiles with nothing kept skip Philox."""
    row = tl.program_id(0)
    state = work_ptr + row.to(tl.int64) * row_words
    lo = tl.maximum(tl.load(state + _K_PREFIX), tl.load(state + _FLOOR))
    cut = tl.load(state + _P_STATE) == 2
    boundary = tl.load(state + _P_PREFIX)
    ties = tl.load(state + _P_TIES)
    lo = tl.where(cut, tl.maximum(lo, tl.where(ties > 0, boundary, boundary + 1)), lo)
    for g in range(GROUP):
        tile = tl.program_id(1) * GROUP + g
        if tile < n_tiles:
            best_m = tl.full([], float("-inf"), tl.float32)
            best_i = tile * 4 * BLOCK
            if ukey(tl.load(tile_max_ptr + row * n_tiles + tile)) >= lo:
                j = tile * BLOCK + tl.arange(0, BLOCK)  # Philox call j serves entries 4j .. 4j + 3
                w0, w1, w2, w3 = tile_words(words_ptr, row, j, BLOCK)
                temp = 1.0
                if HAS_TEMP:
                    temp = tl.load(temps_ptr + row)
                row_ptr = x_ptr + row.to(tl.int64) * stride
                v = 4 * j
                x0, u0, keep0 = _lane(row_ptr, v, V, temp, lo, HAS_TEMP)
                x1, u1, keep1 = _lane(row_ptr, v + 1, V, temp, lo, HAS_TEMP)
                x2, u2, keep2 = _lane(row_ptr, v + 2, V, temp, lo, HAS_TEMP)
                x3, u3, keep3 = _lane(row_ptr, v + 3, V, temp, lo, HAS_TEMP)
                if HAS_TOP_P:
                    if cut & (ties > 0):  # tokens at the boundary key stay in id order while `ties` last
                        t0 = (keep0 & (u0 == boundary)).to(tl.int64)
                        t1 = (keep1 & (u1 == boundary)).to(tl.int64)
                        t2 = (keep2 & (u2 == boundary)).to(tl.int64)
                        t3 = (keep3 & (u3 == boundary)).to(tl.int64)
                        t = tl.arange(0, BLOCK_T)
                        earlier = tl.sum(tl.load(ties_ptr + row * n_tiles + t, mask=t < tile, other=0), axis=0)
                        per_call = t0 + t1 + t2 + t3
                        rank = earlier.to(tl.int64) + tl.cumsum(per_call, axis=0) - per_call
                        keep0 = keep0 & ((u0 != boundary) | (rank < ties))
                        keep1 = keep1 & ((u1 != boundary) | (rank + t0 < ties))
                        keep2 = keep2 & ((u2 != boundary) | (rank + t0 + t1 < ties))
                        keep3 = keep3 & ((u3 != boundary) | (rank + t0 + t1 + t2 < ties))
                # Lanes in increasing v: a later lane takes an entry only when strictly greater.
                best = tl.where(keep0, gumbel_score(x0, w0), float("-inf"))
                best_idx = v
                s = tl.where(keep1, gumbel_score(x1, w1), float("-inf"))
                best_idx = tl.where(s > best, v + 1, best_idx)
                best = tl.maximum(best, s)
                s = tl.where(keep2, gumbel_score(x2, w2), float("-inf"))
                best_idx = tl.where(s > best, v + 2, best_idx)
                best = tl.maximum(best, s)
                s = tl.where(keep3, gumbel_score(x3, w3), float("-inf"))
                best_idx = tl.where(s > best, v + 3, best_idx)
                best = tl.maximum(best, s)
                best_m = tl.max(best, axis=0)
                best_i = tl.min(tl.where(best == best_m, best_idx, _NO_INDEX), axis=0)
            tl.store(best_ptr + row * n_tiles + tile, best_m)
            tl.store(best_idx_ptr + row * n_tiles + tile, best_i)


_MAX_TILES = 1 << 14


def filtered_gumbel_argmax(x: torch.Tensor, words: torch.Tensor, temps: torch.Tensor | None, top_k: torch.Tensor,
                           top_p: torch.Tensor, log_min_p: torch.Tensor, *, has_top_k: bool = True,
                           has_top_p: bool = True, tile: int = 512, replicas: int | None = None,
                           group: int | None = None) -> torch.Tensor:
    """The sampled token of every row (int64 [S], no host synchronisation): the
    Gumbel-max draw over the tokens `streamgemma.sampling.filters.keep_mask`
    keeps of x / temps.

    x: float32 [S, V], any row stride, column stride 1. words: int64 [S, 4]
    (`philox.stream_words`). temps: float32 [S] or None. top_k: int64 [S] (0:
    off; must be < V), top_p: float32 [S] (1: off), log_min_p: float32 [S]
    (-inf: off). has_top_k / has_top_p: False skips that search (every row
    must then have it off). tile: entries per program (a power of two >= 16;
    tests use small ones); replicas: copies of the first digit's histograms;
    group: tiles per program of the passes that skip most tiles (defaults:
    by batch)."""
    from streamgemma.sampling.filters import mass_bits

    x, out = float32_rows(x, "filtered_gumbel_argmax")
    rows, vocab = x.shape
    if rows == 0:
        return out
    n_tiles = triton.cdiv(vocab, tile)
    if n_tiles > _MAX_TILES:
        raise ValueError(f"vocabulary {vocab} needs {n_tiles} tiles of {tile}; at most {_MAX_TILES}")
    if replicas is None:  # spreads a few rows' atomics; a big batch has rows enough
        replicas = 16 if rows <= 4 else 4 if rows <= 32 else 1
    if group is None:  # a program that skips its tile still costs ~0.6 ns: 80 us a pass at 256 x 500 tiles
        group = 1 if rows <= 16 else 4 if rows <= 64 else 8
    words, top_k, top_p, log_min_p = (t.contiguous() for t in (words, top_k, top_p, log_min_p))
    has_temp = temps is not None
    temps = temps.contiguous() if has_temp else x
    hist_words = 2048 * replicas + 3072  # the three digits' bins, the first digit's in `replicas` copies
    row_words = 16 + 3 * hist_words  # state, top_k counts, top_p weights, least weights
    dev = x.device
    tile_max = torch.empty(rows, n_tiles, dtype=torch.float32, device=dev)
    row_max = torch.empty(rows, dtype=torch.float32, device=dev)
    work = torch.zeros(rows, row_words, dtype=torch.int64, device=dev)
    best = torch.empty(rows, n_tiles, dtype=torch.float32, device=dev)
    best_idx = torch.empty(rows, n_tiles, dtype=torch.int32, device=dev)
    ties = torch.empty(rows, n_tiles, dtype=torch.int32, device=dev) if has_top_p else best_idx
    block_t = triton.next_power_of_2(n_tiles)
    grid = (rows, n_tiles)
    grouped = (rows, triton.cdiv(n_tiles, group))
    tile_max_kernel[grid](x, x.stride(0), temps, tile_max, vocab, n_tiles, HAS_TEMP=has_temp, TILE=tile)
    bounds_kernel[(rows,)](tile_max, n_tiles, top_k, top_p, log_min_p, row_max, work, row_words, BLOCK_T=block_t)
    scale = float(2 ** mass_bits(vocab))
    for mass, wanted in ((False, has_top_k), (True, has_top_p)):
        for level, (shift, bits) in enumerate(_DIGITS if wanted else ()):
            offset = (0, 2048 * replicas, 2048 * replicas + 2048)[level]
            _hist_kernel[grouped](x, x.stride(0), temps, tile_max, row_max, top_k, work, row_words, vocab, n_tiles,
                               scale, replicas, offset, hist_words, LEVEL=level, MASS=mass, SHIFT=shift, BITS=bits,
                               HAS_TEMP=has_temp, TILE=tile, GROUP=group)
            copies = replicas if level == 0 else 1
            if copies > 1 and rows <= 4:
                _fold_kernel[(rows, 16)](work, row_words, hist_words, COPIES=copies, MASS=mass, CHUNK=128)
                copies = 1
            _select_kernel[(rows,)](top_k, top_p, work, row_words, offset, hist_words, COPIES=copies, LEVEL=level,
                                    MASS=mass, BITS=bits, num_warps=8 if copies > 4 else 4)
    if has_top_p:
        _tie_count_kernel[grouped](x, x.stride(0), temps, tile_max, work, row_words, ties, vocab, n_tiles,
                                   HAS_TEMP=has_temp, TILE=tile, GROUP=group)
    _draw_kernel[grouped](x, x.stride(0), words, temps, tile_max, work, row_words, ties, best, best_idx, vocab,
                          n_tiles, HAS_TEMP=has_temp, HAS_TOP_P=has_top_p, BLOCK=tile // 4, BLOCK_T=block_t,
                          GROUP=group)
    argmax_tiles_kernel[(rows,)](best, best_idx, out, n_tiles, BLOCK_T=block_t,
                                 num_warps=4 if n_tiles > 256 else 1)
    return out
