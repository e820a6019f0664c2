"""Skinny matrix products for small-batch decode (a few rows x a weight in
F.linear layout), with the decode step's neighbouring row operations folded in
so they cost no launch and no round trip through device memory.

At batch 1-8 a projection is a pure weight stream: each program owns BN output
features and walks their [BN, K] weight rows in [BN, BK] tiles (K contiguous:
wide coalesced loads), the next weight tile and the next input tile loaded
before the current ones are used. The batch rows ([BB, BK] of the input) are
multiplied into a float32 [BB, BN, BK] accumulator ([BN, BK] at batch 1 with
1-byte weights, in the weight tile's layout: no trip through shared memory)
that is reduced over K once, at the end. Weights are loaded "evict_first" (they pass through L2 once per
step), the small per-layer vectors "evict_last" (they are read every step).

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
- programmatic dependent launch (see `pdl.py`): what no earlier kernel of the
  step writes (the first weight tile, the bias, the conv taps and buffer) is
  requested before waiting for the previous kernel, so the epilogue waits on
  no memory round trip.

Quantized weights (int8 / fp8 e4m3, model/quantize.py): the weight tiles are
loaded as stored (half the bytes of bfloat16) and widened to float32 in
registers (exactly, by one of widen.py's variants); the row's float32 scale
multiplies its dot product in the epilogue,
y[n] = s[n] * sum_k q[n, k] x[k], before the bias and the fused row
operations. A quantized embedding table's rows (the first product's input)
are multiplied by their row scale as they are read. Both are constexpr
switches: the bfloat16 kernel compiles without them.

Tensor-core variant (TC, batch 1-16, chosen per call by the config): the
same prologues, epilogues and PDL, but each K tile is one MMA,
out^T [BN, BB] += W [BN, BK] @ x^T [BK, BB], with the weight the MMA's big
operand and the batch padded to BB = 16 rows (tl.dot's minimum; padded rows
are masked: never read, never written). Per weight it costs the widening
and a share of one MMA instruction instead of one FMA per weight per row,
which is what loses at batch 2-16 and with 1-byte weights at batch 1. Its
operands are in the model dtype: 1-byte weights are widened to it (exact for
int8 and e4m3 in bfloat16), and the input rows (x * (1 + norm scale),
before 1/rms) are rounded to it, where the CUDA-core kernel keeps them
float32 (the unfused path rounds the normalised row too). float32 models
(CPU tests) multiply in IEEE float32, not tf32.

Rounding follows the unfused path (residual rounded to the model dtype, matmul
output rounded after the bias, then the row operation on the rounded values)
except one point: the normalised input is not rounded to the model dtype
before the product (the scale is applied after it), which is closer to exact
(the tensor-core variant rounds x * (1 + scale), before 1/rms).
"""

from __future__ import annotations

from types import MappingProxyType

import torch
import triton
import triton.language as tl

from .pdl import gdc_launch_dependents, gdc_wait, launch_kwargs
from .recurrent_decode import _gelu_tanh
from .widen import CONVERT, default_widen, widen

# epilogues
PLAIN = tl.constexpr(0)
GEGLU = tl.constexpr(1)
CONV = tl.constexpr(2)
SOFTCAP = tl.constexpr(3)
# where the prologue's input rows come from
SRC_X = tl.constexpr(0)  # src[b] (+ delta[b]), normalised if NORM
SRC_TOKENS = tl.constexpr(1)  # src[token[b]] * emb_scale (the embedding table), normalised

_EPILOGUES = MappingProxyType({"plain": 0, "geglu": 1, "conv": 2, "softcap": 3})


