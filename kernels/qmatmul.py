"""Matrix product with a quantized weight, dequantized in registers:
y[M, N] = (x[M, K] @ q[N, K].T) * scale[N] (+ bias[N]).

The batched decode and the prefill of int8 weights (and of fp8 weights where
fp8 tensor cores are not usable). Each program owns a [BM, BN] tile of y and
walks K in BK steps: the weight tile is loaded as stored (1 byte per weight)
and widened to the activation dtype in registers, exactly (an int8 or e4m3
value is representable in bfloat16), so the tensor cores multiply in the
activation dtype with a float32 accumulator; the row scale and the bias are
applied once, in the epilogue. Nothing is dequantized through device memory
here; `dequantize` (one pass, bit for bit the reference's rounding) serves
the long products that qlinear.py runs on cuBLAS instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import gdc_launch_dependents, gdc_wait, launch_kwargs
from .widen import CONVERT, default_widen, widen


@triton.jit
def _qmatmul_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, x_stride, y_stride,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr,
                    IEEE: tl.constexpr, WIDEN: tl.constexpr, W_FIRST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mmask, nmask = rm < M, rn < N
    x_rows = x_ptr + rm[:, None].to(tl.int64) * x_stride
    if W_FIRST:  # y.T tile = q [BN, BK] @ x.T: the widened weight is the product's first operand
        w_rows = w_ptr + rn[:, None].to(tl.int64) * K
        acc = tl.zeros((BN, BM), tl.float32)
    else:  # y tile = x @ [BK, BN] tiles of q.T
        w_cols = w_ptr + rn[None, :].to(tl.int64) * K
        acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + rk
        kmask = k < K
        a = tl.load(x_rows + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        if W_FIRST:
            w = tl.load(w_rows + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0,
                        eviction_policy="evict_first")
        else:
            w = tl.load(w_cols + k[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0,
                        eviction_policy="evict_first")
        if WIDEN == 0:
            w = w.to(a.dtype)
        else:  # through float32, exactly (widen.py's variants, under measurement)
            w = widen(w, WIDEN).to(a.dtype)
        if W_FIRST:
            if IEEE:  # float32 activations: no tf32 rounding
                acc += tl.dot(w, tl.trans(a), input_precision="ieee")
            else:
                acc += tl.dot(w, tl.trans(a))
        elif IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    if W_FIRST:
        acc = tl.trans(acc)
    acc = acc * tl.load(s_ptr + rn, mask=nmask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * y_stride + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _q4matmul_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, x_stride, y_stride,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                     HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    # int4: [BK / 2, BN] bytes of q.T a tile, unpacked to [BK, BN] values in
    # [-8, 7] (exact in the activation dtype); BK divides GROUP, so one scale
    # per column multiplies the tile's product
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rb = tl.arange(0, BK // 2)
    mmask, nmask = rm < M, rn < N
    x_rows = x_ptr + rm[:, None].to(tl.int64) * x_stride
    w_cols = w_ptr + rn[None, :].to(tl.int64) * (K // 2)
    s_cols = s_ptr + rn.to(tl.int64) * (K // GROUP)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + rk
        a = tl.load(x_rows + k[None, :], mask=mmask[:, None] & (k < K)[None, :], other=0.0)
        kb = k0 // 2 + rb
        b = tl.load(w_cols + kb[:, None], mask=(kb < K // 2)[:, None] & nmask[None, :], other=8,
                    eviction_policy="evict_first").to(tl.int32)
        pairs = tl.join((b & 0xF) - 8, (b >> 4) - 8)  # [BK / 2, BN, 2]: rows 2j, 2j + 1
        w = tl.reshape(tl.permute(pairs, (0, 2, 1)), (BK, BN)).to(a.dtype)
        if IEEE:  # float32 activations: no tf32 rounding
            part = tl.dot(a, w, input_precision="ieee")
        else:
            part = tl.dot(a, w)
        acc += part * tl.load(s_cols + k0 // GROUP, mask=nmask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * y_stride + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def q4matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
             block: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (rows contiguous), int4 weight uint8 [N, K / 2] (two a byte,
    low nibble first, stored + 8) with float32 group scales [N, K / G],
    bias [N] or None -> y [M, N] in x's dtype; the nibbles are unpacked in
    registers, each K tile's product scaled by its group's scales."""
    m, k = x.shape
    n, group = weight.shape[0], x.shape[1] // scale.shape[1]
    assert 2 * weight.shape[1] == k and x.stride(1) == 1 and weight.is_contiguous() and scale.is_contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm, bn, bk, warps, stages = block or default_block(m, x.is_cuda)
    bk = min(bk, group)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _q4matmul_kernel[grid](x, weight, scale, bias if bias is not None else scale, y, m, n, k, x.stride(0),
                           y.stride(0), BM=bm, BN=bn, BK=bk, GROUP=group, HAS_BIAS=bias is not None,
                           IEEE=x.dtype == torch.float32, num_warps=warps, num_stages=stages)
    return y


