"""The fp8 tensor-core product of decode batches: y = (xq @ wq.T) * x_scale
* w_scale (+ bias), e4m3 operands, float32 accumulation, bfloat16 out: what
`F.scaled_mm` with row-wise scales computes (`fast.qlinear.fp8_linear`).

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

from .pdl import gdc_launch_dependents, gdc_wait, launch_kwargs

Block = tuple[int, int, int, int, int, int]  # (BM, BN, BK, num_warps, num_stages, K slices)


@triton.jit
def _fp8_matmul_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, K_SLICE, x_stride,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PARTIAL: tl.constexpr,
                       HAS_BIAS: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # (nothing is read before the wait)
        gdc_launch_dependents()
        gdc_wait()
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
        acc = tl.dot(a, tl.trans(b), acc)
        x_ptrs += BK
        w_ptrs += BK
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if PARTIAL:  # this K slice's float32 sums; `_sum_kernel` finishes them
        tl.store(y_ptr + (pid_k * M + rm[:, None]).to(tl.int64) * N + rn[None, :], acc, mask=mask)
    else:
        acc = acc * tl.load(xs_ptr + rm, mask=rm < M, other=0.0)[:, None]
        acc = acc * tl.load(ws_ptr + rn, mask=rn < N, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_kernel(p_ptr, xs_ptr, ws_ptr, b_ptr, y_ptr, M, N, SLICES: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # (nothing is read before the wait)
        gdc_launch_dependents()
        gdc_wait()
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < M * N
    acc = tl.load(p_ptr + i, mask=mask, other=0.0)
    for s in tl.static_range(1, SLICES):  # in slice order: the same sums whatever the schedule
        acc += tl.load(p_ptr + s * M * N + i, mask=mask, other=0.0)
    n = i % N
    acc = acc * tl.load(xs_ptr + i // N, mask=mask, other=0.0) * tl.load(ws_ptr + n, mask=mask, other=0.0)
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


def fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None = None, block: Block | None = None, pdl: bool = False) -> torch.Tensor:
    """xq [M, K] e4m3 (rows contiguous), x_scale float32 [M] or [M, 1], weight
    [N, K] e4m3, w_scale float32 [N], bias [N] or None -> bfloat16 [M, N].
    K must be a multiple of BK x slices of the block (default `default_block`).
    pdl: launch with programmatic dependent launch (see pdl.py)."""
    m, k = xq.shape
    n = weight.shape[0]
    if xq.stride(1) != 1 or not weight.is_contiguous() or weight.shape[1] != k or w_scale.shape != (n,) \
            or x_scale.numel() != m:
        raise ValueError(f"fp8_matmul: want xq [M, K] with contiguous rows, weight [N, K] contiguous, scales [M] "
                         f"and [N]; got {tuple(xq.shape)}, {tuple(weight.shape)}, {tuple(x_scale.shape)}, "
                         f"{tuple(w_scale.shape)}")
    bm, bn, bk, warps, stages, slices = block or default_block(m, n, k, xq.is_cuda)
    if k % (bk * slices):
        raise ValueError(f"fp8_matmul: K ({k}) is not a multiple of BK ({bk}) x slices ({slices})")
    x_scale, w_scale = x_scale.reshape(m).contiguous(), w_scale.contiguous()  # (read as dense vectors)
    bias = bias.contiguous() if bias is not None else None
    y = torch.empty(m, n, dtype=torch.bfloat16, device=xq.device)
    partial = slices > 1
    out = torch.empty(slices, m, n, dtype=torch.float32, device=xq.device) if partial else y
    b = bias if bias is not None else w_scale  # (a valid pointer; not read)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), slices)
    _fp8_matmul_kernel[grid](xq, weight, x_scale, w_scale, b, out, m, n, k, k // slices, xq.stride(0), BM=bm, BN=bn,
                             BK=bk, PARTIAL=partial, HAS_BIAS=bias is not None, PDL=pdl, num_warps=warps,
                             num_stages=stages, **launch_kwargs(pdl))
    if partial:
        size = 1024
        _sum_kernel[(triton.cdiv(m * n, size),)](out, x_scale, w_scale, b, y, m, n, SLICES=slices,
                                                 HAS_BIAS=bias is not None, BLOCK=size, PDL=pdl, num_warps=4,
                                                 **launch_kwargs(pdl))
    return y


def fp8_matmul_ref(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """`fp8_matmul` in float32 torch ops: the exact products, summed in another order."""
    y = (xq.float() @ weight.float().t()) * x_scale.reshape(-1, 1).float() * w_scale.float()[None, :]
    return (y if bias is None else y + bias.float()).to(torch.bfloat16)