@triton.jit
def _input_tile(src_ptr, tok_ptr, emb_scale, tscale_ptr, delta_ptr, nscale_ptr, rows, rmask, k, K,
                SRC: tl.constexpr, SRC_SCALED: tl.constexpr, HAS_DELTA: tl.constexpr, NORM: tl.constexpr):
    """Columns k of the product's input: with NORM the residual stream [BB, BK] in
    the model dtype (what add_rmsnorm stores) and the norm scale [BK]; without,
    the input rows [BB, BK] as stored (and a placeholder scale). SRC_SCALED: the
    embedding table is quantized, its rows times tscale[token] (then rounded to
    the model dtype, as the reference's dequantize does)."""
    kmask = k < K
    m = rmask[:, None] & kmask[None, :]
    if NORM:
        if SRC == SRC_TOKENS:
            act = nscale_ptr.dtype.element_ty  # the model dtype (the table may be quantized)
            tok = tl.load(tok_ptr + rows, mask=rmask, other=0)
            v = tl.load(src_ptr + tok[:, None].to(tl.int64) * K + k[None, :], mask=m, other=0.0)
            if SRC_SCALED:
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
def _weight_tile(rows_ptr, k, nmask, K):
    """[BN, BK] of weight rows at columns k (zeros past K or past the last feature).
    Weights stream through L2 once per step: marked first to evict, so they do
    not push out what is read again soon (activations, biases, norm scales)."""
    return tl.load(rows_ptr + k[None, :], mask=nmask[:, None] & (k < K)[None, :], other=0.0,
                   eviction_policy="evict_first")


