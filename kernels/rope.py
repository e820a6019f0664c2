"""RoPE in place on the query heads and the key head of a chunk's fused q|k|v
rows, the reference's partial rotation (first half of each head)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_decode import _rope_rows


@triton.jit(do_not_specialize=["p0"])
def _rope_chunk_kernel(qkv_ptr, qkv_stride, p0, inv_freq_ptr, HD: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)  # 0 .. H-1 are queries, H is the key
    one = tl.arange(0, 1)
    dims = tl.arange(0, HD)
    base = qkv_ptr + row * qkv_stride
    rotated = _rope_rows(base, one + head, dims, p0 + row, inv_freq_ptr, one >= 0, HD)
    tl.store(base + (one[:, None] + head) * HD + dims[None, :], rotated.to(qkv_ptr.dtype.element_ty))


def rope_chunk(qkv: torch.Tensor, num_heads: int, head_dim: int, p0: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """qkv: [T, (H + 2) * hd] rows of positions p0 .. p0 + T - 1; rotates the
    H query heads and the key head in place (values untouched)."""
    _rope_chunk_kernel[(qkv.shape[0], num_heads + 1)](qkv, qkv.stride(0), p0, inv_freq, HD=head_dim)
    return qkv
