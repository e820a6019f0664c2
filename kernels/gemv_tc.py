"""The tensor-core skinny product for small-batch decode (batch 1-16, the
batch padded to the MMA's 16 rows): out^T [BN, 16] += W [BN, BK] @ x^T [BK, 16]
per K tile, with the same prologues, epilogues and PDL order as the CUDA-core
kernel of `gemv.py` (one copy of each in `gemv_parts.py`).

Written for the weight stream, which is all that costs at these batches:
- The K loop is in the form Triton's software pipeliner takes: each weight
  tile is loaded and fed (widened to the model dtype for 1-byte weights)
  straight into tl.dot, `num_stages` deep, so the loads become asynchronous
  copies into shared memory several tiles ahead (the earlier variant loaded
  tiles into registers by hand and streamed ~1.5 TB/s, bench/NOTES.md D9).
  Only the first tile is loaded by hand: before the PDL wait, as the
  CUDA-core kernel does.
- BN down to 16 rows of the weight per program and, where that still gives
  too few programs for the SMs, split-K: a grid of (N tiles, S splits), each
  split accumulating its share of K. Each split stores its float32 partial
  [BN, 16] (and [BN, 16] for GeGLU's up half, and its rows' partial sum of
  squares with the norm prologue) to its own slot of a caller-owned
  workspace, then counts itself in on the tile's counter; the last to arrive
  adds the S partials in split order (deterministic: no float atomics),
  runs the epilogue, and sets the counter back to zero, so a CUDA graph
  replays with no memset.

Rounding is the earlier tensor-core variant's: the MMA's operands are in the
model dtype (1-byte weights widened to it exactly, the input rows
x * (1 + norm scale) rounded to it before 1/rms); float32 models (CPU tests)
multiply in IEEE float32. Split-K changes only the order of float32 sums.

A config is (BN, BK, num_warps, "tc"[, num_stages[, splits]]); left out,
num_stages is DEFAULT_STAGES and K is not split. How many splits pay is a
per-shape choice the tuning sweep makes (bench/dev/tune_gemv.py --kernels tc);
without a config, DEFAULT_BLOCK splits K by an untuned rule (`default_splits`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemv_parts import GEGLU, epilogue, fetch_and_wait, input_tile, tile_indices, weight_tile
from .pdl import launch_kwargs
from .widen import CONVERT, widen

MMA_ROWS = 16  # tl.dot's smallest operand side: the batch is padded to it, BN and BK at least it
TENSOR_CORES = "tc"  # a config's 4th element
# The untuned default block. Offline SASS (sm_90) shows why BN is not small:
# the 16 padded input rows are normalised and converted per K tile by every
# program, as many values as a 16-row weight tile (24 instructions a weight
# at BN=16 with the norm prologue, 4-5 at BN=64). K is split instead to give
# narrow products enough programs (`default_splits`). BK 64: on the H100
# (bench/NOTES.md D10) 64x128 took 6x as long as 64x64 on gate|up + GeGLU
# (156 KB of shared memory: one program per SM); 64x64 came within 10-40% of
# each shape's best block, but every tensor-core block still lost to cuBLAS.
DEFAULT_BLOCK = (64, 64, 4)
DEFAULT_STAGES = 4
# programs a product should have (two per SM of an H100) before the default
# block stops splitting K
TARGET_PROGRAMS = 264


def default_splits(n_tiles: int, k_tiles: int) -> int:
    """The default block's K splits: up to TARGET_PROGRAMS programs, at least
    two K tiles a split, at most 8 (untuned)."""
    return max(1, min(-(-TARGET_PROGRAMS // n_tiles), k_tiles // 2, 8))


def launch(config: tuple | None, n_out: int, k: int) -> tuple[int, int, int, int, int]:
    """(BN, BK, num_warps, num_stages, splits) for a product of n_out features
    over k columns: the config's (None: DEFAULT_BLOCK, split by
    `default_splits`), defaults where it leaves them out (DEFAULT_STAGES, one
    split), BK no wider than K needs, and splits cut to those that get K tiles."""
    if config is None:
        bk = min(DEFAULT_BLOCK[1], max(MMA_ROWS, triton.next_power_of_2(k)))
        splits = default_splits(triton.cdiv(n_out, DEFAULT_BLOCK[0]), triton.cdiv(k, bk))
        config = DEFAULT_BLOCK + (TENSOR_CORES, DEFAULT_STAGES, splits)
    config = tuple(config)
    if len(config) not in (4, 5, 6) or config[3] != TENSOR_CORES:
        raise ValueError(f"tensor-core gemv config {config!r}: want (BN, BK, num_warps, {TENSOR_CORES!r}"
                         "[, num_stages[, splits]])")
    bn, bk, warps = (int(v) for v in config[:3])
    if bn < MMA_ROWS or bk < MMA_ROWS:
        raise ValueError(f"gemv config {config!r}: the tensor-core variant needs BN, BK >= {MMA_ROWS}")
    bk = min(bk, max(MMA_ROWS, triton.next_power_of_2(k)))
    stages = int(config[4]) if len(config) > 4 else DEFAULT_STAGES
    k_tiles = triton.cdiv(k, bk)
    splits = int(config[5]) if len(config) > 5 else 1
    if stages < 1 or splits < 1:
        raise ValueError(f"gemv config {config!r}: num_stages and splits must be >= 1")
    per = triton.cdiv(k_tiles, min(splits, k_tiles))  # K tiles per split
    return bn, bk, warps, stages, triton.cdiv(k_tiles, per)


def _partial_size(bn: int) -> int:
    """float32 values of one split's partial: gate and up products [BN, 16] each, the sums of squares [16]."""
    return 2 * bn * MMA_ROWS + MMA_ROWS


