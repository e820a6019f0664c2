"""The pieces both fused GEMV kernels share (`gemv.py`, CUDA-core FMAs;
`gemv_tc.py`, tensor-core MMAs): where the input rows come from (the
prologue), the weight tiles, the conv epilogue's inputs, the per-feature
vectors, and the epilogue that turns a tile's products into the stored rows.
One copy of each, so the two kernels keep the same row operations and the
same rounding points (see gemv.py's docstring)."""

from __future__ import annotations

from types import MappingProxyType

import triton
import triton.language as tl

from .pdl import gdc_launch_dependents, gdc_wait
from .recurrent_decode import _gelu_tanh

# epilogues
PLAIN = tl.constexpr(0)
GEGLU = tl.constexpr(1)
CONV = tl.constexpr(2)
SOFTCAP = tl.constexpr(3)
# where the prologue's input rows come from
SRC_X = tl.constexpr(0)  # src[b] (+ delta[b]), normalised if NORM
SRC_TOKENS = tl.constexpr(1)  # src[token[b]] * emb_scale (the embedding table), normalised

EPILOGUES = MappingProxyType({"plain": 0, "geglu": 1, "conv": 2, "softcap": 3})


@triton.jit
def tile_indices(tile, B, N, K, w_ptr, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """A program's rows [BB] (and which are live), its output features n [BN]
    (and which exist), the K tile's column offsets [BK], and the rows of the
    weight it reads: the features' and, for GeGLU, the up features' (N + n of
    the [2N, K] gate|up weight)."""
    rows = tl.arange(0, BB)
    n = tile * BN + tl.arange(0, BN)
    w_rows = w_ptr + n[:, None].to(tl.int64) * K
    return rows, rows < B, n, n < N, tl.arange(0, BK), w_rows, w_rows + N * K


@triton.jit
def input_tile(src_ptr, tok_ptr, emb_scale, tscale_ptr, delta_ptr, nscale_ptr, rows, rmask, k, K,
               SRC: tl.constexpr, SRC_SCALED: tl.constexpr, HAS_DELTA: tl.constexpr, NORM: tl.constexpr):
    """Columns k of the product's input: with NORM the residual stream [BB, BK] in
    the model dtype (what add_rmsnorm stores) and the norm scale [BK]; without,
    the input rows [BB, BK] as stored (and a placeholder scale). SRC_SCALED: the
    embedding table is quantized, its rows times tscale[token] (then rounded to
    the model dtype, as the reference's dequantize does); above 1, the table
    is int4 ([V, K / 2] bytes, two nibbles each, low first) with a scale per
    SRC_SCALED columns (tscale [V, K / SRC_SCALED])."""
    kmask = k < K
    m = rmask[:, None] & kmask[None, :]
    if NORM:
        if SRC == SRC_TOKENS:
            act = nscale_ptr.dtype.element_ty  # the model dtype (the table may be quantized)
            tok = tl.load(tok_ptr + rows, mask=rmask, other=0)
            if SRC_SCALED > 1:  # int4: nibble k % 2 of byte k // 2, times its group's scale
                b = tl.load(src_ptr + tok[:, None].to(tl.int64) * (K // 2) + (k // 2)[None, :], mask=m, other=8)
                q = ((b.to(tl.int32) >> (4 * (k % 2))[None, :]) & 0xF) - 8
                ts = tl.load(tscale_ptr + tok[:, None].to(tl.int64) * (K // SRC_SCALED) + (k // SRC_SCALED)[None, :],
                             mask=m, other=0.0)
                v = (q.to(tl.float32) * ts).to(act)
            else:
                v = tl.load(src_ptr + tok[:, None].to(tl.int64) * K + k[None, :], mask=m, other=0.0)
            if SRC_SCALED == 1:
                ts = tl.load(tscale_ptr + tok, mask=rmask, other=0.0)
                v = (v.to(tl.float32) * ts[:, None]).to(act)
            v = (v.to(tl.float32) * emb_scale).to(act)
        else:
            v = tl.load(src_ptr + rows[:, None] * K + k[None, :], mask=m, other=0.0)
            if HAS_DELTA:
                d = tl.load(delta_ptr + rows[:, None] * K + k[None, :], mask=m, other=0.0)
                v = (v.to(tl.float32) + d.to(tl.float32)).to(src_ptr.dtype.element_ty)
        scale = tl.load(nscale_ptr + k, mask=kmask, other=0.0, eviction_policy="evict_last")
    else:
        v = tl.load(src_ptr + rows[:, None] * K + k[None, :], mask=m, other=0.0)
        scale = kmask
    return v, scale


@triton.jit
def weight_tile(rows_ptr, k, nmask, K):
    """[BN, BK] of weight rows at columns k (zeros past K or past the last feature).
    Weights stream through L2 once per step: marked first to evict, so they do
    not push out what is read again soon (activations, biases, norm scales)."""
    return tl.load(rows_ptr + k[None, :], mask=nmask[:, None] & (k < K)[None, :], other=0.0,
                   eviction_policy="evict_first")


@triton.jit
def row_vectors(bias_ptr, wscale_ptr, n, nmask, N, HAS_BIAS: tl.constexpr, QUANT: tl.constexpr,
                EPI: tl.constexpr):
    """Feature n's bias and weight row scale (float32 [BN]), and the up
    features' (n + N) for GeGLU; 0.0 / 1.0 where absent."""
    bias, bias_u, wscale, wscale_u = 0.0, 0.0, 1.0, 1.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + n, mask=nmask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        if EPI == GEGLU:
            bias_u = tl.load(bias_ptr + N + n, mask=nmask, other=0.0, eviction_policy="evict_last").to(tl.float32)
    if QUANT:
        wscale = tl.load(wscale_ptr + n, mask=nmask, other=0.0, eviction_policy="evict_last")
        if EPI == GEGLU:
            wscale_u = tl.load(wscale_ptr + N + n, mask=nmask, other=0.0, eviction_policy="evict_last")
    return bias, bias_u, wscale, wscale_u


@triton.jit
def conv_inputs(conv_ptr, slots_ptr, pos_ptr, cw_ptr, cb_ptr, rows, rmask, n, nmask, L,
                CONVK: tl.constexpr, CONVR: tl.constexpr):
    """What the conv epilogue needs besides the product, all readable before the
    product: the earlier inputs' share of the conv (+ bias) [BB, BN] float32, the
    current input's tap [BN], the buffer rows to shift down [BB, CONVR, BN], and
    where the buffer lives (row 0's offsets [BB, BN], the rows' [BB, CONVR, BN]),
    which elements are written (mask [BB, BN]) and which features are conv channels."""
    is_x = (n < L) & nmask
    ch = tl.where(is_x, n, 0)
    slots = tl.load(slots_ptr + rows, mask=rmask, other=-1, cache_modifier=".cg")
    p = tl.load(pos_ptr + rows, mask=rmask, other=0, cache_modifier=".cg")
    cm = (slots >= 0)[:, None] & is_x[None, :]
    base = slots[:, None].to(tl.int64) * (CONVK - 1) * L + ch[None, :]  # buffer row 0, [BB, BN]
    r = tl.arange(0, CONVR)
    held = r < CONVK - 1  # buffer rows: r holds the input CONVK-1-r steps back
    off = base[:, None, :] + r[None, :, None] * L
    m3 = cm[:, None, :] & held[None, :, None]
    old = tl.load(conv_ptr + off, mask=m3, other=0.0, cache_modifier=".cg").to(tl.float32)
    taps = tl.load(cw_ptr + r[:, None] * L + ch[None, :], mask=held[:, None] & is_x[None, :], other=0.0,
                   eviction_policy="evict_last").to(tl.float32)
    # an input j steps back exists only if the position is >= j (reset without zeroing)
    exists = p[:, None] >= (CONVK - 1 - r)[None, :]
    earlier = tl.sum(tl.where(exists[:, :, None], old * taps[None, :, :], 0.0), axis=1)
    earlier += tl.load(cb_ptr + ch, mask=is_x, other=0.0, eviction_policy="evict_last").to(tl.float32)[None, :]
    tap_now = tl.load(cw_ptr + (CONVK - 1) * L + ch, mask=is_x, other=0.0, eviction_policy="evict_last").to(tl.float32)
    shifted = tl.load(conv_ptr + off + L, mask=m3 & (r < CONVK - 2)[None, :, None], other=0.0,
                      cache_modifier=".cg")
    return earlier, tap_now, shifted, base, off, cm, is_x


@triton.jit
def fetch_and_wait(bias_ptr, wscale_ptr, conv_ptr, slots_ptr, pos_ptr, cw_ptr, cb_ptr, rows, rmask, n, nmask, N, L,
                   SRC: tl.constexpr, HAS_BIAS: tl.constexpr, QUANT: tl.constexpr, EPI: tl.constexpr,
                   CONVK: tl.constexpr, CONVR: tl.constexpr, PDL: tl.constexpr):
    """After the caller has requested its first weight tile: the row vectors
    (`row_vectors`) and the conv inputs (`conv_inputs`; placeholders without
    the conv) requested before waiting on the previous kernel (PDL), except
    that the first product of a step (SRC_TOKENS) reads the conv buffer after
    the wait: only then is everything queued before the step known to be done."""
    bias, bias_u, wscale, wscale_u = row_vectors(bias_ptr, wscale_ptr, n, nmask, N, HAS_BIAS, QUANT, EPI)
    earlier, tap_now, shifted, conv_base, conv_off, cm, is_x = 0.0, 0.0, 0.0, 0, 0, False, False
    if EPI == CONV:
        if SRC == SRC_X:
            earlier, tap_now, shifted, conv_base, conv_off, cm, is_x = conv_inputs(
                conv_ptr, slots_ptr, pos_ptr, cw_ptr, cb_ptr, rows, rmask, n, nmask, L, CONVK, CONVR)
    if PDL:
        if SRC == SRC_TOKENS:
            # The next kernels read state before they wait: let them start only
            # once everything queued before this step is done.
            gdc_wait()
            gdc_launch_dependents()
        else:
            gdc_launch_dependents()
            gdc_wait()
    if EPI == CONV:
        if SRC == SRC_TOKENS:
            earlier, tap_now, shifted, conv_base, conv_off, cm, is_x = conv_inputs(
                conv_ptr, slots_ptr, pos_ptr, cw_ptr, cb_ptr, rows, rmask, n, nmask, L, CONVK, CONVR)
    return bias, bias_u, wscale, wscale_u, earlier, tap_now, shifted, conv_base, conv_off, cm, is_x


@triton.jit
def epilogue(res, up, ss, K, eps, dt_ptr, rows, rmask, n, nmask, out_ptr, out_stride, cap,
             bias, bias_u, wscale, wscale_u, conv_ptr, L, earlier, tap_now, shifted, conv_base, conv_off, cm, is_x,
             NORM: tl.constexpr, QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, EPI: tl.constexpr,
             CONVK: tl.constexpr, CONVR: tl.constexpr):
    """Stores the rows of a tile's products res [BB, BN] (and up [BB, BN] for
    GeGLU), float32 sums over all of K: times the row scale, times 1/rms from
    the sum of squares ss [BB] (NORM), plus the bias, rounded to the model
    dtype (dt_ptr's element type), then the epilogue's row operation. Only
    the rows in rmask [BB] are stored (none by a split-K program that does
    not finish its tile)."""
    dtype = dt_ptr.dtype.element_ty
    if QUANT:
        res = res * wscale[None, :]
    if NORM:
        inv = 1.0 / tl.sqrt(ss / K + eps)
        res = res * inv[:, None]
    if HAS_BIAS:
        res += bias[None, :]
    omask = rmask[:, None] & nmask[None, :]
    out_off = rows[:, None] * out_stride + n[None, :]
    if EPI == GEGLU:
        if QUANT:
            up = up * wscale_u[None, :]
        if NORM:
            up = up * inv[:, None]
        if HAS_BIAS:
            up += bias_u[None, :]
        gate = res.to(dtype).to(tl.float32)
        up = up.to(dtype).to(tl.float32)
        tl.store(out_ptr + out_off, (_gelu_tanh(gate) * up).to(out_ptr.dtype.element_ty), mask=omask)
    elif EPI == SOFTCAP:
        logits = res.to(dtype).to(tl.float32)
        if cap > 0:
            logits = cap * (2.0 * tl.sigmoid(2.0 * logits / cap) - 1.0)  # cap * tanh(x / cap)
        tl.store(out_ptr + out_off, logits, mask=omask)
    elif EPI == CONV:
        # features [0, L) are linear_x (-> conv), [L, 2L) linear_y (stored as is)
        v = res.to(dtype)
        conv = v.to(tl.float32) * tap_now[None, :] + earlier
        tl.store(out_ptr + out_off, tl.where(is_x[None, :], conv.to(dtype), v), mask=omask)
        # Several threads may hold copies of one buffer element: every thread's
        # read of the buffer (before the product) must be done before any shifts it.
        tl.debug_barrier()
        r = tl.arange(0, CONVR)
        cm = cm & rmask[:, None]
        tl.store(conv_ptr + conv_off, shifted, mask=cm[:, None, :] & (r < CONVK - 2)[None, :, None])
        tl.store(conv_ptr + conv_base + (CONVK - 2) * L, v.to(conv_ptr.dtype.element_ty), mask=cm)
    else:
        tl.store(out_ptr + out_off, res.to(out_ptr.dtype.element_ty), mask=omask)
