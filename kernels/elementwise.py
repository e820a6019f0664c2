"""Small fused row kernels of the decode step: residual add + RMSNorm, GeGLU,
and the logits soft-cap with the cast to float32. Each replaces two to four
eager PyTorch ops (and their round trips through device memory)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import gdc_launch_dependents, gdc_wait, launch_kwargs
from .recurrent_decode import _gelu_tanh


@triton.jit
def _store_fp8_row(y, q_ptr, qs_ptr, row, cols, mask, D):
    """qmatmul.fp8_rows of the rounded row y (the program's whole row), op for op
    (bit-identical), without its launch: e4m3 values and the row's scale."""
    yf = y.to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(yf), axis=0) / 448.0, 1e-12)
    tl.store(q_ptr + row * D + cols, (yf / s).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(qs_ptr + row, s)


@triton.jit
def _add_rmsnorm_kernel(x_ptr, delta_ptr, scale_ptr, normed_ptr, q_ptr, qs_ptr, D, eps,
                        HAS_DELTA: tl.constexpr, FP8: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # (nothing is read before the wait)
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        # the residual stream is kept in the model dtype, as in the reference
        x = (x.to(tl.float32) + tl.load(delta_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + row * D + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / D
    y = xf / tl.sqrt(var + eps) * (1.0 + tl.load(scale_ptr + cols, mask=mask, other=0.0).to(tl.float32))
    y = y.to(normed_ptr.dtype.element_ty)
    tl.store(normed_ptr + row * D + cols, y, mask=mask)
    if FP8:
        _store_fp8_row(y, q_ptr, qs_ptr, row, cols, mask, D)


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | None, scale: torch.Tensor, eps: float,
                normed: torch.Tensor, fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
                pdl: bool = False) -> torch.Tensor:
    """x: residual stream [B, D] (x += delta in place when delta is given);
    scale: [D]; normed: [B, D] output = x / rms(x) * (1 + scale). fp8: (e4m3
    [B, D], float32 [B, 1]) buffers that also receive `qmatmul.fp8_rows(normed)`,
    the fp8 tensor-core product's input, in the same launch. pdl: launch with
    programmatic dependent launch (see pdl.py)."""
    batch, width = x.shape
    q, qs = fp8 if fp8 is not None else (normed, normed)
    _add_rmsnorm_kernel[(batch,)](x, delta if delta is not None else x, scale, normed, q, qs, width, eps,
                                  HAS_DELTA=delta is not None, FP8=fp8 is not None,
                                  BLOCK=triton.next_power_of_2(width), PDL=pdl,
                                  num_warps=8 if width >= 2048 else 4, **launch_kwargs(pdl))
    return normed


@triton.jit
def _geglu_kernel(in_ptr, out_ptr, q_ptr, qs_ptr, E, BLOCK: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # (nothing is read before the wait)
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < E
    gate = tl.load(in_ptr + row * 2 * E + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(in_ptr + row * 2 * E + E + cols, mask=mask, other=0.0).to(tl.float32)
    h = (_gelu_tanh(gate) * up).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * E + cols, h, mask=mask)
    if FP8:  # with FP8 a program holds the whole row (one block per row)
        _store_fp8_row(h, q_ptr, qs_ptr, row, cols, mask, E)


def geglu(gate_up: torch.Tensor, out: torch.Tensor,
          fp8: tuple[torch.Tensor, torch.Tensor] | None = None, pdl: bool = False) -> torch.Tensor:
    """gate_up: [B, 2E] (gate | up); out: [B, E] = gelu_tanh(gate) * up. fp8:
    (e4m3 [B, E], float32 [B, 1]) buffers that also receive
    `qmatmul.fp8_rows(out)`, the input of the fp8 tensor-core product that
    follows (the down projection), in the same launch. pdl: as `add_rmsnorm`."""
    batch, e = out.shape
    if fp8 is None:
        block, warps = 1024, 4
        q, qs = out, out
    else:
        block = triton.next_power_of_2(e)
        warps = min(16, max(4, block // 1024))  # as fp8_rows launches a row
        q, qs = fp8
    _geglu_kernel[(batch, triton.cdiv(e, block))](gate_up, out, q, qs, e, BLOCK=block, FP8=fp8 is not None,
                                                  PDL=pdl, num_warps=warps, **launch_kwargs(pdl))
    return out


@triton.jit
def _softcap_kernel(in_ptr, out_ptr, V, cap, HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    x = tl.load(in_ptr + row * V + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_CAP:
        x = cap * (2.0 * tl.sigmoid(2.0 * x / cap) - 1.0)  # cap * tanh(x / cap)
    tl.store(out_ptr + row * V + cols, x, mask=mask)


def softcap(logits: torch.Tensor, cap: float, out: torch.Tensor) -> torch.Tensor:
    """logits: [B, V] model dtype; out: [B, V] float32 = cap * tanh(logits / cap)
    (a plain cast when cap is 0)."""
    batch, vocab = logits.shape
    block = 2048
    _softcap_kernel[(batch, triton.cdiv(vocab, block))](logits, out, vocab, float(cap or 1.0),
                                                        HAS_CAP=bool(cap), BLOCK=block)
    return out