def default_block(m: int, on_gpu: bool = True) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, num_warps, num_stages) for M rows; untuned first choices
    that keep the pipelined tiles within 128 KB of shared memory (the
    interpreter gets small tiles: its cost is per element)."""
    if not on_gpu:
        return 16, 32, 32, 4, 1
    if m > 64:
        return 128, 128, 64, 8, 4
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    return bm, 128, 128, 4, 4


def qmatmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
            block: tuple[int, int, int, int, int] | None = None, widening: int | None = None,
            weight_first: bool = False) -> torch.Tensor:
    """x [M, K] (rows contiguous), weight [N, K] int8 / float8_e4m3fn, scale
    float32 [N], bias [N] or None -> y [M, N] in x's dtype. widening: how the
    weight tiles are widened (`widen.py`; 0: a direct cast; default `default_widen`).
    weight_first: each program computes y.T's tile as q @ x.T, so the widened
    weight (in registers) is the tensor cores' first operand, which Hopper's
    wgmma may take from registers (the second must come from shared memory);
    an alternative under measurement (bench/dev/quant_profile.py)."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and x.stride(1) == 1 and weight.is_contiguous() and scale.shape == (n,)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm, bn, bk, warps, stages = block or default_block(m, x.is_cuda)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _qmatmul_kernel[grid](x, weight, scale, bias if bias is not None else scale, y, m, n, k, x.stride(0), y.stride(0),
                          BM=bm, BN=bn, BK=bk, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
                          WIDEN=default_widen(weight) if widening is None else widening, W_FIRST=weight_first,
                          num_warps=warps, num_stages=stages)
    return y


@triton.jit
def _fp8_rows_kernel(x_ptr, q_ptr, s_ptr, K, x_stride, BK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # (nothing is read before the wait)
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0)
    k = tl.arange(0, BK)
    m = k < K
    x = tl.load(x_ptr + row.to(tl.int64) * x_stride + k, mask=m, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, 1e-12)  # 448: e4m3's largest finite value
    tl.store(q_ptr + row.to(tl.int64) * K + k, (x / s).to(q_ptr.dtype.element_ty), mask=m)
    tl.store(s_ptr + row, s)


def fp8_rows(x: torch.Tensor, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, 1]) with x ~= q * scale per
    row (scale = absmax / 448), in one launch: the fp8 tensor-core product's
    activation quantization, which as torch ops costs four launches. pdl: launch
    with programmatic dependent launch (see pdl.py)."""
    m, k = x.shape
    assert x.stride(1) == 1
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    bk = triton.next_power_of_2(k)
    _fp8_rows_kernel[(m,)](x, q, s, k, x.stride(0), BK=bk, PDL=pdl, num_warps=min(16, max(1, bk // 1024)),
                           **launch_kwargs(pdl))
    return q, s


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, out_ptr, N, K, BN: tl.constexpr, BK: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    m = (n < N)[:, None] & (k < K)[None, :]
    off = n[:, None].to(tl.int64) * K + k[None, :]
    q = tl.load(q_ptr + off, mask=m, other=0.0, eviction_policy="evict_first")
    scale = tl.load(s_ptr + n, mask=n < N, other=0.0)
    tl.store(out_ptr + off, (widen(q, CONVERT) * scale[:, None]).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dequantize_int4_kernel(q_ptr, s_ptr, out_ptr, N, K, GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    kb = tl.program_id(1) * (BK // 2) + tl.arange(0, BK // 2)  # the tile's bytes
    m = (n < N)[:, None] & (kb < K // 2)[None, :]
    b = tl.load(q_ptr + n[:, None].to(tl.int64) * (K // 2) + kb[None, :], mask=m, other=8).to(tl.int32)
    q = tl.reshape(tl.join((b & 0xF) - 8, (b >> 4) - 8), (BN, BK))  # columns 2j, 2j + 1: low nibble first
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    km = (n < N)[:, None] & (k < K)[None, :]
    scale = tl.load(s_ptr + n[:, None].to(tl.int64) * (K // GROUP) + (k // GROUP)[None, :], mask=km, other=0.0)
    w = (q.to(tl.float32) * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + n[:, None].to(tl.int64) * K + k[None, :], w, mask=km)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight [N, K] int8 / float8_e4m3fn times its float32 row scales [N]
    (int4: uint8 [N, K / 2] times the scales of its groups, [N, K / G]),
    rounded once to `dtype`: bit for bit `model.quantize.dequantize`, in one
    pass (1 byte read, 2 written a weight for bfloat16)."""
    if weight.dtype == torch.uint8:
        n, k = weight.shape[0], 2 * weight.shape[1]
        assert weight.is_contiguous() and scale.is_contiguous() and scale.shape[0] == n and k % scale.shape[1] == 0
        out = torch.empty(n, k, dtype=dtype, device=weight.device)
        bn, bk = (32, 256) if weight.is_cuda else (16, 32)
        _dequantize_int4_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](weight, scale, out, n, k,
                                                                          GROUP=k // scale.shape[1], BN=bn, BK=bk,
                                                                          num_warps=4)
        return out
    n, k = weight.shape
    assert weight.is_contiguous() and scale.shape == (n,)
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    bn, bk = (32, 256) if weight.is_cuda else (16, 32)
    _dequantize_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](weight, scale, out, n, k, BN=bn, BK=bk,
                                                                 num_warps=4)
    return out
