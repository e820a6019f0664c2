"""RG-LRU prefill scan: h_t = a_t * h_{t-1} + x_t over a chunk, per channel,
from the session's state, float32 throughout.

Each program owns a block of channels of one row and walks the chunk in tiles
of TT time steps. Within a tile the recurrence is an associative scan over
(a, x) pairs, (a1, x1) then (a2, x2) = (a1 a2, a2 x1 + x2), so the tile's
steps run in parallel and the carried state joins at the tile's start: the
sequential depth is T / TT tiles instead of T steps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _combine(a1, x1, a2, x2):
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _rglru_scan_kernel(a_ptr, x_ptr, h_ptr, y_ptr, T, L, TT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < L
    h = tl.load(h_ptr + row * L + cols, mask=cmask, other=0.0)
    base = row.to(tl.int64) * T * L
    last = (tl.arange(0, TT) == TT - 1)[:, None]
    for t0 in range(0, T, TT):
        steps = t0 + tl.arange(0, TT)
        mask = (steps < T)[:, None] & cmask[None, :]
        offs = base + steps[:, None] * L + cols[None, :]
        # padding steps are a = 1, x = 0: they carry the state unchanged to the tile's last row
        a = tl.load(a_ptr + offs, mask=mask, other=1.0)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        a_cum, x_cum = tl.associative_scan((a, x), 0, _combine)
        hs = a_cum * h[None, :] + x_cum
        tl.store(y_ptr + offs, hs.to(y_ptr.dtype.element_ty), mask=mask)
        h = tl.sum(tl.where(last, hs, 0.0), axis=0)
    tl.store(h_ptr + row * L + cols, h, mask=cmask)


def rglru_scan(a: torch.Tensor, x: torch.Tensor, h: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a, x: [B, T, L] float32 (decay and normalized input; a = 0 where a
    position resets the state); h: [B, L] float32, the state before the chunk,
    overwritten with the state after it. Returns y [B, T, L] in `out_dtype`:
    every step's state, as the reference rounds it."""
    batch, steps, width = x.shape
    a, x = a.contiguous(), x.contiguous()
    y = torch.empty(batch, steps, width, dtype=out_dtype, device=x.device)
    block = min(128, triton.next_power_of_2(width))
    _rglru_scan_kernel[(batch, triton.cdiv(width, block))](a, x, h, y, steps, width, TT=32, BLOCK=block)
    return y
