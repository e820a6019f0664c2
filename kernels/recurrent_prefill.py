"""Recurrent-block prefill kernels for one session's chunk of T tokens, the
state read from and written to the pool at the session's slot.

- `conv1d_chunk`: the depthwise causal conv over the chunk, the first K-1
  inputs coming from the slot's conv buffer (the caller shifts the buffer
  afterwards: programs of this launch read it concurrently).
- `rglru_chunk`: from the gate pre-activations, everything else of the RG-LRU
  (sigmoids, decay, input normalisation, reset at position 0), the scan with
  the float32 state in place, and the product with gelu(y). Programs split the
  chunk over channels and time: one program walking all T steps of its channels
  left most of a large GPU idle (T = 2,048, 2,560 channels: 40 programs).
"""

from __future__ import annotations

import dataclasses

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


@triton.jit
def _rglru_tile(gates_ptr, gx_base, ga_base, bx, ba, neg8, xc_ptr, cols, cmask, steps, p0, T, L, BW):
    """(a, x) of the recurrence h = a h + x over one [TT, BLOCK] tile of steps: gate
    sigmoids, decay, input normalisation, reset at position 0; padding steps are (1, 0)."""
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
    return a, x, mask


@triton.jit
def _last_row(v, TT: tl.constexpr):
    return tl.sum(tl.where((tl.arange(0, TT) == TT - 1)[:, None], v, 0.0), axis=0)


