"""The fp8 tensor-core product of decode batches: y = (xq @ wq.T) * x_scale
* w_scale (+ bias), e4m3 operands, float32 accumulation, bfloat16 out: what
`F.scaled_mm` with row-wise scales computes (`fast.qlinear.fp8_linear`).
With bfloat16 rows instead (no x_scale), each weight tile is widened to
bfloat16 in registers: the input is not rounded to e4m3 and needs no launch
of its own to quantize it; a bfloat16 weight (no w_scale) makes it a plain
bfloat16 product, for comparisons with cuBLAS.

At 8-256 rows cuBLAS takes about 10 us for any of the 2B products, whatever
their size (128 x 128 output tiles, each walking all of K): the narrow ones
finish sooner in 64-wide tiles, and a long K sooner in slices whose float32
partials a second launch sums with the scales and the bias (bench/NOTES.md
D15); `preferred` says for which sizes. `fp8_matmul_ref` is the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

Block = tuple[int, int, int, int, int, int]  # (BM, BN, BK, num_warps, num_stages, K slices)


@triton.jit
def _fp8_matmul_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, K_SLICE, x_stride,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PARTIAL: tl.constexpr,
                       HAS_BIAS: tl.constexpr, X_SCALE: tl.constexpr, W_SCALE: tl.constexpr,
                       FLOAT32_DOT: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = pid_k * K_SLICE + tl.arange(0, BK)
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * x_stride + rk[None, :]
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    acc = tl.zeros((BM, BN), tl.float32)
    for _ in range(0, K_SLICE, BK):
        a = tl.load(x_ptrs, mask=(rm < M)[:, None], other=0.0)
        b = tl.load(w_ptrs, mask=(rn < N)[:, None], other=0.0, eviction_policy="evict_first")
        if FLOAT32_DOT:  # the interpreter (Triton 3.9) multiplies bfloat16 tiles as integers
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b.to(a.dtype)), acc)
        x_ptrs += BK
        w_ptrs += BK
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if PARTIAL:  # this K slice's float32 sums; `_sum_kernel` finishes them
        tl.store(y_ptr + (pid_k * M + rm[:, None]).to(tl.int64) * N + rn[None, :], acc, mask=mask)
    else:
        if X_SCALE:
            acc = acc * tl.load(xs_ptr + rm, mask=rm < M, other=0.0)[:, None]
        if W_SCALE:
            acc = acc * tl.load(ws_ptr + rn, mask=rn < N, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_kernel(p_ptr, xs_ptr, ws_ptr, b_ptr, y_ptr, M, N, SLICES: tl.constexpr, HAS_BIAS: tl.constexpr,
                X_SCALE: tl.constexpr, W_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < M * N
    acc = tl.load(p_ptr + i, mask=mask, other=0.0)
    for s in tl.static_range(1, SLICES):  # in slice order: the same sums whatever the schedule
        acc += tl.load(p_ptr + s * M * N + i, mask=mask, other=0.0)
    n = i % N
    if X_SCALE:
        acc = acc * tl.load(xs_ptr + i // N, mask=mask, other=0.0)
    if W_SCALE:
        acc = acc * tl.load(ws_ptr + n, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=mask)


def default_block(m: int, n: int, k: int, on_gpu: bool = True) -> Block:
    """The block of an [m, k] x [k, n] product: the best of H100 sweeps of
    the 2B shapes at 8-256 rows (bench/dev/fp8_gemm.py): 64 x 64 tiles; at
    more than 64 rows 64 x 128 (up to 128 rows) or 128 x 128 for a wide
    product (n >= 4k) and 128 x 64 for a long one; a long product (k >= 3n)
    in three K slices. The interpreter gets small tiles (its cost is per
    element)."""
    slices = 3 if k >= 3 * n and k % (3 * 128) == 0 else 1
    if not on_gpu:
        return 16, 32, 32, 1, 1, 2 if k % 64 == 0 else 1
    if m <= 64:
        return 64, 64, 128, 4, 4, slices
    if n >= 4 * k:
        return (64, 128, 128, 4, 4, 1) if m <= 128 else (128, 128, 128, 8, 3, 1)
    return (128 if slices > 1 else 64), 64, 128, 4, 4, slices


def preferred(m: int, n: int, k: int) -> bool:
    """Whether this kernel beat cuBLAS for a product of this size in the H100
    measurements (bench/NOTES.md D15): at most 128 rows, every 2B and 9B
    product; above that only the small ones (at most 8 M weights, or 20 M in
    K slices). At 256 rows the 2B x|y and gate|up products took as long either
    way, and a 9B step with every product here 11% longer than on cuBLAS."""
    return m <= 128 or n * k <= 8 << 20 or (k >= 3 * n and n * k <= 20 << 20)


def fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor | None, weight: torch.Tensor, w_scale: torch.Tensor | None,
               bias: torch.Tensor | None = None, block: Block | None = None) -> torch.Tensor:
    """xq [M, K] e4m3 with x_scale float32 [M] or [M, 1], or bfloat16 with
    x_scale None (rows contiguous); weight [N, K] e4m3 with w_scale float32
    [N], or bfloat16 with w_scale None; bias [N] or None -> bfloat16 [M, N].
    K must be a multiple of BK x slices of the block (default `default_block`)."""
    m, k = xq.shape
    n = weight.shape[0]
    e4m3, bf16 = torch.float8_e4m3fn, torch.bfloat16
    formats = {(e4m3, True), (bf16, False)}
    if xq.stride(1) != 1 or not weight.is_contiguous() or weight.shape[1] != k \
            or (xq.dtype, x_scale is not None) not in formats or (weight.dtype, w_scale is not None) not in formats \
            or (xq.dtype, weight.dtype) == (e4m3, bf16) \
            or (w_scale is not None and w_scale.shape != (n,)) or (x_scale is not None and x_scale.numel() != m):
        raise ValueError(f"fp8_matmul: want xq [M, K] e4m3 with scales [M] or bfloat16 without, rows contiguous; "
                         f"weight [N, K] contiguous, e4m3 with scales [N] or bfloat16 without (not under an e4m3 "
                         f"xq); got {xq.dtype} {tuple(xq.shape)}, {weight.dtype} {tuple(weight.shape)}, scales "
                         f"{_shape(x_scale)} and {_shape(w_scale)}")
    bm, bn, bk, warps, stages, slices = block or default_block(m, n, k, xq.is_cuda)
    if k % (bk * slices):
        raise ValueError(f"fp8_matmul: K ({k}) is not a multiple of BK ({bk}) x slices ({slices})")
    # (read as dense vectors; an absent scale is a valid pointer, not read)
    xs = x_scale.reshape(m).contiguous() if x_scale is not None else xq
    ws = w_scale.contiguous() if w_scale is not None else weight
    bias = bias.contiguous() if bias is not None else ws
    flags = dict(HAS_BIAS=bias is not ws, X_SCALE=x_scale is not None, W_SCALE=w_scale is not None)
    y = torch.empty(m, n, dtype=torch.bfloat16, device=xq.device)
    partial = slices > 1
    out = torch.empty(slices, m, n, dtype=torch.float32, device=xq.device) if partial else y
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), slices)
    _fp8_matmul_kernel[grid](xq, weight, xs, ws, bias, out, m, n, k, k // slices, xq.stride(0), BM=bm, BN=bn,
                             BK=bk, PARTIAL=partial, FLOAT32_DOT=not xq.is_cuda and xq.dtype == bf16,
                             num_warps=warps, num_stages=stages, **flags)
    if partial:
        size = 1024
        _sum_kernel[(triton.cdiv(m * n, size),)](out, xs, ws, bias, y, m, n, SLICES=slices, BLOCK=size,
                                                 num_warps=4, **flags)
    return y


def _shape(t: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


def fp8_matmul_ref(xq: torch.Tensor, x_scale: torch.Tensor | None, weight: torch.Tensor,
                   w_scale: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`fp8_matmul` in float32 torch ops: the exact products, summed in another order."""
    y = xq.float() @ weight.float().t()
    if x_scale is not None:
        y = y * x_scale.reshape(-1, 1).float()
    if w_scale is not None:
        y = y * w_scale.float()[None, :]
    return (y if bias is None else y + bias.float()).to(torch.bfloat16)
