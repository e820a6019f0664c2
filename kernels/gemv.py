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
switches: the bfloat16 kernel compiles without them. int4 weights (two a
byte, a float32 scale per group of columns) are read at batch 1 only, as
int32 words of eight, each word's sum times its group's scale in the loop.

Tensor-core variant (batch 1-16, chosen per call by the config): `gemv_tc.py`,
the same prologues and epilogues (`gemv_parts.py`) around MMAs with the
batch padded to 16 rows, in a K loop Triton pipelines, optionally split
over K.

Rounding follows the unfused path (residual rounded to the model dtype, matmul
output rounded after the bias, then the row operation on the rounded values)
except one point: the normalised input is not rounded to the model dtype
before the product (the scale is applied after it), which is closer to exact
(the tensor-core kernel rounds x * (1 + scale), before 1/rms).
"""

from __future__ import annotations

from types import MappingProxyType

import torch
import triton
import triton.language as tl

from . import gemv_tc
from .gemv_parts import (
    EPILOGUES,
    GEGLU,
    epilogue,
    fetch_and_wait,
    input_tile,
    tile_indices,
    weight_tile,
)
from .pdl import launch_kwargs
from .widen import (
    WORDS_BITS,
    WORDS_E4M3,
    WORDS_INT4,
    WORDS_INT8,
    WORDS_PTX,
    default_widen,
    half_pairs,
    int4_word_dots,
    widen,
    widen_words,
)


@triton.jit
def _zeros_acc(BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FLAT: tl.constexpr):
    """The float32 accumulator: [BN, BK] (FLAT) or [BB, BN, BK]."""
    if FLAT:
        acc = tl.zeros((BN, BK), tl.float32)
    else:
        acc = tl.zeros((BB, BN, BK), tl.float32)
    return acc


@triton.jit
def _rows(acc, FLAT: tl.constexpr):
    """The products [BB, BN] from an accumulator, summed over K."""
    if FLAT:
        out = tl.sum(acc, axis=1)[None, :]
    else:
        out = tl.sum(acc, axis=2)
    return out


@triton.jit
def _prologue(v, scale, ss, res_out_ptr, rows, rmask, k, K, pid, NORM: tl.constexpr, WRITE_RES: tl.constexpr,
              SS_COLUMNS: tl.constexpr):
    """An input tile v [BB, BK] as the product sees it, and the squares so far:
    with NORM, x * (1 + scale) unrounded (1/rms is gathered on the way and
    applied after the loop: no first pass over the row), program 0 writing
    the residual stream. SS_COLUMNS: the squares kept per column [BB, BK] and
    summed after the loop (fewer instructions, more registers: faster for
    words, slower for bf16, bench/NOTES.md D11); else summed [BB] every tile."""
    if NORM:
        if WRITE_RES:
            if pid == 0:
                tl.store(res_out_ptr + rows[:, None] * K + k[None, :], v, mask=rmask[:, None] & (k < K)[None, :])
        v = v.to(tl.float32)
        if SS_COLUMNS:
            ss += v * v
        else:
            ss += tl.sum(v * v, axis=1)
        xin = v * (1.0 + scale.to(tl.float32)[None, :])
    else:
        xin = v.to(tl.float32)
    return xin, ss


@triton.jit
def _columns_of_words(x):
    """x [BK] as four [BK / 4]: columns 4i + j for j = 0..3 (what byte j of
    word i multiplies)."""
    even, odd = tl.split(tl.reshape(x, (x.shape[0] // 4, 2, 2)))  # 4i + 2a + b, split on b
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def _columns_of_int4_words(x):
    """x [BK] as eight [BK / 8]: columns 8i + j for j = 0..7 (what nibble j of word i multiplies)."""
    q0, q1, q2, q3 = _columns_of_words(x)  # columns 4m + j, m = 2i + h
    x0, x4 = tl.split(tl.reshape(q0, (q0.shape[0] // 2, 2)))
    x1, x5 = tl.split(tl.reshape(q1, (q1.shape[0] // 2, 2)))
    x2, x6 = tl.split(tl.reshape(q2, (q2.shape[0] // 2, 2)))
    x3, x7 = tl.split(tl.reshape(q3, (q3.shape[0] // 2, 2)))
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _dot_int4_words(acc, w, x8, gs, HOW: tl.constexpr):
    """acc [BN, BK / 8] plus the products of the int4 words w [BN, BK / 8] with
    their input columns x8 (`_columns_of_int4_words`), each word's sum times
    its group's scale gs [BN, BK / 8]."""
    q = widen_words(w, WORDS_INT4, HOW)
    t = q[0] * x8[0][None, :]
    for j in tl.static_range(1, 8):
        t += q[j] * x8[j][None, :]
    return acc + t * gs