@triton.jit
def _conv_inputs(conv_ptr, slots_ptr, pos_ptr, cw_ptr, cb_ptr, rows, rmask, n, nmask, L,
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
def _zeros_acc(BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TC: tl.constexpr, FLAT: tl.constexpr):
    """The float32 accumulator: [BN, BB] for the MMA, [BN, BK] (FLAT) or [BB, BN, BK]."""
    if TC:
        acc = tl.zeros((BN, BB), tl.float32)
    elif FLAT:
        acc = tl.zeros((BN, BK), tl.float32)
    else:
        acc = tl.zeros((BB, BN, BK), tl.float32)
    return acc


@triton.jit
def _mma(w, xt, acc, WIDEN: tl.constexpr):
    """acc + w @ xt on the tensor cores, w widened to xt's dtype (the model
    dtype; exact for int8 and e4m3): Triton's conversion, or (WIDEN other
    than CONVERT) through widen.py's float32 variant. float32 models (CPU
    tests) multiply in full float32 precision, not tf32."""
    if WIDEN == CONVERT:
        wx = w.to(xt.dtype)
    else:
        wx = widen(w, WIDEN).to(xt.dtype)
    if xt.dtype == tl.float32:
        out = tl.dot(wx, xt, acc, input_precision="ieee")
    else:
        out = tl.dot(wx, xt, acc)
    return out


@triton.jit
def _rows(acc, TC: tl.constexpr, FLAT: tl.constexpr):
    """The products [BB, BN] from an accumulator: transposed from the MMA's
    [BN, BB], or summed over K from the CUDA-core [BN, BK] / [BB, BN, BK]."""
    if TC:
        out = tl.trans(acc)
    elif FLAT:
        out = tl.sum(acc, axis=1)[None, :]
    else:
        out = tl.sum(acc, axis=2)
    return out


@triton.jit(do_not_specialize=["B", "eps", "emb_scale", "cap"])
def _gemv_kernel(src_ptr, tok_ptr, emb_scale, tscale_ptr, delta_ptr, res_out_ptr, nscale_ptr, eps,
                 w_ptr, wscale_ptr, bias_ptr, out_ptr, out_stride,
                 conv_ptr, slots_ptr, pos_ptr, cw_ptr, cb_ptr, L,
                 cap, B, N, K,
                 BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 SRC: tl.constexpr, SRC_SCALED: tl.constexpr, HAS_DELTA: tl.constexpr, NORM: tl.constexpr,
                 WRITE_RES: tl.constexpr, QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, EPI: tl.constexpr,
                 CONVK: tl.constexpr, CONVR: tl.constexpr, PDL: tl.constexpr, WIDEN: tl.constexpr,
                 FLAT: tl.constexpr, TC: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BB)
    rmask = rows < B
    n = pid * BN + tl.arange(0, BN)
    nmask = n < N
    kk = tl.arange(0, BK)
    # the model dtype, in which the unfused path rounds (the weights' own dtype unless QUANT)
    if NORM:
        dtype = nscale_ptr.dtype.element_ty
    else:
        dtype = src_ptr.dtype.element_ty
    w_rows = w_ptr + n[:, None].to(tl.int64) * K
    # GeGLU: the gate feature n pairs with the up feature N + n of the [2N, K] weight
    u_rows = w_rows + N * K

    # Everything that depends on no earlier kernel of this step is requested
    # before waiting for it: the first weight tile, the bias, and for the conv
    # its taps and the buffer (written by the previous step). The first product
    # of a step (SRC_TOKENS) reads the buffer after the wait: only then is
    # everything queued before the step known to be done.
    w_next = _weight_tile(w_rows, kk, nmask, K)
    if EPI == GEGLU:
        u_next = _weight_tile(u_rows, kk, nmask, K)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + n, mask=nmask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        if EPI == GEGLU:
            bias_u = tl.load(bias_ptr + N + n, mask=nmask, other=0.0, eviction_policy="evict_last").to(tl.float32)
    if QUANT:
        wscale = tl.load(wscale_ptr + n, mask=nmask, other=0.0, eviction_policy="evict_last")
        if EPI == GEGLU:
            wscale_u = tl.load(wscale_ptr + N + n, mask=nmask, other=0.0, eviction_policy="evict_last")
    if EPI == CONV:
        if SRC == SRC_X:
            earlier, tap_now, shifted, conv_base, conv_off, cm, is_x = _conv_inputs(
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
            earlier, tap_now, shifted, conv_base, conv_off, cm, is_x = _conv_inputs(
                conv_ptr, slots_ptr, pos_ptr, cw_ptr, cb_ptr, rows, rmask, n, nmask, L, CONVK, CONVR)

    x_next, s_next = _input_tile(src_ptr, tok_ptr, emb_scale, tscale_ptr, delta_ptr, nscale_ptr, rows, rmask,
                                 kk, K, SRC, SRC_SCALED, HAS_DELTA, NORM)
    # FLAT (batch 1, 1-byte weights): a 2-D accumulator in the weight tile's own
    # layout, so the widened tile is not reshuffled through shared memory to meet
    # a 3-D one. Measured on the H100 it helps fp8 and int8 but slows bf16 (2.20
    # -> 2.43 ms a step), so bf16 keeps the 3-D one (bench/NOTES.md, Q1).
    # TC: out^T [BN, BB] = W [BN, BK] @ x^T [BK, BB] on the tensor cores (BB >= 16).
    acc = _zeros_acc(BB, BN, BK, TC, FLAT)
    ss = tl.zeros((BB,), tl.float32)
    if EPI == GEGLU:
        acc_u = _zeros_acc(BB, BN, BK, TC, FLAT)
    for k0 in range(0, K, BK):
        k = k0 + kk
        kmask = k < K
        # Two tiles of weights in flight (the one used now and the next), and the
        # input's next tile requested with them: no round trip to L2 waits in
        # the loop.
        w = w_next
        w_next = _weight_tile(w_rows, k + BK, nmask, K)
        if EPI == GEGLU:
            u = u_next
            u_next = _weight_tile(u_rows, k + BK, nmask, K)
        v = x_next
        scale = s_next
        x_next, s_next = _input_tile(src_ptr, tok_ptr, emb_scale, tscale_ptr, delta_ptr, nscale_ptr, rows, rmask,
                                     k + BK, K, SRC, SRC_SCALED, HAS_DELTA, NORM)
        if NORM:
            # The rms is gathered on the way and applied after the loop (no first
            # pass over the row): the product sees x * (1 + scale) unrounded.
            if WRITE_RES:
                if pid == 0:
                    tl.store(res_out_ptr + rows[:, None] * K + k[None, :], v,
                             mask=rmask[:, None] & kmask[None, :])
            v = v.to(tl.float32)
            ss += tl.sum(v * v, axis=1)
            xin = v * (1.0 + scale.to(tl.float32)[None, :])
        else:
            xin = v.to(tl.float32)
        if TC:
            # the MMA's operands in the model dtype: the input rounded to it,
            # 1-byte weights widened to it (exact for int8 and e4m3)
            xt = tl.trans(xin.to(dtype))
            acc = _mma(w, xt, acc, WIDEN)
            if EPI == GEGLU:
                acc_u = _mma(u, xt, acc_u, WIDEN)
        elif FLAT:
            x1 = tl.sum(xin, axis=0)  # [BK]: the one row
            acc += widen(w, WIDEN) * x1[None, :]
            if EPI == GEGLU:
                acc_u += widen(u, WIDEN) * x1[None, :]
        else:
            acc += widen(w, WIDEN)[None, :, :] * xin[:, None, :]
            if EPI == GEGLU:
                acc_u += widen(u, WIDEN)[None, :, :] * xin[:, None, :]

    res = _rows(acc, TC, FLAT)  # [BB, BN]
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
        up = _rows(acc_u, TC, FLAT)
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
        tl.store(conv_ptr + conv_off, shifted, mask=cm[:, None, :] & (r < CONVK - 2)[None, :, None])
        tl.store(conv_ptr + conv_base + (CONVK - 2) * L, v.to(conv_ptr.dtype.element_ty), mask=cm)
    else:
        tl.store(out_ptr + out_off, res.to(out_ptr.dtype.element_ty), mask=omask)


MAX_BATCH = 16
# (BN, BK, num_warps) at batch 1, per epilogue, tuned on the 2B shapes (bench/dev/tune_gemv.py):
# many small programs keep more independent loads in flight per SM.
BATCH1_CONFIGS = MappingProxyType({"plain": (2, 512, 2), "conv": (4, 256, 2), "geglu": (4, 128, 2),
                                   "softcap": (8, 256, 4)})
# Triton's interpreter (CPU tests): the cost per program dominates.
INTERPRETER_CONFIG = (64, 64, 4)
# the tensor-core kernel's untuned default: an MMA needs BN >= 16; 32 keeps
# the 2B shapes' narrowest products (N = 2560) at 80 programs
TENSOR_CORE_CONFIG = (32, 128, 4)
TENSOR_CORES = "tc"  # a config's optional 4th element: run the tensor-core kernel
MMA_ROWS = 16  # tl.dot's smallest operand side: the batch is padded to it


def default_config(batch_bucket: int, epilogue: str, on_gpu: bool = True,
                   weight_bytes: int = 2, tensor_cores: bool = False) -> tuple[int, int, int]:
    """(BN, BK, num_warps) for a call whose batch rounds up to `batch_bucket`.
    Batches above 1 take the matmul path unless a KernelConfig raises
    gemv_max_batch; they get an untuned shape that keeps the float32
    accumulator at 4096 values per program. 1-byte (int8 / fp8) weights at
    batch 1 get twice the bf16 tiles' columns, so a tile is as many bytes
    (untuned: bench/dev/tune_gemv.py --quantize sweeps them). The tensor-core
    kernel gets TENSOR_CORE_CONFIG (untuned)."""
    if not on_gpu:
        return INTERPRETER_CONFIG
    if tensor_cores:
        return TENSOR_CORE_CONFIG
    if batch_bucket == 1:
        bn, bk, warps = BATCH1_CONFIGS[epilogue]
        return bn, bk * 2 // weight_bytes, warps
    return 8, max(16, 512 // batch_bucket), 4


def gemv(src: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, *, bias: torch.Tensor | None = None,
         delta: torch.Tensor | None = None, norm_scale: torch.Tensor | None = None, eps: float = 1e-6,
         residual_out: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
         emb_scale: float | None = None, weight_scale: torch.Tensor | None = None,
         src_scale: torch.Tensor | None = None, epilogue: str = "plain", conv: tuple | None = None,
         cap: float = 0.0, config: tuple[int, int, int] | None = None, pdl: bool = False,
         widening: int | None = None, tensor_cores: bool = False) -> torch.Tensor:
    """out[b] = f(input[b] @ weight.T) for a small batch (B <= MAX_BATCH rows).

    src: [B, K] input rows (model dtype), or with `tokens` ([B] int64) the
    embedding table [V, K] whose rows tokens[b] * emb_scale are the input.
    weight: [N, K] (F.linear layout; [2N, K] gate|up for "geglu"); bias: [N]
    ([2N] for "geglu") or None. weight_scale: float32 [N] ([2N]) for an int8 /
    float8_e4m3fn weight: feature n's product is multiplied by it. src_scale:
    float32 [V] for a quantized embedding table (with `tokens`): row scales.
    norm_scale: [K] -> the input is RMSNorm(src + delta) * (1 + norm_scale)
    (delta [B, K] optional); residual_out: [B, K] receives src + delta (the
    updated residual stream) when given.
    epilogue: "plain" -> out [B, N]; "geglu" -> out [B, N] = gelu_tanh(gate) * up;
    "conv" -> conv = (conv_state [S, CK-1, L], slots [B], pos [B], conv_w [CK, L],
    conv_b [L]): out[:, :L] = causal conv of the x half (state shifted in
    place, slot -1 rows untouched), out[:, L:] = the y half; "softcap" -> out
    [B, N] float32 = cap * tanh(logits / cap) (plain cast when cap is 0).
    out may have a row stride (out.stride(1) must be 1).
    config: (BN, BK, num_warps), default `default_config`; a 4th element
    "tc" (TENSOR_CORES) runs the tensor-core variant; tensor_cores: the same
    for the default block (ignored when `config` is given). pdl: launch with
    programmatic dependent launch (see pdl.py); widening: how 1-byte weights
    become float32 (`widen.py`'s variants, same values; default
    `default_widen`; the tensor-core variant casts them to the model dtype)."""
    batch = tokens.shape[0] if tokens is not None else src.shape[0]
    assert 1 <= batch <= MAX_BATCH and out.stride(-1) == 1
    assert (weight_scale is not None) == (weight.dtype in (torch.int8, torch.float8_e4m3fn))
    assert src_scale is None or (tokens is not None and norm_scale is not None)
    n_rows, k = weight.shape
    epi = _EPILOGUES[epilogue]
    n_out = n_rows // 2 if epilogue == "geglu" else n_rows
    bb = triton.next_power_of_2(batch)
    if config is not None:
        tensor_cores = len(config) == 4 and config[3] == TENSOR_CORES
    bn, bk, warps = (config or default_config(bb, epilogue, weight.is_cuda, weight.element_size(), tensor_cores))[:3]
    bk = min(bk, max(16, triton.next_power_of_2(k)))
    if tensor_cores:
        if bn < MMA_ROWS or bk < MMA_ROWS:
            raise ValueError(f"gemv config {config!r}: the tensor-core variant needs BN, BK >= {MMA_ROWS}")
        bb = max(bb, MMA_ROWS)
    if conv is not None:
        conv_state, slots, pos, conv_w, conv_b = conv
        convk, lw = conv_w.shape
    else:
        conv_state = slots = pos = conv_w = conv_b = weight
        convk, lw = 2, 1
    dummy = weight
    grid = (triton.cdiv(n_out, bn),)
    _gemv_kernel[grid](
        src, tokens if tokens is not None else dummy, float(emb_scale or 1.0),
        src_scale if src_scale is not None else dummy,
        delta if delta is not None else dummy, residual_out if residual_out is not None else dummy,
        norm_scale if norm_scale is not None else dummy, float(eps),
        weight, weight_scale if weight_scale is not None else dummy,
        bias if bias is not None else dummy, out, out.stride(0),
        conv_state, slots, pos, conv_w, conv_b, lw,
        float(cap or 0.0), batch, n_out, k,
        BB=bb, BN=bn, BK=bk, SRC=1 if tokens is not None else 0, SRC_SCALED=src_scale is not None,
        HAS_DELTA=delta is not None, NORM=norm_scale is not None, WRITE_RES=residual_out is not None,
        QUANT=weight_scale is not None, FLAT=bb == 1 and weight_scale is not None, TC=tensor_cores,
        HAS_BIAS=bias is not None,
        EPI=epi, CONVK=convk, CONVR=triton.next_power_of_2(max(convk - 1, 1)),
        PDL=pdl, WIDEN=default_widen(weight) if widening is None else widening, num_warps=warps, **launch_kwargs(pdl))
    return out
