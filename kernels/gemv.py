"""Skinny matrix products for small-batch decode (a few rows x a weight in
F.linear layout), with the decode step's neighbouring row operations folded in
so they cost no launch and no round trip through device memory.

At batch 1-8 a projection is a pure weight stream: each program owns BN output
features and walks their [BN, K] weight rows in [BN, BK] tiles (K contiguous:
wide coalesced loads), the next tile loaded before the current one is used so
two tiles are in flight. The batch rows ([BB, BK] of the input) are multiplied
into a float32 [BB, BN, BK] accumulator that is reduced over K once, at the end.

Fused around the product (all optional, chosen by constexpr flags):
- prologue: the input row is the residual stream after `x + delta` (or the
  scaled embedding of a token), RMS-normalised: the sum of squares is gathered
  in the same K loop and 1/rms applied to the accumulated product at the end,
  so there is no first pass over the row. Program 0 alone writes `x + delta`
  to a *separate* residual buffer, so no program reads a half-updated residual.
- epilogue: bias; GeGLU over a fused gate|up weight (a program computes the
  matching gate and up features); the recurrent block's causal conv1d on the
  x half of a fused x|y weight (each program owns its channels: it reads and
  shifts their conv buffer, no races); the logits soft-cap into float32.
- programmatic dependent launch (see `pdl.py`): the first weight tile is
  loaded before waiting for the previous kernel.

Rounding follows the unfused path (residual rounded to the model dtype, matmul
output rounded after the bias, then the row operation on the rounded values)
except one point: the normalised input is not rounded to the model dtype
before the product (the scale is applied after it), which is closer to exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .recurrent_decode import _gelu_tanh

from . import pdl
from .pdl import gdc_launch_dependents, gdc_wait

# epilogues
PLAIN = tl.constexpr(0)
GEGLU = tl.constexpr(1)
CONV = tl.constexpr(2)
SOFTCAP = tl.constexpr(3)
# where the prologue's input rows come from
SRC_X = tl.constexpr(0)  # src[b] (+ delta[b]), normalised if NORM
SRC_TOKENS = tl.constexpr(1)  # src[token[b]] * emb_scale (the embedding table), normalised

_EPILOGUES = {"plain": 0, "geglu": 1, "conv": 2, "softcap": 3}


@triton.jit
def _residual_tile(src_ptr, tok_ptr, emb_scale, delta_ptr, rows, rmask, k, kmask, K,
                   SRC: tl.constexpr, HAS_DELTA: tl.constexpr):
    """[BB, BK] of the residual stream in the model dtype (what add_rmsnorm stores)."""
    m = rmask[:, None] & kmask[None, :]
    if SRC == SRC_TOKENS:
        tok = tl.load(tok_ptr + rows, mask=rmask, other=0)
        v = tl.load(src_ptr + tok[:, None].to(tl.int64) * K + k[None, :], mask=m, other=0.0)
        v = (v.to(tl.float32) * emb_scale).to(src_ptr.dtype.element_ty)
    else:
        v = tl.load(src_ptr + rows[:, None] * K + k[None, :], mask=m, other=0.0)
        if HAS_DELTA:
            d = tl.load(delta_ptr + rows[:, None] * K + k[None, :], mask=m, other=0.0)
            v = (v.to(tl.float32) + d.to(tl.float32)).to(src_ptr.dtype.element_ty)
    return v


@triton.jit(do_not_specialize=["B", "eps", "emb_scale", "cap"])
def _gemv_kernel(src_ptr, tok_ptr, emb_scale, delta_ptr, res_out_ptr, nscale_ptr, eps,
                 w_ptr, bias_ptr, out_ptr, out_stride,
                 conv_ptr, slots_ptr, pos_ptr, cw_ptr, cb_ptr, L,
                 cap, B, N, K,
                 BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 SRC: tl.constexpr, HAS_DELTA: tl.constexpr, NORM: tl.constexpr, WRITE_RES: tl.constexpr,
                 HAS_BIAS: tl.constexpr, EPI: tl.constexpr, CONVK: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BB)
    rmask = rows < B
    n = pid * BN + tl.arange(0, BN)
    nmask = n < N
    kk = tl.arange(0, BK)
    dtype = w_ptr.dtype.element_ty
    w_rows = w_ptr + n[:, None].to(tl.int64) * K
    # GeGLU: the gate feature n pairs with the up feature N + n of the [2N, K] weight
    u_rows = w_rows + N * K

    # The first weight tiles depend on no earlier kernel: load them before waiting.
    w_next = tl.load(w_rows + kk[None, :], mask=nmask[:, None] & (kk < K)[None, :], other=0.0)
    if EPI == GEGLU:
        u_next = tl.load(u_rows + kk[None, :], mask=nmask[:, None] & (kk < K)[None, :], other=0.0)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()

    acc = tl.zeros((BB, BN, BK), tl.float32)
    ss = tl.zeros((BB,), tl.float32)
    if EPI == GEGLU:
        acc_u = tl.zeros((BB, BN, BK), tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + kk
        kmask = k < K
        w = w_next
        nk = k + BK
        w_next = tl.load(w_rows + nk[None, :], mask=nmask[:, None] & (nk < K)[None, :], other=0.0)
        if EPI == GEGLU:
            u = u_next
            u_next = tl.load(u_rows + nk[None, :], mask=nmask[:, None] & (nk < K)[None, :], other=0.0)
        if NORM:
            # The rms is gathered on the way and applied after the loop (no first
            # pass over the row): the product sees x * (1 + scale) unrounded.
            v = _residual_tile(src_ptr, tok_ptr, emb_scale, delta_ptr, rows, rmask, k, kmask, K,
                               SRC, HAS_DELTA)
            if WRITE_RES:
                if pid == 0:
                    tl.store(res_out_ptr + rows[:, None] * K + k[None, :], v,
                             mask=rmask[:, None] & kmask[None, :])
            v = v.to(tl.float32)
            ss += tl.sum(v * v, axis=1)
            scale = tl.load(nscale_ptr + k, mask=kmask, other=0.0).to(tl.float32)
            xin = v * (1.0 + scale[None, :])
        else:
            xin = tl.load(src_ptr + rows[:, None] * K + k[None, :],
                          mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        acc += w.to(tl.float32)[None, :, :] * xin[:, None, :]
        if EPI == GEGLU:
            acc_u += u.to(tl.float32)[None, :, :] * xin[:, None, :]

    res = tl.sum(acc, axis=2)  # [BB, BN]
    if NORM:
        inv = 1.0 / tl.sqrt(ss / K + eps)
        res = res * inv[:, None]
    if HAS_BIAS:
        res += tl.load(bias_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    omask = rmask[:, None] & nmask[None, :]
    out_off = rows[:, None] * out_stride + n[None, :]
    if EPI == GEGLU:
        up = tl.sum(acc_u, axis=2)
        if NORM:
            up = up * inv[:, None]
        if HAS_BIAS:
            up += tl.load(bias_ptr + N + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
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
        is_x = n < L
        slots = tl.load(slots_ptr + rows, mask=rmask, other=-1)
        p = tl.load(pos_ptr + rows, mask=rmask, other=0)
        cm = (slots >= 0)[:, None] & (is_x & nmask)[None, :]
        ch = tl.where(is_x, n, 0)
        buf = conv_ptr + slots[:, None].to(tl.int64) * (CONVK - 1) * L + ch[None, :]
        conv = v.to(tl.float32) * tl.load(cw_ptr + (CONVK - 1) * L + ch, mask=is_x, other=0.0).to(tl.float32)[None, :]
        for j in tl.static_range(1, CONVK):
            # the input j steps back sits at buffer row CONVK-1-j; it exists only if p >= j
            prev = tl.load(buf + (CONVK - 1 - j) * L, mask=cm, other=0.0).to(tl.float32)
            prev = tl.where(p[:, None] >= j, prev, 0.0)
            conv += prev * tl.load(cw_ptr + (CONVK - 1 - j) * L + ch, mask=is_x, other=0.0).to(tl.float32)[None, :]
        conv += tl.load(cb_ptr + ch, mask=is_x, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_off, tl.where(is_x[None, :], conv.to(dtype), v), mask=omask)
        # Several threads may hold copies of one element: every read of the buffer
        # above must be done before any thread shifts it.
        tl.debug_barrier()
        for r in tl.static_range(0, CONVK - 2):
            tl.store(buf + r * L, tl.load(buf + (r + 1) * L, mask=cm), mask=cm)
        tl.debug_barrier()
        tl.store(buf + (CONVK - 2) * L, v.to(conv_ptr.dtype.element_ty), mask=cm)
    else:
        tl.store(out_ptr + out_off, res.to(out_ptr.dtype.element_ty), mask=omask)


# (BN, BK, num_warps) per batch-row bucket, measured on an H100 with bench/tune_gemv.py
# on the 2B shapes (bench/NOTES.md). At batch 1 many small programs won on every
# shape (more independent loads in flight per SM); the conv epilogue prefers BK 256.
_CONFIGS = {1: (2, 512, 2), 2: (8, 256, 4), 4: (8, 128, 4), 8: (4, 128, 4)}
_CONFIGS_CONV = {1: (8, 256, 2)}
CONFIG_OVERRIDE: dict = {}  # (batch bucket, epilogue, N, K) -> (BN, BK, num_warps), for tuning
MAX_BATCH = 8


def gemv(src: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, *, bias: torch.Tensor | None = None,
         delta: torch.Tensor | None = None, norm_scale: torch.Tensor | None = None, eps: float = 1e-6,
         residual_out: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
         emb_scale: float | None = None, epilogue: str = "plain", conv: tuple | None = None,
         cap: float = 0.0, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """out[b] = f(input[b] @ weight.T) for a small batch (B <= MAX_BATCH rows).

    src: [B, K] input rows (model dtype), or with `tokens` ([B] int64) the
    embedding table [V, K] whose rows tokens[b] * emb_scale are the input.
    weight: [N, K] (F.linear layout; [2N, K] gate|up for "geglu"); bias: [N]
    ([2N] for "geglu") or None.
    norm_scale: [K] -> the input is RMSNorm(src + delta) * (1 + norm_scale)
    (delta [B, K] optional); residual_out: [B, K] receives src + delta (the
    updated residual stream) when given.
    epilogue: "plain" -> out [B, N]; "geglu" -> out [B, N] = gelu_tanh(gate) * up;
    "conv" -> conv = (conv_state [S, CK-1, L], slots [B], pos [B], conv_w [CK, L],
    conv_b [L]): out[:, :L] = causal conv of the x half (state shifted in
    place, slot -1 rows untouched), out[:, L:] = the y half; "softcap" -> out
    [B, N] float32 = cap * tanh(logits / cap) (plain cast when cap is 0).
    out may have a row stride (out.stride(1) must be 1)."""
    batch = tokens.shape[0] if tokens is not None else src.shape[0]
    assert 1 <= batch <= MAX_BATCH and out.stride(-1) == 1
    n_rows, k = weight.shape
    epi = _EPILOGUES[epilogue]
    n_out = n_rows // 2 if epilogue == "geglu" else n_rows
    bb = triton.next_power_of_2(batch)
    if config is None and not weight.is_cuda:
        config = (64, 64, 4)  # Triton's interpreter (CPU tests): per-program cost dominates
    default = _CONFIGS_CONV.get(bb, _CONFIGS[bb]) if epilogue == "conv" else _CONFIGS[bb]
    bn, bk, warps = config or CONFIG_OVERRIDE.get((bb, epilogue, n_rows, k)) or default
    bk = min(bk, max(16, triton.next_power_of_2(k)))
    if conv is not None:
        conv_state, slots, pos, conv_w, conv_b = conv
        convk, lw = conv_w.shape
    else:
        conv_state = slots = pos = conv_w = conv_b = weight
        convk, lw = 2, 1
    dummy = weight
    grid = (triton.cdiv(n_out, bn),)
    kwargs = dict(num_warps=warps, **pdl.launch_kwargs())
    _gemv_kernel[grid](
        src, tokens if tokens is not None else dummy, float(emb_scale or 1.0),
        delta if delta is not None else dummy, residual_out if residual_out is not None else dummy,
        norm_scale if norm_scale is not None else dummy, float(eps),
        weight, bias if bias is not None else dummy, out, out.stride(0),
        conv_state, slots, pos, conv_w, conv_b, lw,
        float(cap or 0.0), batch, n_out, k,
        BB=bb, BN=bn, BK=bk, SRC=1 if tokens is not None else 0, HAS_DELTA=delta is not None,
        NORM=norm_scale is not None, WRITE_RES=residual_out is not None, HAS_BIAS=bias is not None,
        EPI=epi, CONVK=convk, PDL=pdl.enabled(), **kwargs)
    return out
