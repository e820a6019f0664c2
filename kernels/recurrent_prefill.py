"""Recurrent-block prefill kernels for one session's chunk of T tokens, the
state read from and written to the pool at the session's slot.

- `conv1d_chunk`: the depthwise causal conv over the chunk, the first K-1
  inputs coming from the slot's conv buffer (the caller shifts the buffer
  afterwards: programs of this launch read it concurrently).
- `rglru_chunk`: from the gate pre-activations, everything else of the RG-LRU
  (sigmoids, decay, input normalisation, reset at position 0), the scan with
  the float32 state in place (an associative scan within tiles of TT steps),
  and the product with gelu(y).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .recurrent_decode import _gelu_tanh


@triton.jit
def _combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): h -> a2 (a1 h + x1) + x2
    return a1 * a2, a2 * x1 + x2


# slot and p0 are host ints: unspecialised, so 0 and 1 are not turned into constants
@triton.jit(do_not_specialize=["slot", "p0"])
def _conv1d_chunk_kernel(xy_ptr, xy_stride, conv_ptr, slot, p0, w_ptr, b_ptr, out_ptr, T, L,
                         K: tl.constexpr, BT: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < L
    rmask = rows < T
    buf = conv_ptr + slot.to(tl.int64) * (K - 1) * L
    acc = tl.zeros((BT, BLOCK), tl.float32)
    for k in tl.static_range(0, K):
        src = rows - k  # the input k steps back: in the chunk if >= 0, else in the buffer
        exists = (p0 + src >= 0)[:, None] & rmask[:, None] & cmask[None, :]
        from_chunk = tl.load(xy_ptr + src[:, None] * xy_stride + cols[None, :],
                             mask=exists & (src >= 0)[:, None], other=0.0)
        from_buf = tl.load(buf + (K - 1 + src)[:, None] * L + cols[None, :],
                           mask=exists & (src < 0)[:, None], other=0.0)
        wk = tl.load(w_ptr + (K - 1 - k) * L + cols, mask=cmask, other=0.0).to(tl.float32)
        acc += (from_chunk.to(tl.float32) + from_buf.to(tl.float32)) * wk[None, :]
    acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * L + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


def conv1d_chunk(xy: torch.Tensor, conv_state: torch.Tensor, slot: int, p0: int, w: torch.Tensor,
                 b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """xy: [T, >=L] (the first L columns are linear_x's output); conv_state:
    pool buffer [S, K-1, L] (read only); slot, p0: the session's slot and the
    position of the chunk's first token; w: [K, L]; b: [L]; out: [T, L]."""
    steps = xy.shape[0]
    k, width = w.shape
    block = min(256, triton.next_power_of_2(width))
    _conv1d_chunk_kernel[(triton.cdiv(steps, 16), triton.cdiv(width, block))](
        xy, xy.stride(0), conv_state, slot, p0, w, b, out, steps, width, K=k, BT=16, BLOCK=block)
    return out


@triton.jit(do_not_specialize=["slot", "p0"])
def _rglru_chunk_kernel(gates_ptr, bx_ptr, ba_ptr, xc_ptr, y_ptr, y_stride, h_ptr, slot, p0,
                        neg8_ptr, out_ptr, T, L, BW, TT: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < L
    head = cols // BW
    j = cols % BW
    # gate pre-activations come as [2, H, T, BW]: input gate then a gate
    gx_base = head * T * BW + j
    ga_base = (L // BW) * T * BW + gx_base
    bx = tl.load(bx_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    ba = tl.load(ba_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    neg8 = tl.load(neg8_ptr + cols, mask=cmask, other=0.0)
    h_off = slot.to(tl.int64) * L + cols
    h = tl.load(h_ptr + h_off, mask=cmask, other=0.0)
    last = (tl.arange(0, TT) == TT - 1)[:, None]
    for t0 in range(0, T, TT):
        steps = t0 + tl.arange(0, TT)
        mask = (steps < T)[:, None] & cmask[None, :]
        gx = tl.load(gates_ptr + gx_base[None, :] + steps[:, None] * BW, mask=mask, other=0.0).to(tl.float32)
        ga = tl.load(gates_ptr + ga_base[None, :] + steps[:, None] * BW, mask=mask, other=0.0).to(tl.float32)
        gx = tl.sigmoid(gx + bx[None, :])
        ga = tl.sigmoid(ga + ba[None, :])
        log_a = neg8[None, :] * ga
        a = tl.exp(log_a)
        mult = tl.sqrt(1.0 - tl.exp(2.0 * log_a))
        reset = (p0 + steps == 0)[:, None]
        a = tl.where(reset, 0.0, a)
        mult = tl.where(reset, 1.0, mult)
        xc = tl.load(xc_ptr + steps[:, None] * L + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = xc * gx * mult
        a = tl.where(mask, a, 1.0)  # padding steps carry the state unchanged
        x = tl.where(mask, x, 0.0)
        a_cum, x_cum = tl.associative_scan((a, x), 0, _combine)
        hs = a_cum * h[None, :] + x_cum
        y = tl.load(y_ptr + steps[:, None] * y_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out = hs.to(out_ptr.dtype.element_ty).to(tl.float32) * _gelu_tanh(y)
        tl.store(out_ptr + steps[:, None] * L + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
        h = tl.sum(tl.where(last, hs, 0.0), axis=0)
    tl.store(h_ptr + h_off, h, mask=cmask)


def rglru_chunk(gates: torch.Tensor, bx: torch.Tensor, ba: torch.Tensor, xc: torch.Tensor, y: torch.Tensor,
                h_state: torch.Tensor, slot: int, p0: int, neg8_softplus_a: torch.Tensor,
                out: torch.Tensor) -> torch.Tensor:
    """gates: [2, H, T, bw] pre-activations of the input gate and the a gate
    (block-diagonal products, bias not added); bx, ba: gate biases [H, bw];
    xc: conv output [T, L]; y: linear_y's output (pre-gelu) [T, L] view with row
    stride; h_state: pool [S, L] float32 (the slot's row is updated in place);
    p0: position of the chunk's first token; out: [T, L] = h.to(dtype) * gelu(y)."""
    steps, width = xc.shape
    bw = gates.shape[-1]
    block = min(64, triton.next_power_of_2(width))
    _rglru_chunk_kernel[(triton.cdiv(width, block),)](
        gates, bx, ba, xc, y, y.stride(0), h_state, slot, p0, neg8_softplus_a, out, steps, width, bw,
        TT=32, BLOCK=block)
    return out