@triton.jit
def _group_scales(gs_rows, kw, nmask, KW, GROUP: tl.constexpr):
    """The scales [BN, BK / 8] of the int4 words kw of rows gs_rows (their group's)."""
    return tl.load(gs_rows[:, None] + (kw * 8 // GROUP)[None, :], mask=nmask[:, None] & (kw < KW)[None, :], other=0.0,
                   eviction_policy="evict_first")


@triton.jit
def _dot_words(acc, w, x4, FORMAT: tl.constexpr, HOW: tl.constexpr):
    """acc [BN, BK / 4] plus the products of the words w [BN, BK / 4] (four
    weights each) with their input columns x4 (`_columns_of_words`)."""
    w0, w1, w2, w3 = widen_words(w, FORMAT, HOW)
    return acc + w0 * x4[0][None, :] + w1 * x4[1][None, :] + w2 * x4[2][None, :] + w3 * x4[3][None, :]


@triton.jit(do_not_specialize=["B", "eps", "emb_scale", "cap", "one"])
def _gemv_kernel(src_ptr, tok_ptr, emb_scale, tscale_ptr, delta_ptr, res_out_ptr, nscale_ptr, eps,
                 w_ptr, wscale_ptr, bias_ptr, out_ptr, out_stride,
                 conv_ptr, slots_ptr, pos_ptr, cw_ptr, cb_ptr, L,
                 cap, B, N, K, one,
                 BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 SRC: tl.constexpr, SRC_SCALED: tl.constexpr, HAS_DELTA: tl.constexpr, NORM: tl.constexpr,
                 WRITE_RES: tl.constexpr, QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, EPI: tl.constexpr,
                 CONVK: tl.constexpr, CONVR: tl.constexpr, PDL: tl.constexpr, WIDEN: tl.constexpr,
                 FLAT: tl.constexpr, WORDS: tl.constexpr, WPK: tl.constexpr, GROUP: tl.constexpr,
                 HALF_DOT: tl.constexpr):
    # WORDS (batch 1, 1-byte or int4 weights): w_ptr is the weight as int32
    # words of WPK = 4 (8 for int4) weights, [N, K / WPK], widened by
    # widen_words (WIDEN: how). int4 (GROUP > 0): wscale_ptr holds a scale
    # per GROUP columns of a row ([N, K / GROUP]), applied in the loop;
    # HALF_DOT: a word's eight products summed in float16 pairs (widen.py).
    # The norm's squares are kept per column where the weight is read as
    # words (issue-bound there), summed every tile for bf16 (NOTES D11).
    SS_COLUMNS: tl.constexpr = WORDS != 0
    pid = tl.program_id(0)
    rows, rmask, n, nmask, kk, w_rows, u_rows = tile_indices(pid, B, N, K // WPK, w_ptr, BB, BN, BK // WPK)

    # Everything that depends on no earlier kernel of this step is requested
    # before waiting for it: the first weight tile, the bias, and for the conv
    # its taps and the buffer (written by the previous step). The first product
    # of a step (SRC_TOKENS) reads the buffer after the wait: only then is
    # everything queued before the step known to be done.
    kx = tl.arange(0, BK)  # the input's columns
    if WORDS:
        # Two words (8 weights) a thread, 64-bit loads: a runtime stride of 1
        # hides that pairs of pairs are contiguous too. A thread then holds
        # the 8 input columns of its words, as one 128-bit load of the input
        # brings them: no tile goes through shared memory. (int4: one word, 8
        # weights, a thread, for the same reason.)
        if GROUP:
            kk = kk * one
        else:
            kk = (kk // 2) * 2 * one + kk % 2
    w_next = weight_tile(w_rows, kk, nmask, K // WPK)
    u_next = w_next
    if EPI == GEGLU:
        u_next = weight_tile(u_rows, kk, nmask, K // WPK)
    g_next = 1.0
    g_u_next = 1.0
    if GROUP:
        gs_rows = wscale_ptr + n.to(tl.int64) * (K // GROUP)
        g_next = _group_scales(gs_rows, kk, nmask, K // WPK, GROUP)
        if EPI == GEGLU:
            g_u_next = _group_scales(gs_rows + N * (K // GROUP), kk, nmask, K // WPK, GROUP)
    (bias, bias_u, wscale, wscale_u, earlier, tap_now, shifted, conv_base, conv_off, cm,
     is_x) = fetch_and_wait(bias_ptr, wscale_ptr, conv_ptr, slots_ptr, pos_ptr, cw_ptr, cb_ptr, rows, rmask, n, nmask,
                            N, L, SRC, HAS_BIAS, QUANT, EPI, CONVK, CONVR, PDL)

    x_next, s_next = input_tile(src_ptr, tok_ptr, emb_scale, tscale_ptr, delta_ptr, nscale_ptr, rows, rmask,
                                kx, K, SRC, SRC_SCALED, HAS_DELTA, NORM)
    # FLAT (batch 1, 1-byte weights): a 2-D accumulator in the weight tile's own
    # layout, so the widened tile is not reshuffled through shared memory to meet
    # a 3-D one. Measured on the H100 it helps fp8 and int8 but slows bf16 (2.20
    # -> 2.43 ms a step), so bf16 keeps the 3-D one (bench/NOTES.md, Q1).
    acc = _zeros_acc(BB, BN, BK // WPK, FLAT)
    acc_u = acc
    ss = tl.zeros((BB, BK) if SS_COLUMNS else (BB,), tl.float32)
    for k0 in range(0, K, BK):
        # Two tiles of weights in flight (the one used now and the next), and the
        # input's next tile requested with them: no round trip to L2 waits in
        # the loop.
        w = w_next
        w_next = weight_tile(w_rows, (k0 + BK) // WPK + kk, nmask, K // WPK)
        u = w
        if EPI == GEGLU:
            u = u_next
            u_next = weight_tile(u_rows, (k0 + BK) // WPK + kk, nmask, K // WPK)
        g, g_u = g_next, g_u_next
        if GROUP:
            g_next = _group_scales(gs_rows, (k0 + BK) // WPK + kk, nmask, K // WPK, GROUP)
            if EPI == GEGLU:
                g_u_next = _group_scales(gs_rows + N * (K // GROUP), (k0 + BK) // WPK + kk, nmask, K // WPK, GROUP)
        k = k0 + kx
        v = x_next
        scale = s_next
        x_next, s_next = input_tile(src_ptr, tok_ptr, emb_scale, tscale_ptr, delta_ptr, nscale_ptr, rows, rmask,
                                    k + BK, K, SRC, SRC_SCALED, HAS_DELTA, NORM)
        xin, ss = _prologue(v, scale, ss, res_out_ptr, rows, rmask, k, K, pid, NORM, WRITE_RES, SS_COLUMNS)
        if HALF_DOT:
            xh, back = half_pairs(_columns_of_int4_words(tl.sum(xin, axis=0)), WIDEN)
            acc += int4_word_dots(w, xh, WIDEN) * (g * back[None, :])
            if EPI == GEGLU:
                acc_u += int4_word_dots(u, xh, WIDEN) * (g_u * back[None, :])
        elif GROUP:
            x8 = _columns_of_int4_words(tl.sum(xin, axis=0))
            acc = _dot_int4_words(acc, w, x8, g, WIDEN)
            if EPI == GEGLU:
                acc_u = _dot_int4_words(acc_u, u, x8, g_u, WIDEN)
        elif WORDS:
            x4 = _columns_of_words(tl.sum(xin, axis=0))
            acc = _dot_words(acc, w, x4, WORDS, WIDEN)
            if EPI == GEGLU:
                acc_u = _dot_words(acc_u, u, x4, WORDS, WIDEN)
        elif FLAT:
            x1 = tl.sum(xin, axis=0)  # [BK]: the one row
            acc += widen(w, WIDEN) * x1[None, :]
            if EPI == GEGLU:
                acc_u += widen(u, WIDEN) * x1[None, :]
        else:
            acc += widen(w, WIDEN)[None, :, :] * xin[:, None, :]
            if EPI == GEGLU:
                acc_u += widen(u, WIDEN)[None, :, :] * xin[:, None, :]

    # the model dtype, in which the unfused path rounds (the weights' own dtype unless QUANT)
    dt_ptr = nscale_ptr if NORM else src_ptr
    # (the sum inside the call: as a statement of its own ptxas gives the words
    # a different schedule from the one measured)
    epilogue(_rows(acc, FLAT), _rows(acc_u, FLAT), tl.sum(ss, axis=1) if SS_COLUMNS else ss, K, eps, dt_ptr, rows,
             rmask, n, nmask, out_ptr, out_stride, cap, bias, bias_u, wscale, wscale_u, conv_ptr, L, earlier,
             tap_now, shifted, conv_base, conv_off, cm, is_x, NORM, QUANT, HAS_BIAS, EPI, CONVK, CONVR)


MAX_BATCH = 16
# (BN, BK, num_warps) at batch 1, per epilogue, tuned on the 2B shapes (bench/dev/tune_gemv.py):
# many small programs keep more independent loads in flight per SM.
BATCH1_CONFIGS = MappingProxyType({"plain": (2, 512, 2), "conv": (4, 256, 2), "geglu": (4, 128, 2),
                                   "softcap": (8, 256, 4)})
# int8 / fp8 read as words at batch 1, tuned on the 2B shapes with fp8
# (bench/dev/tune_gemv.py --quantize fp8; bench/NOTES.md Q9); a "plain"
# product with K >= 2N (the MLP's down product) takes WORDS_LONG_K.
WORDS_BATCH1_CONFIGS = MappingProxyType({"plain": (4, 1024, 4), "conv": (4, 512, 2), "geglu": (4, 512, 2),
                                         "softcap": (16, 256, 4)})
WORDS_LONG_K = (2, 2048, 4)
# int4 at batch 1, tuned on the 2B shapes (the half dot with per-word scales;
# NOTES Q7): a tile row of 256 x warps columns or more, one word a thread or
# more (no trip through shared memory).
INT4_BATCH1_CONFIGS = MappingProxyType({"plain": (4, 1024, 4), "conv": (4, 512, 2), "geglu": (4, 512, 2),
                                        "softcap": (4, 512, 2)})
# Triton's interpreter (CPU tests): the cost per program dominates.
INTERPRETER_CONFIG = (64, 64, 4)


def default_config(batch_bucket: int, epilogue: str, on_gpu: bool = True,
                   weight_bytes: int = 2) -> tuple[int, int, int]:
    """(BN, BK, num_warps) for a call whose batch rounds up to `batch_bucket`.
    Batches above 1 take the matmul path unless a KernelConfig raises
    gemv_max_batch; they get an untuned shape that keeps the float32
    accumulator at 4096 values per program. 1-byte (int8 / fp8) weights at
    batch 1 get twice the bf16 tiles' columns, so a tile is as many bytes
    (untuned: bench/dev/tune_gemv.py --quantize sweeps them). The
    tensor-core kernel's default is gemv_tc.DEFAULT_BLOCK."""
    if not on_gpu:
        return INTERPRETER_CONFIG
    if batch_bucket == 1:
        bn, bk, warps = BATCH1_CONFIGS[epilogue]
        return bn, bk * 2 // weight_bytes, warps
    return 8, max(16, 512 // batch_bucket), 4


def words_config(epilogue: str, int4: bool, n_rows: int, k: int) -> tuple[int, int, int]:
    """(BN, BK, num_warps) of a batch-1 product that reads its weight [n_rows,
    k] as words, on a GPU: int8 / fp8 (int4: True) per epilogue, a long-K
    plain product (the MLP's down) its own."""
    if int4:
        return INT4_BATCH1_CONFIGS[epilogue]
    return WORDS_LONG_K if epilogue == "plain" and k >= 2 * n_rows else WORDS_BATCH1_CONFIGS[epilogue]


def gemv(src: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, *, bias: torch.Tensor | None = None,
         delta: torch.Tensor | None = None, norm_scale: torch.Tensor | None = None, eps: float = 1e-6,
         residual_out: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
         emb_scale: float | None = None, weight_scale: torch.Tensor | None = None,
         src_scale: torch.Tensor | None = None, epilogue: str = "plain", conv: tuple | None = None,
         cap: float = 0.0, config: tuple | None = None, pdl: bool = False,
         widening: int | None = None, tensor_cores: bool = False, workspace: tuple | None = None,
         words: bool | None = False, half_dot: bool = False) -> torch.Tensor:
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
    config: (BN, BK, num_warps), default `default_config` (`words_config` for
    weights read as words on a GPU); a 4th element
    "tc" runs the tensor-core kernel of gemv_tc.py, whose config may go on
    with num_stages and K splits ((BN, BK, num_warps, "tc"[, num_stages[,
    splits]])); tensor_cores: that kernel with its default block (ignored
    when `config` is given); workspace: its split-K workspace
    (`gemv_tc.workspace`), needed when the config splits K. pdl: launch with
    programmatic dependent launch (see pdl.py); widening: how 1-byte weights
    become float32 (`widen.py`'s variants, same values; default
    `default_widen`; the tensor-core variant casts them to the model dtype);
    words: at batch 1, read 1-byte weights as int32 words of four and widen
    them with `widen_words` (True; None: where the weight and block allow;
    False, the default: byte tensors and `widening`). int4 weights (uint8
    [N, K / 2], two a byte, weight_scale [N, K / G] per group of G columns)
    run at batch 1 only and are always read as words (of eight); half_dot:
    their products summed in float16 pairs within a word (`widen.int4_word_dots`:
    fewer instructions a weight, float16 rounding of each word's inputs, scaled
    to its largest, and of its partial sums)."""
    batch = tokens.shape[0] if tokens is not None else src.shape[0]
    assert 1 <= batch <= MAX_BATCH and out.stride(-1) == 1
    assert (weight_scale is not None) == (weight.dtype in (torch.int8, torch.float8_e4m3fn, torch.uint8))
    assert src_scale is None or (tokens is not None and norm_scale is not None)
    n_rows, k = weight.shape
    int4 = weight.dtype == torch.uint8
    if int4:  # two weights a byte, a scale per group: only the batch-1 word path reads them
        k *= 2
        if batch > 1 or tensor_cores or (config is not None and len(config) != 3):
            raise ValueError("int4 weights run the batch-1 GEMV reading words (not the tensor-core variant, "
                             "not a batch above 1)")
        words = True
    elif half_dot:
        raise ValueError("half_dot applies to int4 weights only")
    epi = EPILOGUES[epilogue]
    n_out = n_rows // 2 if epilogue == "geglu" else n_rows
    if config is not None:
        tensor_cores = len(config) >= 4 and config[3] == gemv_tc.TENSOR_CORES
    if conv is not None:
        conv_state, slots, pos, conv_w, conv_b = conv
        convk, lw = conv_w.shape
    else:
        conv_state = slots = pos = conv_w = conv_b = weight
        convk, lw = 2, 1
    dummy = weight
    # an int4 embedding table (SRC_SCALED > 1): the columns a scale covers
    src_scaled = 0 if src_scale is None else k // src_scale.shape[1] if src.dtype == torch.uint8 else 1
    args = (src, tokens if tokens is not None else dummy, float(emb_scale or 1.0),
            src_scale if src_scale is not None else dummy,
            delta if delta is not None else dummy, residual_out if residual_out is not None else dummy,
            norm_scale if norm_scale is not None else dummy, float(eps),
            weight, weight_scale if weight_scale is not None else dummy,
            bias if bias is not None else dummy, out, out.stride(0),
            conv_state, slots, pos, conv_w, conv_b, lw,
            float(cap or 0.0), batch, n_out, k)
    consts = dict(SRC=1 if tokens is not None else 0, SRC_SCALED=src_scaled, HAS_DELTA=delta is not None,
                  NORM=norm_scale is not None, WRITE_RES=residual_out is not None,
                  QUANT=weight_scale is not None and not int4,
                  HAS_BIAS=bias is not None, EPI=epi, CONVK=convk, CONVR=triton.next_power_of_2(max(convk - 1, 1)),
                  PDL=pdl, WIDEN=default_widen(weight) if widening is None else widening)
    if tensor_cores:
        gemv_tc.gemv_tc(args, n_out=n_out, k=k, config=config, workspace=workspace, pdl=pdl, consts=consts)
        return out
    bb = triton.next_power_of_2(batch)
    if config is not None and len(config) != 3:
        raise ValueError(f"gemv config {config!r}: want (BN, BK, num_warps) or a tensor-core config")
    flat = bb == 1 and weight_scale is not None
    wpk = 8 if int4 else 4  # weights a word
    word_layout = (flat and k % (2 * wpk) == 0 and weight.stride(1) == 1 and weight.stride(0) % 4 == 0
                   and weight.storage_offset() % 4 == 0)
    if config is None and weight.is_cuda and (int4 or (words is not False and word_layout)):
        config = words_config(epilogue, int4, n_rows, k)
    bn, bk, warps = config or default_config(bb, epilogue, weight.is_cuda, weight.element_size())
    bk = min(bk, max(16, triton.next_power_of_2(k)))
    if words is not False:  # True, or None: where the weight and block allow
        can_words = word_layout and bk >= 8 * wpk
        if words and not can_words:
            raise ValueError("gemv(words=True) needs batch 1, 1-byte (or int4) weights with rows of a multiple "
                             "of 4 bytes (contiguous, aligned) and a block of BK >= 64")
        words = can_words
    if words:
        args = args[:8] + (weight.view(torch.int32),) + args[9:]
        fmt = WORDS_INT4 if int4 else WORDS_INT8 if weight.dtype == torch.int8 else WORDS_E4M3
        consts.update(WIDEN=WORDS_PTX if weight.is_cuda else WORDS_BITS, WORDS=fmt, WPK=wpk,
                      GROUP=k // weight_scale.shape[-1] if int4 else 0, HALF_DOT=half_dot)
    else:
        consts.update(WORDS=0, WPK=1, GROUP=0, HALF_DOT=False)
    _gemv_kernel[(triton.cdiv(n_out, bn),)](*args, 1, BB=bb, BN=bn, BK=bk, FLAT=flat, num_warps=warps, **consts,
                                            **launch_kwargs(pdl))
    return out
