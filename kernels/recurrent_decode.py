"""Recurrent-block decode kernels: one token per row, state updated in place in
the pool at each row's slot (-1 marks a padding row, which is skipped).

Two launches, because the conv must finish reading a channel's buffer before it
is shifted, while the block-diagonal gates need every channel of a head:
- `conv1d_decode`: causal depthwise conv of width K over (buffer, current x),
  then shifts the buffer; each program owns its channels, so no races.
- `rglru_decode`: both block-diagonal gates (as [rows, bw] x [bw, BJ] dots),
  the RG-LRU update with the float32 state in place, and the gelu(y) product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import gdc_launch_dependents, gdc_wait, launch_kwargs


@triton.jit
def _gelu_tanh(x):
    # tanh(u) = 2 sigmoid(2u) - 1: portable across Triton versions and the interpreter.
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (2.0 * tl.sigmoid(2.0 * u))


@triton.jit
def _conv1d_decode_kernel(xy_ptr, xy_stride, conv_ptr, slots_ptr, pos_ptr, w_ptr, b_ptr, out_ptr,
                          L, K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # (nothing is read before the wait)
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < L
    slot = tl.load(slots_ptr + row)
    if slot >= 0:
        p = tl.load(pos_ptr + row)
        x = tl.load(xy_ptr + row * xy_stride + cols, mask=cmask, other=0.0)
        acc = x.to(tl.float32) * tl.load(w_ptr + (K - 1) * L + cols, mask=cmask, other=0.0).to(tl.float32)
        buf = conv_ptr + slot * (K - 1) * L
        for k in tl.static_range(1, K):
            # the input k steps back sits at buffer row K-1-k; it exists only if p >= k
            prev = tl.load(buf + (K - 1 - k) * L + cols, mask=cmask, other=0.0).to(tl.float32)
            prev = tl.where(p >= k, prev, 0.0)
            acc += prev * tl.load(w_ptr + (K - 1 - k) * L + cols, mask=cmask, other=0.0).to(tl.float32)
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * L + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)
        # shift the buffer: every read of these channels above is done (same program)
        for r in tl.static_range(0, K - 2):
            v = tl.load(buf + (r + 1) * L + cols, mask=cmask)
            tl.store(buf + r * L + cols, v, mask=cmask)
        tl.store(buf + (K - 2) * L + cols, x.to(conv_ptr.dtype.element_ty), mask=cmask)


def conv1d_decode(xy: torch.Tensor, conv_state: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor,
                  w: torch.Tensor, b: torch.Tensor, out: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """xy: [B, >=L] (the first L columns are linear_x's output, model dtype);
    conv_state: pool buffer [S, K-1, L] (updated in place); slots, pos: [B] int64;
    w: [K, L]; b: [L]; out: [B, L] model dtype (conv output; padding rows untouched).
    pdl: launch with programmatic dependent launch (see pdl.py)."""
    batch = xy.shape[0]
    k, width = w.shape
    block = min(1024, triton.next_power_of_2(width))
    _conv1d_decode_kernel[(batch, triton.cdiv(width, block))](
        xy, xy.stride(0), conv_state, slots, pos, w, b, out, width, K=k, BLOCK=block, PDL=pdl, **launch_kwargs(pdl))
    return out


@triton.jit
def _rglru_decode_kernel(xc_ptr, xc_stride, y_ptr, y_stride, h_ptr, slots_ptr, pos_ptr,
                         wx_ptr, bx_ptr, wa_ptr, ba_ptr, neg8_softplus_ptr, out_ptr,
                         B, L, BW, BWP: tl.constexpr, BJ: tl.constexpr, BB: tl.constexpr,
                         IEEE: tl.constexpr, PDL: tl.constexpr):
    # BW: channels per head (block width); BWP: BW rounded up to a power of two
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    head = tl.program_id(1)
    jcols = tl.program_id(2) * BJ + tl.arange(0, BJ)  # within the head
    icols = tl.arange(0, BWP)
    jmask = jcols < BW
    imask = icols < BW
    # Requested before waiting for the previous kernel (PDL): the gate weights
    # (streamed once per step, like the projections': first to evict from L2) and
    # biases, and the state, which only the previous step wrote (read past L1).
    w_off = head * BW * BW + icols[:, None] * BW + jcols[None, :]
    wmask = imask[:, None] & jmask[None, :]
    wx = tl.load(wx_ptr + w_off, mask=wmask, other=0.0, eviction_policy="evict_first")
    wa = tl.load(wa_ptr + w_off, mask=wmask, other=0.0, eviction_policy="evict_first")
    ch = head * BW + jcols  # channel index in [0, L)
    bx = tl.load(bx_ptr + ch, mask=jmask, other=0.0).to(tl.float32)
    ba = tl.load(ba_ptr + ch, mask=jmask, other=0.0).to(tl.float32)
    neg8_softplus = tl.load(neg8_softplus_ptr + ch, mask=jmask, other=0.0)
    slots = tl.load(slots_ptr + rows, mask=rows < B, other=-1, cache_modifier=".cg")
    live = slots >= 0
    p = tl.load(pos_ptr + rows, mask=live, other=1, cache_modifier=".cg")
    mask2 = live[:, None] & jmask[None, :]
    h_off = slots[:, None].to(tl.int64) * L + ch[None, :]
    h = tl.load(h_ptr + h_off, mask=mask2, other=0.0, cache_modifier=".cg")
    if PDL:
        gdc_launch_dependents()
        gdc_wait()

    xh = tl.load(xc_ptr + rows[:, None] * xc_stride + head * BW + icols[None, :],
                 mask=live[:, None] & imask[None, :], other=0.0)
    xj = tl.load(xc_ptr + rows[:, None] * xc_stride + ch[None, :], mask=mask2, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + rows[:, None] * y_stride + ch[None, :], mask=mask2, other=0.0).to(tl.float32)
    if IEEE:
        gx = tl.dot(xh, wx, input_precision="ieee")
        ga = tl.dot(xh, wa, input_precision="ieee")
    else:
        gx = tl.dot(xh, wx)
        ga = tl.dot(xh, wa)
    gx = tl.sigmoid(gx + bx[None, :])
    ga = tl.sigmoid(ga + ba[None, :])

    log_a = neg8_softplus[None, :] * ga
    a = tl.exp(log_a)
    mult = tl.sqrt(1.0 - tl.exp(2.0 * log_a))
    reset = (p == 0)[:, None]
    a = tl.where(reset, 0.0, a)
    mult = tl.where(reset, 1.0, mult)

    h = a * h + xj * gx * mult
    tl.store(h_ptr + h_off, h, mask=mask2)
    out = h.to(out_ptr.dtype.element_ty).to(tl.float32) * _gelu_tanh(y)
    # padding rows get zeros: what follows multiplies every row, and must not meet garbage
    out = tl.where(live[:, None], out, 0.0)
    tl.store(out_ptr + rows[:, None] * L + ch[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(rows < B)[:, None] & jmask[None, :])


def rglru_decode(xc: torch.Tensor, y: torch.Tensor, h_state: torch.Tensor, slots: torch.Tensor,
                 pos: torch.Tensor, wx: torch.Tensor, bx: torch.Tensor, wa: torch.Tensor, ba: torch.Tensor,
                 neg8_softplus_a: torch.Tensor, out: torch.Tensor, *, launch: tuple[int, int] | None = None,
                 pdl: bool = False) -> torch.Tensor:
    """xc: conv output [B, L]; y: linear_y's output (pre-gelu); both [B, L]
    views whose rows may be strided; h_state: pool [S, L] float32 (updated in place);
    wx/wa: gate weights [H, bw, bw] ([in, out] per block); bx/ba: [H, bw];
    neg8_softplus_a: -8 * softplus(a_param) [L] float32; out: [B, L] model
    dtype = h.to(dtype) * gelu_tanh(y) (zeros in padding rows).
    launch: (channels per program, num_warps), default `default_launch`;
    pdl: launch with programmatic dependent launch (see pdl.py)."""
    batch, width = xc.shape
    heads, bw, _ = wx.shape
    bwp = max(16, triton.next_power_of_2(bw))
    # Each program reads its gate-weight tile once for BB rows: larger batches take
    # more rows per program so the weights are not re-read for every 16 rows.
    bb = 16 if batch <= 16 else (32 if batch <= 32 else 64)
    bj, warps = launch or default_launch(bb)
    bj = min(bj, bwp)
    _rglru_decode_kernel[(triton.cdiv(batch, bb), heads, triton.cdiv(bw, bj))](
        xc, xc.stride(0), y, y.stride(0), h_state, slots, pos, wx, bx, wa, ba, neg8_softplus_a, out,
        batch, width, bw, BWP=bwp, BJ=bj, BB=bb, IEEE=xc.dtype == torch.float32, PDL=pdl, num_warps=warps,
        **launch_kwargs(pdl))
    return out


def default_launch(rows_per_program: int) -> tuple[int, int]:
    """(channels per program, num_warps) of `rglru_decode`: more warps while
    few rows share a program (the small-batch step is latency-bound)."""
    return 32, 8 if rows_per_program == 16 else 4