# Chunk lengths and time blocks vary from call to call: as plain ints (T, TB not specialised)
# and a fixed FOLD they compile no new variant, where one per length would stall a prefill.
@triton.jit(do_not_specialize=["slot", "p0", "T", "TB"])
def _rglru_aggregate_kernel(gates_ptr, bx_ptr, ba_ptr, xc_ptr, h_ptr, slot, p0, neg8_ptr, carry_ptr, T, L, BW, TB,
                            TT: tl.constexpr, BLOCK: tl.constexpr):
    """Phase 1, programs over (time block tb, channels): the block's (A, X), the
    recurrence's map h -> A h + X over its steps, into carry[tb + 1]; carry[0]'s
    X row gets the slot's state (phase 2 reads it there while it overwrites the slot)."""
    tb = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < L
    gx_base = (cols // BW) * T * BW + cols % BW  # gates come as [2, H, T, BW]
    ga_base = (L // BW) * T * BW + gx_base
    bx = tl.load(bx_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    ba = tl.load(ba_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    neg8 = tl.load(neg8_ptr + cols, mask=cmask, other=0.0)
    big_a = tl.full((BLOCK,), 1.0, tl.float32)
    big_x = tl.zeros((BLOCK,), tl.float32)
    for t0 in range(tb * TB, tb * TB + TB, TT):
        a, x, _ = _rglru_tile(gates_ptr, gx_base, ga_base, bx, ba, neg8, xc_ptr, cols, cmask,
                              t0 + tl.arange(0, TT), p0, T, L, BW)
        a_cum, x_cum = tl.associative_scan((a, x), 0, _combine)
        a_tile = _last_row(a_cum, TT)
        big_x = a_tile * big_x + _last_row(x_cum, TT)
        big_a = big_a * a_tile
    row = carry_ptr + (tb + 1) * 2 * L
    tl.store(row + cols, big_a, mask=cmask)
    tl.store(row + L + cols, big_x, mask=cmask)
    if tb == 0:
        tl.store(carry_ptr + L + cols, tl.load(h_ptr + slot.to(tl.int64) * L + cols, mask=cmask), mask=cmask)


@triton.jit(do_not_specialize=["slot", "p0", "T", "TB"])
def _rglru_scan_kernel(gates_ptr, bx_ptr, ba_ptr, xc_ptr, y_ptr, y_stride, h_ptr, slot, p0, neg8_ptr, carry_ptr,
                       out_ptr, T, L, BW, TB, TT: tl.constexpr, BLOCK: tl.constexpr, FROM_CARRY: tl.constexpr,
                       FOLD: tl.constexpr):
    """Phase 2, programs over (time block tb, channels): the state entering the
    block (the slot's state folded through the earlier blocks' (A, X) from phase 1,
    or the slot's state itself where there is one block), the block's scan, the
    output h.to(dtype) * gelu(y); the last block writes the slot's new state."""
    tb = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < L
    gx_base = (cols // BW) * T * BW + cols % BW
    ga_base = (L // BW) * T * BW + gx_base
    bx = tl.load(bx_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    ba = tl.load(ba_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    neg8 = tl.load(neg8_ptr + cols, mask=cmask, other=0.0)
    h_off = slot.to(tl.int64) * L + cols
    if FROM_CARRY:
        # the earlier blocks' maps composed FOLD at a time by a scan (a serial fold would wait
        # on a load per block); blocks from tb on are the identity (1, 0)
        h = tl.load(carry_ptr + L + cols, mask=cmask, other=0.0)
        for g in range(0, tb, FOLD):
            j = g + tl.arange(0, FOLD)
            earlier = (j < tb)[:, None] & cmask[None, :]
            rows = carry_ptr + (j + 1)[:, None] * 2 * L + cols[None, :]
            # (names of their own: Triton would carry a_cum, x_cum from loop to loop)
            fold_a, fold_x = tl.associative_scan((tl.load(rows, mask=earlier, other=1.0),
                                                  tl.load(rows + L, mask=earlier, other=0.0)), 0, _combine)
            h = _last_row(fold_a, FOLD) * h + _last_row(fold_x, FOLD)
    else:
        h = tl.load(h_ptr + h_off, mask=cmask, other=0.0)
    for t0 in range(tb * TB, tl.minimum(tb * TB + TB, T), TT):
        steps = t0 + tl.arange(0, TT)
        a, x, mask = _rglru_tile(gates_ptr, gx_base, ga_base, bx, ba, neg8, xc_ptr, cols, cmask,
                                 steps, p0, T, L, BW)
        a_cum, x_cum = tl.associative_scan((a, x), 0, _combine)
        hs = a_cum * h[None, :] + x_cum
        y = tl.load(y_ptr + steps[:, None] * y_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out = hs.to(out_ptr.dtype.element_ty).to(tl.float32) * _gelu_tanh(y)
        tl.store(out_ptr + steps[:, None] * L + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
        h = _last_row(hs, TT)
    if tb == tl.num_programs(0) - 1:
        tl.store(h_ptr + h_off, h, mask=cmask)


@dataclasses.dataclass(frozen=True)
class ScanLaunch:
    """How `rglru_chunk` splits its work: `block` channels by `time_block` steps
    per program, an associative scan over `tile` steps at a time (all powers of
    two, `time_block` a multiple of `tile`)."""

    block: int = 64
    tile: int = 32
    time_block: int = 128
    num_warps: int = 4

    def __post_init__(self):
        for name in ("block", "tile", "time_block", "num_warps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"ScanLaunch.{name} must be a power of two, got {v!r}")
        if self.time_block < self.tile:
            raise ValueError(f"ScanLaunch: time_block ({self.time_block}) must be >= tile ({self.tile})")


# Default grid: enough programs to fill a large GPU (an H100 has 132 SMs), few
# enough time blocks that phase 2's composition of the earlier ones stays small.
# At T = 2,048 on the H100, 1,280 programs of 64 steps took 124-128 us a call
# against 137 us for 640 of 128 (bench/NOTES.md P5).
MAX_PROGRAMS, MAX_TIME_BLOCKS = 2048, 64
FOLD = 16  # earlier blocks' maps composed per scan in phase 2: one scan up to 17 time blocks


def default_scan_launch(steps: int, width: int) -> ScanLaunch:
    """Channel blocks of 64; the shortest time block (from one tile of 32 up)
    within MAX_PROGRAMS and MAX_TIME_BLOCKS. A chunk of one time block is one
    launch (the scan of one program walking all its steps), longer ones two."""
    block, tile = min(64, triton.next_power_of_2(width)), 32
    channel_blocks = triton.cdiv(width, block)
    time_block = tile
    while (triton.cdiv(steps, time_block) * channel_blocks > MAX_PROGRAMS
           or triton.cdiv(steps, time_block) > MAX_TIME_BLOCKS):
        time_block *= 2
    return ScanLaunch(block=block, tile=tile, time_block=time_block)


def rglru_chunk(gates: torch.Tensor, bx: torch.Tensor, ba: torch.Tensor, xc: torch.Tensor, y: torch.Tensor,
                h_state: torch.Tensor, slot: int, p0: int, neg8_softplus_a: torch.Tensor,
                out: torch.Tensor, launch: ScanLaunch | None = None) -> torch.Tensor:
    """gates: [2, H, T, bw] pre-activations of the input gate and the a gate
    (block-diagonal products, bias not added); bx, ba: gate biases [H, bw];
    xc: conv output [T, L]; y: linear_y's output (pre-gelu) [T, L] view with row
    stride; h_state: pool [S, L] float32 (the slot's row is updated in place);
    p0: position of the chunk's first token; out: [T, L] = h.to(dtype) * gelu(y).
    launch: block sizes (default `default_scan_launch`).

    Parallel over time as well as channels: with more than one time block,
    phase 1 computes each block's map h -> A h + X and phase 2 rescans every
    block from its entering state; float32 throughout, only the association
    order of the scan differs from a sequential one."""
    steps, width = xc.shape
    if steps == 0:
        return out
    bw = gates.shape[-1]
    ln = launch or default_scan_launch(steps, width)
    blocks = triton.cdiv(steps, ln.time_block)
    grid = (blocks, triton.cdiv(width, ln.block))
    sizes = dict(TT=ln.tile, BLOCK=ln.block, num_warps=ln.num_warps)
    carry = h_state  # unread with one block
    if blocks > 1:
        # carry[0]: the slot's state (X row); carry[j]: (A, X) of time block j - 1
        carry = torch.empty(blocks, 2, width, dtype=torch.float32, device=xc.device)
        _rglru_aggregate_kernel[(blocks - 1, grid[1])](
            gates, bx, ba, xc, h_state, slot, p0, neg8_softplus_a, carry, steps, width, bw, ln.time_block, **sizes)
    _rglru_scan_kernel[grid](
        gates, bx, ba, xc, y, y.stride(0), h_state, slot, p0, neg8_softplus_a, carry, out, steps, width, bw,
        ln.time_block, FROM_CARRY=blocks > 1, FOLD=FOLD, **sizes)
    return out