def workspace(n_out: int, k: int, config: tuple | None, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The zeroed split-K workspace a product of n_out features over k
    columns needs with `config` (None: it runs unsplit): float32 partials
    and int32 per-tile counters. Allocate it once per shape and pass it to
    every call (the kernel leaves the counters zero again), e.g. one per
    (batch bucket, shape) in a decoder whose steps are graph-captured."""
    bn, _, _, _, splits = launch(config, n_out, k)
    if splits == 1:
        return None
    n_tiles = triton.cdiv(n_out, bn)
    return (torch.zeros(n_tiles * splits * _partial_size(bn), dtype=torch.float32, device=device),
            torch.zeros(n_tiles, dtype=torch.int32, device=device))


@triton.jit
def _mma(w, xt, acc, WIDEN: tl.constexpr):
    """acc + w @ xt on the tensor cores, w widened to xt's dtype (the model
    dtype; exact for int8 and e4m3): Triton's conversion, or (WIDEN other
    than CONVERT) through widen.py's float32 variant. float32 models (CPU
    tests) multiply in full float32 precision, not tf32."""
    if WIDEN == CONVERT:
        wx = w.to(xt.dtype)
    else:
        wx = widen(w, WIDEN).to(xt.dtype)
    if xt.dtype == tl.float32:
        out = tl.dot(wx, xt, acc, input_precision="ieee")
    else:
        out = tl.dot(wx, xt, acc)
    return out


@triton.jit
def _k_tile(w, u, acc, acc_u, ss, k, write_res, src_ptr, tok_ptr, emb_scale, tscale_ptr, delta_ptr, res_out_ptr,
            nscale_ptr, rows, rmask, K, SRC: tl.constexpr, SRC_SCALED: tl.constexpr, HAS_DELTA: tl.constexpr,
            NORM: tl.constexpr, WRITE_RES: tl.constexpr, EPI: tl.constexpr, WIDEN: tl.constexpr):
    """One K tile: the input columns k (normalised: x * (1 + scale), the sum of
    squares gathered for 1/rms after the loop) times the weight tile(s)."""
    v, scale = input_tile(src_ptr, tok_ptr, emb_scale, tscale_ptr, delta_ptr, nscale_ptr, rows, rmask, k, K,
                          SRC, SRC_SCALED, HAS_DELTA, NORM)
    if NORM:
        dtype = nscale_ptr.dtype.element_ty
        if WRITE_RES:
            tl.store(res_out_ptr + rows[:, None] * K + k[None, :], v,
                     mask=write_res[:, None] & (k < K)[None, :])
        v = v.to(tl.float32)
        ss += tl.sum(v * v, axis=1)
        xin = v * (1.0 + scale.to(tl.float32)[None, :])
    else:
        dtype = src_ptr.dtype.element_ty
        xin = v
    # the MMA's operands in the model dtype: the input rounded to it
    xt = tl.trans(xin.to(dtype))
    acc = _mma(w, xt, acc, WIDEN)
    if EPI == GEGLU:
        acc_u = _mma(u, xt, acc_u, WIDEN)
    return acc, acc_u, ss


@triton.jit
def _gather_splits(acc, acc_u, ss, part_ptr, count_ptr, tile, split, rows,
                   BN: tl.constexpr, BB: tl.constexpr, SPLITS: tl.constexpr, EPI: tl.constexpr):
    """Split-K: store this split's partials, count it in on the tile's counter;
    the last to arrive gets the sums over the splits (in split order) and
    whether it is the last ([BB], every element the same; the others get
    zeros and False)."""
    size = 2 * BN * BB + BB
    at = tl.arange(0, BN)[:, None] * BB + tl.arange(0, BB)[None, :]
    mine = part_ptr + (tile * SPLITS + split).to(tl.int64) * size
    tl.store(mine + at, acc)
    if EPI == GEGLU:
        tl.store(mine + BN * BB + at, acc_u)
    tl.store(mine + 2 * BN * BB + rows, ss)
    # every thread's partial is written before the count says so (release);
    # the last one's reads come after its count (acquire), past L1 (.cg)
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = rows * 0 + arrived == SPLITS - 1  # [BB], all equal
    acc = tl.zeros((BN, BB), tl.float32)
    acc_u = tl.zeros((BN, BB), tl.float32)
    ss = tl.zeros((BB,), tl.float32)
    for s in tl.static_range(SPLITS):
        part = part_ptr + (tile * SPLITS + s).to(tl.int64) * size
        acc += tl.load(part + at, mask=last[None, :], other=0.0, cache_modifier=".cg")
        if EPI == GEGLU:
            acc_u += tl.load(part + BN * BB + at, mask=last[None, :], other=0.0, cache_modifier=".cg")
        ss += tl.load(part + 2 * BN * BB + rows, mask=last, other=0.0, cache_modifier=".cg")
    # the next call (a graph replay) starts from zero; it runs after this grid ends
    tl.store(count_ptr + tile + rows * 0, rows * 0, mask=last & (rows == 0))
    return acc, acc_u, ss, last


@triton.jit(do_not_specialize=["B", "eps", "emb_scale", "cap", "KS"])
def _gemv_tc_kernel(src_ptr, tok_ptr, emb_scale, tscale_ptr, delta_ptr, res_out_ptr, nscale_ptr, eps,
                    w_ptr, wscale_ptr, bias_ptr, out_ptr, out_stride,
                    conv_ptr, slots_ptr, pos_ptr, cw_ptr, cb_ptr, L,
                    cap, B, N, K, KS, part_ptr, count_ptr,
                    BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLITS: tl.constexpr,
                    SRC: tl.constexpr, SRC_SCALED: tl.constexpr, HAS_DELTA: tl.constexpr, NORM: tl.constexpr,
                    WRITE_RES: tl.constexpr, QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, EPI: tl.constexpr,
                    CONVK: tl.constexpr, CONVR: tl.constexpr, PDL: tl.constexpr, WIDEN: tl.constexpr):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    rows, rmask, n, nmask, kk, w_rows, u_rows = tile_indices(tile, B, N, K, w_ptr, BB, BN, BK)
    k_lo = split * KS  # this split's columns: [k_lo, k_lo + KS), KS a multiple of BK
    k_hi = tl.minimum(K, k_lo + KS)

    # Before the PDL wait, what no earlier kernel of the step writes (as in gemv.py).
    w = weight_tile(w_rows, k_lo + kk, nmask, K)
    u = w
    if EPI == GEGLU:
        u = weight_tile(u_rows, k_lo + kk, nmask, K)
    (bias, bias_u, wscale, wscale_u, earlier, tap_now, shifted, conv_base, conv_off, cm,
     is_x) = fetch_and_wait(bias_ptr, wscale_ptr, conv_ptr, slots_ptr, pos_ptr, cw_ptr, cb_ptr, rows, rmask, n, nmask,
                            N, L, SRC, HAS_BIAS, QUANT, EPI, CONVK, CONVR, PDL)

    acc = tl.zeros((BN, BB), tl.float32)
    acc_u = tl.zeros((BN, BB), tl.float32)
    ss = tl.zeros((BB,), tl.float32)
    # one column of programs writes the updated residual stream (masks are
    # [BB] vectors: Triton's interpreter refuses a scalar in a mask)
    write_res = rmask & (rows * 0 + tile == 0)
    acc, acc_u, ss = _k_tile(w, u, acc, acc_u, ss, k_lo + kk, write_res, src_ptr, tok_ptr, emb_scale, tscale_ptr,
                             delta_ptr, res_out_ptr, nscale_ptr, rows, rmask, K, SRC, SRC_SCALED, HAS_DELTA, NORM,
                             WRITE_RES, EPI, WIDEN)
    # The pipelined loop: loads feed the MMA directly (num_stages async copies in flight).
    for k0 in range(k_lo + BK, k_hi, BK):
        k = k0 + kk
        w = weight_tile(w_rows, k, nmask, K)
        u = w
        if EPI == GEGLU:
            u = weight_tile(u_rows, k, nmask, K)
        acc, acc_u, ss = _k_tile(w, u, acc, acc_u, ss, k, write_res, src_ptr, tok_ptr, emb_scale, tscale_ptr,
                                 delta_ptr, res_out_ptr, nscale_ptr, rows, rmask, K, SRC, SRC_SCALED, HAS_DELTA,
                                 NORM, WRITE_RES, EPI, WIDEN)

    store_rows = rmask
    if SPLITS > 1:
        acc, acc_u, ss, last = _gather_splits(acc, acc_u, ss, part_ptr, count_ptr, tile, split, rows, BN, BB, SPLITS,
                                            EPI)
        store_rows = rmask & last
    dt_ptr = nscale_ptr if NORM else src_ptr
    epilogue(tl.trans(acc), tl.trans(acc_u), ss, K, eps, dt_ptr, rows, store_rows, n, nmask, out_ptr, out_stride, cap,
             bias, bias_u, wscale, wscale_u, conv_ptr, L, earlier, tap_now, shifted, conv_base, conv_off, cm, is_x,
             NORM, QUANT, HAS_BIAS, EPI, CONVK, CONVR)


def gemv_tc(args: tuple, *, n_out: int, k: int, config: tuple | None, workspace: tuple | None, pdl: bool,
            consts: dict) -> None:
    """Launch the kernel: `args` the pointer and size arguments gemv.py's
    wrapper builds (up to K), `consts` its constexpr flags; `workspace` from
    `workspace()` for a split config (ValueError when missing or too small)."""
    bn, bk, warps, stages, splits = launch(config, n_out, k)
    n_tiles = triton.cdiv(n_out, bn)
    if splits > 1:
        if workspace is None:
            raise ValueError(f"tensor-core gemv with {splits} K splits needs a workspace "
                             "(kernels/gemv_tc.py workspace(), allocated once per shape)")
        partials, counts = workspace
        if partials.numel() < n_tiles * splits * _partial_size(bn) or counts.numel() < n_tiles \
                or partials.dtype != torch.float32 or counts.dtype != torch.int32:
            raise ValueError("tensor-core gemv: the workspace does not fit this shape and config; "
                             "allocate it with workspace(n_out, k, config, device)")
    else:
        partials = counts = args[8]  # unused: any pointer
    ks = triton.cdiv(triton.cdiv(k, bk), splits) * bk
    _gemv_tc_kernel[(n_tiles, splits)](*args, ks, partials, counts, BB=MMA_ROWS, BN=bn, BK=bk, SPLITS=splits,
                                       num_warps=warps, num_stages=stages, **consts, **launch_kwargs(pdl))
