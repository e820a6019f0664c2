"""The body of a batch-1 decode step (every layer, up to the final norm) in one
persistent launch.

Why: at batch 1 a step is a weight stream, and the per-kernel path
(`gemv.py` and friends, ~135 launches) loses ~3-5 us per launch to ramp-up,
tail and launch gaps: 0.3-0.5 ms of a ~2.6 ms step (bench/NOTES.md). Here
a grid of NPROG programs, all resident at once, walks the layers phase by
phase and meets at a grid barrier between phases that depend on each other.
Weights depend on nothing computed in the step, so before each barrier a
program requests the first weight tile of its share of the next phase: the
memory keeps streaming while the slowest program finishes and the barrier
resolves.

Phases of a recurrent layer, separated by barriers:
  1. x|y = RMSNorm(x) @ W_xy^T + b, causal conv1d on the x half (conv buffer
     shifted in place: each program owns its channels);
  2. RG-LRU over (head, channel block) tasks: both block-diagonal gates, the
     float32 state in place, gelu(y) product -> `gated`;
  3. x += gated @ W_out^T + b  (each program owns its rows of x);
an attention layer instead:
  1. q|k|v = RMSNorm(x) @ W_qkv^T;
  2. split-KV partials over the ring (one task per BNK keys);
  3. merge per (head, dim chunk) with the current key/value, written into the
     ring afterwards -> `mixed`;
  4. x += mixed @ W_o^T + b;
then the MLP: 5. hidden = GeGLU(RMSNorm(x) @ W_up^T + b); 6. x += hidden @ W_down^T + b.

Projection phases give each program a contiguous run of output rows (no
program does twice the work of another when NPROG divides the row counts,
as 512 does for every 2B projection) and walk K in [RP, BK] tiles, the next
tile requested before the current one is used. Values another program wrote
during the launch are read with ".cg" (L2, not a possibly stale L1 line).

The barrier is a counter in device memory that only grows during a launch
(the caller zeroes it before): barrier i waits until it reaches i * NPROG. The
launch is cooperative where Triton supports it, so the driver refuses a grid
that cannot be resident at once rather than letting it hang; a spin limit
counts into `sync[1]` if a barrier ever gives up.

Rounding follows `gemv.py` (the per-kernel path); the residual stream is one
buffer updated in place (x + delta rounded to the model dtype, as the
reference path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_decode import _NEG, _rope_rows
from .recurrent_decode import _gelu_tanh

# Columns of the per-layer table: the layer kind (0 recurrent, 1 attention),
# then raw device addresses (int64). STATE0/STATE1: conv buffer and float32 h
# (recurrent) or the key and value rings (attention); W_MIX/B_MIX: the mixer's
# output projection (linear_out or proj_final).
COLUMNS = ("kind", "pre_norm", "w_in", "b_in", "state0", "state1", "conv_w", "conv_b", "gates", "gate_bx",
           "gate_ba", "neg8_softplus_a", "w_mix", "b_mix", "mlp_norm", "w_up", "b_up", "w_down", "b_down")
KIND, PRE_NORM, W_IN, B_IN, STATE0, STATE1, CONV_W, CONV_B, GATES, GATE_BX, GATE_BA, NEG8, \
    W_MIX, B_MIX, MLP_NORM, W_UP, B_UP, W_DOWN, B_DOWN = (tl.constexpr(i) for i in range(len(COLUMNS)))
NCOL = tl.constexpr(len(COLUMNS))
_SPIN_LIMIT = tl.constexpr(1 << 24)  # ~seconds of polling: only a grid that is not resident hits it


@triton.jit
def _ptr(row_ptr, col, DT: tl.constexpr):
    # every tensor the table points at starts 16-byte aligned (torch allocations)
    return tl.multiple_of(tl.load(row_ptr + col).to(tl.pointer_type(DT)), 16)


@triton.jit
def _grid_arrive(sync_ptr):
    """Count this program in at the next barrier: its stores of the phase are
    released to every program that passes the barrier. Arrive before requesting
    the next phase's weights: a release waits for the program's outstanding
    memory operations, and those loads must not be among them."""
    tl.debug_barrier()  # every thread's stores are done before the release
    tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _grid_wait(sync_ptr, target, WAIT: tl.constexpr, POLL_ONE: tl.constexpr):
    """Wait until `target` arrivals are counted. POLL_ONE: one thread per
    program polls (a scalar acquire load, broadcast to the others) instead of
    one load per warp. WAIT False: do not wait, a racy variant that only
    exists to time the barriers."""
    if WAIT:
        if POLL_ONE:
            seen = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
        else:
            seen = tl.load(sync_ptr, volatile=True)
        spins = 0
        while (seen < target) & (spins < _SPIN_LIMIT):
            if POLL_ONE:
                seen = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
            else:
                seen = tl.load(sync_ptr, volatile=True)
            spins += 1
        if seen < target:
            tl.atomic_add(sync_ptr + 1, 1)
        tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _holds(like, cond_value, bound):
    """cond_value >= bound as a tensor shaped like `like` (a scalar mask operand
    trips Triton's interpreter: broadcast it first)."""
    return (tl.zeros_like(like).to(tl.int64) + cond_value) >= bound


@triton.jit
def _rows_of(pid, N, NPROG, RP: tl.constexpr):
    """This program's contiguous run of the N output rows: ([RP] indices, mask)."""
    per = tl.cdiv(N, NPROG)
    i = tl.arange(0, RP)
    rows = pid * per + i
    return rows, (i < per) & (rows < N)


@triton.jit
def _weight_tile(w_ptr, rows, rmask, k0, K, BK: tl.constexpr):
    k = tl.max_contiguous(tl.multiple_of(k0 + tl.arange(0, BK), BK), BK)
    return tl.load(w_ptr + rows[:, None].to(tl.int64) * K + k[None, :],
                   mask=rmask[:, None] & (k < K)[None, :], other=0.0)


@triton.jit
def _project(w_ptr, first, rows, rmask, K, src_ptr, emb_row_ptr, emb_scale, from_emb, x_ptr, write_x,
             nscale_ptr, eps, NORM: tl.constexpr, TWO: tl.constexpr, w2_off, first2, BK: tl.constexpr):
    """[RP] float32 sums of w[rows] . input over K (and of the rows w2_off
    further on when TWO: the up half of a gate|up weight). The input is
    src[:K], or with `from_emb` the embedding row * emb_scale rounded to the
    model dtype (written to x by the program with write_x). With NORM the
    input is RMSNorm'd with scale (1 + nscale): the sum of squares is gathered
    on the way and 1/rms applied to the sums."""
    DT = w_ptr.dtype.element_ty
    acc = tl.zeros([first.shape[0]], tl.float32)
    acc2 = tl.zeros([first.shape[0]], tl.float32)
    ss = tl.zeros([BK], tl.float32)
    w_next = first
    w2_next = first2
    for k0 in range(0, K, BK):
        w = w_next
        w_next = _weight_tile(w_ptr, rows, rmask, k0 + BK, K, BK)
        if TWO:
            w2 = w2_next
            w2_next = _weight_tile(w_ptr + w2_off, rows, rmask, k0 + BK, K, BK)
        k = k0 + tl.arange(0, BK)
        kmask = k < K
        if from_emb:
            v = tl.load(emb_row_ptr + k, mask=kmask, other=0.0).to(tl.float32) * emb_scale
            v = v.to(DT)
            if write_x:
                tl.store(x_ptr + k, v, mask=kmask)
            v = v.to(tl.float32)
        else:
            v = tl.load(src_ptr + k, mask=kmask, other=0.0, cache_modifier=".cg").to(tl.float32)
        if NORM:
            ss += v * v
            v = v * (1.0 + tl.load(nscale_ptr + k, mask=kmask, other=0.0).to(tl.float32))
        acc += tl.sum(w.to(tl.float32) * v[None, :], axis=1)
        if TWO:
            acc2 += tl.sum(w2.to(tl.float32) * v[None, :], axis=1)
    if NORM:
        inv = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
        acc = acc * inv
        acc2 = acc2 * inv
    return acc, acc2


@triton.jit
def _add_residual(acc, rows, rmask, bias_ptr, x_ptr):
    """x[rows] += round(acc + bias): the rows this program owns."""
    DT = x_ptr.dtype.element_ty
    delta = (acc + tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)).to(DT).to(tl.float32)
    x = tl.load(x_ptr + rows, mask=rmask, other=0.0, cache_modifier=".cg").to(tl.float32)
    tl.store(x_ptr + rows, (x + delta).to(DT), mask=rmask)


@triton.jit
def _conv_epilogue(acc, rows, rmask, bias_ptr, out_ptr, conv_ptr, cw_ptr, cb_ptr, slot, p, L,
                   CONVK: tl.constexpr):
    """x|y rows: the x half through the causal conv1d (buffer shifted in place),
    the y half stored as is."""
    DT = out_ptr.dtype.element_ty
    v = (acc + tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)).to(DT)
    is_x = rows < L
    ch = tl.where(is_x, rows, 0)
    cm = is_x & rmask & _holds(rows, slot, 0)
    buf = conv_ptr + slot.to(tl.int64) * (CONVK - 1) * L + ch
    conv = v.to(tl.float32) * tl.load(cw_ptr + (CONVK - 1) * L + ch, mask=is_x, other=0.0).to(tl.float32)
    for j in tl.static_range(1, CONVK):
        # the input j steps back sits at buffer row CONVK-1-j; it exists only if p >= j
        prev = tl.load(buf + (CONVK - 1 - j) * L, mask=cm, other=0.0).to(tl.float32)
        prev = tl.where(p >= j, prev, 0.0)
        conv += prev * tl.load(cw_ptr + (CONVK - 1 - j) * L + ch, mask=is_x, other=0.0).to(tl.float32)
    conv += tl.load(cb_ptr + ch, mask=is_x, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, tl.where(is_x, conv.to(DT), v), mask=rmask)
    # several threads may hold copies of one element: all reads before any shift
    tl.debug_barrier()
    for r in tl.static_range(0, CONVK - 2):
        tl.store(buf + r * L, tl.load(buf + (r + 1) * L, mask=cm), mask=cm)
    tl.debug_barrier()
    tl.store(buf + (CONVK - 2) * L, v.to(conv_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _gate_tiles(gates_ptr, task, ntasks, H, BW, BWP: tl.constexpr, BJ: tl.constexpr):
    """Both gates' [BWP, BJ] weight tiles ([in, out] blocks) of an RG-LRU task."""
    nj = tl.cdiv(BW, BJ)
    head = task // nj
    j = (task % nj) * BJ + tl.arange(0, BJ)
    i = tl.arange(0, BWP)
    m = (i < BW)[:, None] & ((j < BW) & _holds(j, ntasks - 1, task))[None, :]
    off = head * BW * BW + i[:, None] * BW + j[None, :]
    return (tl.load(gates_ptr + off, mask=m, other=0.0),
            tl.load(gates_ptr + H * BW * BW + off, mask=m, other=0.0))


@triton.jit
def _rglru_task(task, wx, wa, xy_ptr, h_ptr, bx_ptr, ba_ptr, neg8_ptr, out_ptr, slot, p, L, BW,
                BWP: tl.constexpr, BJ: tl.constexpr):
    """RG-LRU for BJ channels of one head: gates from the head's conv output,
    state update in place, out = h * gelu(y) (zeros for a padding row)."""
    DT = out_ptr.dtype.element_ty
    nj = tl.cdiv(BW, BJ)
    head = task // nj
    jl = (task % nj) * BJ + tl.arange(0, BJ)
    jmask = jl < BW
    ch = head * BW + jl
    i = tl.arange(0, BWP)
    xh = tl.load(xy_ptr + head * BW + i, mask=i < BW, other=0.0, cache_modifier=".cg").to(tl.float32)
    gx = tl.sum(wx.to(tl.float32) * xh[:, None], axis=0)
    ga = tl.sum(wa.to(tl.float32) * xh[:, None], axis=0)
    gx = tl.sigmoid(gx + tl.load(bx_ptr + ch, mask=jmask, other=0.0).to(tl.float32))
    ga = tl.sigmoid(ga + tl.load(ba_ptr + ch, mask=jmask, other=0.0).to(tl.float32))
    log_a = tl.load(neg8_ptr + ch, mask=jmask, other=0.0) * ga
    a = tl.exp(log_a)
    mult = tl.sqrt(1.0 - tl.exp(2.0 * log_a))
    a = tl.where(p == 0, 0.0, a)
    mult = tl.where(p == 0, 1.0, mult)
    live = slot >= 0
    sm = jmask & _holds(jl, slot, 0)
    xj = tl.load(xy_ptr + ch, mask=jmask, other=0.0, cache_modifier=".cg").to(tl.float32)
    h_off = slot.to(tl.int64) * L + ch
    h = tl.load(h_ptr + h_off, mask=sm, other=0.0)
    h = a * h + xj * gx * mult
    tl.store(h_ptr + h_off, h, mask=sm)
    y = tl.load(xy_ptr + L + ch, mask=jmask, other=0.0, cache_modifier=".cg").to(tl.float32)
    out = h.to(DT).to(tl.float32) * _gelu_tanh(y)
    tl.store(out_ptr + ch, tl.where(live, out, 0.0).to(DT), mask=jmask)


@triton.jit
def _kv_tiles(ring_k_ptr, ring_v_ptr, task, ntasks, slot, p, W, HD: tl.constexpr, BNK: tl.constexpr):
    """The [BNK, HD] key and value tiles of split `task` (masked to valid keys)."""
    idx = task * BNK + tl.arange(0, BNK)
    valid = (idx < tl.minimum(p, W)) & _holds(idx, ntasks - 1, task) & _holds(idx, slot, 0)
    off = slot.to(tl.int64) * W * HD + idx[:, None] * HD + tl.arange(0, HD)[None, :]
    return (tl.load(ring_k_ptr + off, mask=valid[:, None], other=0.0),
            tl.load(ring_v_ptr + off, mask=valid[:, None], other=0.0))


@triton.jit
def _attn_partial_task(task, k, v, qkv_ptr, inv_freq_ptr, m_ptr, l_ptr, acc_ptr, slot, p, W, H, scale,
                       HP: tl.constexpr, HD: tl.constexpr, BNK: tl.constexpr, IEEE: tl.constexpr):
    """Softmax statistics of every head over one split's keys (max, sum, weighted values)."""
    heads = tl.arange(0, HP)
    dims = tl.arange(0, HD)
    q = _rope_rows(qkv_ptr, heads, dims, p, inv_freq_ptr, heads < H, HD, ".cg")
    q = (q * scale).to(k.dtype)
    idx = task * BNK + tl.arange(0, BNK)
    valid = (idx < tl.minimum(p, W)) & _holds(idx, slot, 0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(valid[None, :], s, _NEG)
    m = tl.max(s, axis=1)
    pexp = tl.where(valid[None, :], tl.exp(s - m[:, None]), 0.0)
    if IEEE:
        acc = tl.dot(pexp.to(v.dtype), v, input_precision="ieee")
    else:
        acc = tl.dot(pexp.to(v.dtype), v)
    stat = task * HP + heads
    tl.store(m_ptr + stat, m)
    tl.store(l_ptr + stat, tl.sum(pexp, axis=1))
    tl.store(acc_ptr + stat[:, None] * HD + dims[None, :], acc)


@triton.jit
def _attn_merge_task(task, qkv_ptr, inv_freq_ptr, m_ptr, l_ptr, acc_ptr, ring_k_ptr, ring_v_ptr, out_ptr,
                     slot, p, W, H, NSPLIT, scale, HP: tl.constexpr, HD: tl.constexpr, CD: tl.constexpr,
                     NSP: tl.constexpr):
    """One head's CD output dims: the splits merged with the current key/value;
    head 0's tasks then store the current key (roped) and value into the ring."""
    DT = out_ptr.dtype.element_ty
    nc = HD // CD
    head = task // nc
    c0 = (task % nc) * CD
    cd = c0 + tl.arange(0, CD)
    dims = tl.arange(0, HD)
    one = tl.arange(0, 1)
    q = _rope_rows(qkv_ptr, one + head, dims, p, inv_freq_ptr, one >= 0, HD, ".cg")  # [1, HD]
    k_cur = _rope_rows(qkv_ptr + H * HD, one, dims, p, inv_freq_ptr, one >= 0, HD, ".cg")
    # the ring holds the model dtype: score the current key the same way
    k_cur = k_cur.to(DT).to(tl.float32)
    q = (q * scale).to(DT).to(tl.float32)  # as the partial pass rounds it
    s_cur = tl.sum(tl.sum(q * k_cur, axis=1), axis=0)
    v_cur = tl.load(qkv_ptr + (H + 1) * HD + cd, cache_modifier=".cg").to(DT).to(tl.float32)
    splits = tl.arange(0, NSP)
    smask = splits < NSPLIT
    stat = splits * HP + head
    m_all = tl.load(m_ptr + stat, mask=smask, other=_NEG, cache_modifier=".cg")
    l_all = tl.load(l_ptr + stat, mask=smask, other=0.0, cache_modifier=".cg")
    mx = tl.maximum(tl.max(m_all, axis=0), s_cur)
    w_all = tl.exp(m_all - mx)
    w_cur = tl.exp(s_cur - mx)
    total = tl.sum(l_all * w_all, axis=0) + w_cur
    acc = tl.load(acc_ptr + stat[:, None] * HD + cd[None, :], mask=smask[:, None], other=0.0,
                  cache_modifier=".cg")
    o = (tl.sum(acc * w_all[:, None], axis=0) + w_cur * v_cur) / total
    live = slot >= 0
    tl.store(out_ptr + head * HD + cd, tl.where(live, o, 0.0).to(DT))
    if live & (head == 0):
        ring_off = slot.to(tl.int64) * W * HD + (p % W) * HD
        in_chunk = (dims >= c0) & (dims < c0 + CD)
        tl.store(ring_k_ptr + ring_off + one[:, None] * HD + dims[None, :], k_cur.to(DT), mask=in_chunk[None, :])
        tl.store(ring_v_ptr + ring_off + cd, v_cur.to(DT))


@triton.jit(do_not_specialize=["emb_scale", "eps", "scale"])
def _decode_body_kernel(
        table_ptr, tok_ptr, slot_ptr, pos_ptr, emb_ptr, emb_scale, inv_freq_ptr,
        x_ptr, a_ptr, g_ptr, hid_ptr, m_ptr, l_ptr, acc_ptr, sync_ptr,
        n_layers, eps, scale, D, L, E, NQKV, H, BW, W, NSPLIT,
        DT: tl.constexpr, NPROG: tl.constexpr, CONVK: tl.constexpr,
        RP_IN: tl.constexpr, BK_IN: tl.constexpr, RP_D: tl.constexpr, BK_MIX: tl.constexpr,
        RP_UP: tl.constexpr, BK_UP: tl.constexpr, BK_DOWN: tl.constexpr,
        BWP: tl.constexpr, BJ: tl.constexpr, HP: tl.constexpr, HD: tl.constexpr, BNK: tl.constexpr,
        CD: tl.constexpr, NSP: tl.constexpr, IEEE: tl.constexpr, WAIT: tl.constexpr,
        POLL_ONE: tl.constexpr):
    pid = tl.program_id(0)
    tok = tl.load(tok_ptr)
    slot = tl.load(slot_ptr)
    p = tl.load(pos_ptr)
    emb_row = emb_ptr + tok * D
    rows_d, mask_d = _rows_of(pid, D, NPROG, RP_D)
    rows_up, mask_up = _rows_of(pid, E, NPROG, RP_UP)
    n_gate_tasks = H * tl.cdiv(BW, BJ)
    n_merge_tasks = H * (HD // CD)
    barrier = 0

    kind = tl.load(table_ptr + KIND)
    rows_in, mask_in = _rows_of(pid, tl.where(kind == 0, 2 * L, NQKV), NPROG, RP_IN)
    w_in = _ptr(table_ptr, W_IN, DT)
    first = _weight_tile(w_in, rows_in, mask_in, 0, D, BK_IN)
    for layer in range(n_layers):
        row = table_ptr + layer * NCOL
        # 1. the input projection, its first tile already requested
        acc, _ = _project(w_in, first, rows_in, mask_in, D, x_ptr, emb_row, emb_scale, layer == 0, x_ptr,
                          pid == 0, _ptr(row, PRE_NORM, DT), eps, True, False, 0, first, BK_IN)
        if kind == 0:
            _conv_epilogue(acc, rows_in, mask_in, _ptr(row, B_IN, DT), a_ptr, _ptr(row, STATE0, DT),
                           _ptr(row, CONV_W, DT), _ptr(row, CONV_B, DT), slot, p, L, CONVK)
            _grid_arrive(sync_ptr)
            gates = _ptr(row, GATES, DT)
            wx, wa = _gate_tiles(gates, pid, n_gate_tasks, H, BW, BWP, BJ)
            barrier += 1
            _grid_wait(sync_ptr, barrier * NPROG, WAIT, POLL_ONE)
            # 2. RG-LRU
            for task in range(pid, n_gate_tasks, NPROG):
                _rglru_task(task, wx, wa, a_ptr, _ptr(row, STATE1, tl.float32), _ptr(row, GATE_BX, DT),
                            _ptr(row, GATE_BA, DT), _ptr(row, NEG8, tl.float32), g_ptr, slot, p, L, BW, BWP, BJ)
                wx, wa = _gate_tiles(gates, task + NPROG, n_gate_tasks, H, BW, BWP, BJ)
            k_mix = L
        else:
            tl.store(a_ptr + rows_in, acc.to(DT), mask=mask_in)
            _grid_arrive(sync_ptr)
            ring_k = _ptr(row, STATE0, DT)
            ring_v = _ptr(row, STATE1, DT)
            k, v = _kv_tiles(ring_k, ring_v, pid, NSPLIT, slot, p, W, HD, BNK)
            barrier += 1
            _grid_wait(sync_ptr, barrier * NPROG, WAIT, POLL_ONE)
            # 2. split-KV partials
            for task in range(pid, NSPLIT, NPROG):
                _attn_partial_task(task, k, v, a_ptr, inv_freq_ptr, m_ptr, l_ptr, acc_ptr, slot, p, W, H, scale,
                                   HP, HD, BNK, IEEE)
                k, v = _kv_tiles(ring_k, ring_v, task + NPROG, NSPLIT, slot, p, W, HD, BNK)
            _grid_arrive(sync_ptr)
            barrier += 1
            _grid_wait(sync_ptr, barrier * NPROG, WAIT, POLL_ONE)
            # 3. merge, current key/value into the ring
            for task in range(pid, n_merge_tasks, NPROG):
                _attn_merge_task(task, a_ptr, inv_freq_ptr, m_ptr, l_ptr, acc_ptr, ring_k, ring_v, g_ptr,
                                 slot, p, W, H, NSPLIT, scale, HP, HD, CD, NSP)
            k_mix = H * HD
        # the mixer's output projection (the host checks every width is a multiple of 16)
        k_mix = tl.multiple_of(k_mix, 16)
        _grid_arrive(sync_ptr)
        w_mix = _ptr(row, W_MIX, DT)
        first_mix = _weight_tile(w_mix, rows_d, mask_d, 0, k_mix, BK_MIX)
        barrier += 1
        _grid_wait(sync_ptr, barrier * NPROG, WAIT, POLL_ONE)
        acc, _ = _project(w_mix, first_mix, rows_d, mask_d, k_mix, g_ptr, emb_row, emb_scale, False, x_ptr,
                          False, x_ptr, eps, False, False, 0, first_mix, BK_MIX)
        _add_residual(acc, rows_d, mask_d, _ptr(row, B_MIX, DT), x_ptr)
        # MLP: gate|up with GeGLU
        _grid_arrive(sync_ptr)
        w_up = _ptr(row, W_UP, DT)
        first_g = _weight_tile(w_up, rows_up, mask_up, 0, D, BK_UP)
        first_u = _weight_tile(w_up + E * D, rows_up, mask_up, 0, D, BK_UP)
        barrier += 1
        _grid_wait(sync_ptr, barrier * NPROG, WAIT, POLL_ONE)
        gate, up = _project(w_up, first_g, rows_up, mask_up, D, x_ptr, emb_row, emb_scale, False, x_ptr,
                            False, _ptr(row, MLP_NORM, DT), eps, True, True, E * D, first_u, BK_UP)
        b_up = _ptr(row, B_UP, DT)
        gate = (gate + tl.load(b_up + rows_up, mask=mask_up, other=0.0).to(tl.float32)).to(DT).to(tl.float32)
        up = (up + tl.load(b_up + E + rows_up, mask=mask_up, other=0.0).to(tl.float32)).to(DT).to(tl.float32)
        tl.store(hid_ptr + rows_up, (_gelu_tanh(gate) * up).to(DT), mask=mask_up)
        # down projection
        _grid_arrive(sync_ptr)
        w_down = _ptr(row, W_DOWN, DT)
        first_d = _weight_tile(w_down, rows_d, mask_d, 0, E, BK_DOWN)
        barrier += 1
        _grid_wait(sync_ptr, barrier * NPROG, WAIT, POLL_ONE)
        acc, _ = _project(w_down, first_d, rows_d, mask_d, E, hid_ptr, emb_row, emb_scale, False, x_ptr,
                          False, x_ptr, eps, False, False, 0, first_d, BK_DOWN)
        _add_residual(acc, rows_d, mask_d, _ptr(row, B_DOWN, DT), x_ptr)
        _grid_arrive(sync_ptr)  # (after the last layer too: nobody waits for that one)
        # the next layer's first input tile (none after the last layer); assigned
        # on every path so the old tile is not kept alive through the loop
        nxt = table_ptr + tl.minimum(layer + 1, n_layers - 1) * NCOL
        kind = tl.load(nxt + KIND)
        rows_in, mask_in = _rows_of(pid, tl.where(kind == 0, 2 * L, NQKV), NPROG, RP_IN)
        mask_in = mask_in & _holds(rows_in, n_layers - 2, layer)
        w_in = _ptr(nxt, W_IN, DT)
        first = _weight_tile(w_in, rows_in, mask_in, 0, D, BK_IN)
        if layer + 1 < n_layers:
            barrier += 1
            _grid_wait(sync_ptr, barrier * NPROG, WAIT, POLL_ONE)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


class DecodeBody:
    """Launcher of `_decode_body_kernel` for one model: owns the per-layer
    table, the activation scratch and the barrier counter.

    layers: per layer a dict with the keys of `COLUMNS` ("kind": 0 recurrent,
    1 attention; tensors for the rest, None where a kind has none; state
    tensors are the pool's, all slots). dims: width, lru_width, mlp_width,
    num_heads, head_dim, window, conv_width. programs: the grid (default: the
    SM count x `programs_per_sm`, checked against the compiled kernel's
    occupancy; 1 under Triton's interpreter, which runs programs one after
    another and so cannot meet at a barrier).
    """

    def __init__(self, layers: list[dict], embedding: torch.Tensor, emb_scale: float, inv_freq: torch.Tensor,
                 eps: float, dims: dict, *, programs: int | None = None, programs_per_sm: int = 4,
                 num_warps: int = 4, tile_elements: int = 2048, maxnreg: int | None = None,
                 cooperative: bool = True):
        self.embedding, self.emb_scale, self.inv_freq, self.eps = embedding, float(emb_scale), inv_freq, float(eps)
        self.dims = dict(dims)
        dev, dtype = embedding.device, embedding.dtype
        self.dtype, self.device = dtype, dev
        d, l, e = dims["width"], dims["lru_width"], dims["mlp_width"]
        h, hd, w = dims["num_heads"], dims["head_dim"], dims["window"]
        if hd & (hd - 1) or l % h or any(v % 16 for v in (d, l, e, hd)):
            raise ValueError("the persistent decode needs a power-of-two head_dim, lru_width divisible by "
                             "num_heads and widths that are multiples of 16")
        self.n_qkv = (h + 2) * hd
        self.table = self._table(layers)
        self.bnk = 16
        self.nsplit = triton.cdiv(w, self.bnk)
        self.hp = max(16, _pow2(h))
        f32 = dict(dtype=torch.float32, device=dev)
        self.x = torch.empty(d, dtype=dtype, device=dev)  # the residual stream; read it after a launch
        self.a = torch.empty(max(2 * l, self.n_qkv), dtype=dtype, device=dev)
        self.g = torch.empty(max(l, h * hd), dtype=dtype, device=dev)
        self.hidden = torch.empty(e, dtype=dtype, device=dev)
        self.m = torch.empty(self.nsplit * self.hp, **f32)
        self.l = torch.empty(self.nsplit * self.hp, **f32)
        self.acc = torch.empty(self.nsplit * self.hp * hd, **f32)
        self.sync = torch.zeros(2, dtype=torch.int32, device=dev)  # [arrivals, barriers that gave up]
        self.num_warps = num_warps
        self.tile_elements = tile_elements
        self.wait = True  # False only to time the barriers (racy: wrong results)
        self.poll_one = False
        self.launch_options = {"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})}
        self.interpreted = not embedding.is_cuda
        self.cooperative = cooperative and not self.interpreted
        if programs is None:
            programs = 1 if self.interpreted else torch.cuda.get_device_properties(dev).multi_processor_count * \
                programs_per_sm
        self.programs = programs
        if not self.interpreted:
            self._fit_grid()

    def _table(self, layers: list[dict]) -> torch.Tensor:
        rows = []
        for entry in layers:
            row = [int(entry["kind"])]
            for name in COLUMNS[1:]:
                t = entry.get(name)
                if t is not None and not t.is_contiguous():
                    raise ValueError(f"{name} must be contiguous")
                row.append(0 if t is None else t.data_ptr())
            rows.append(row)
        self._keep = layers  # the table holds raw addresses: keep the tensors alive
        return torch.tensor(rows, dtype=torch.int64, device=self.embedding.device)

    def set_layers(self, layers: list[dict]) -> None:
        """Rebuild the table (after the state pool reallocated its tensors)."""
        self.table = self._table(layers)

    def _meta(self, programs: int) -> dict:
        dims = self.dims
        d, l, e, h, hd = dims["width"], dims["lru_width"], dims["mlp_width"], dims["num_heads"], dims["head_dim"]
        rp_in = _pow2(triton.cdiv(max(2 * l, self.n_qkv), programs))
        rp_d = _pow2(triton.cdiv(d, programs))
        rp_up = _pow2(triton.cdiv(e, programs))
        # ~2K weight elements per tile and stream: bytes in flight per program
        # within the registers of 4 programs per SM
        bk = lambda rp, k: max(16, min(_pow2(k), self.tile_elements // rp))  # noqa: E731
        bw = l // h
        return dict(DT=_TL_DTYPES[self.dtype], NPROG=programs, CONVK=dims["conv_width"],
                    RP_IN=rp_in, BK_IN=bk(rp_in, d), RP_D=rp_d, BK_MIX=bk(rp_d, max(l, h * hd)),
                    RP_UP=rp_up, BK_UP=bk(rp_up, d), BK_DOWN=bk(rp_d, e),
                    BWP=_pow2(bw), BJ=min(8, _pow2(bw)), HP=self.hp, HD=hd, BNK=self.bnk,
                    CD=min(hd, 32), NSP=_pow2(self.nsplit), IEEE=self.dtype == torch.float32,
                    WAIT=self.wait, POLL_ONE=self.poll_one)

    def _args(self, tokens, slots, pos):
        dims = self.dims
        bw = dims["lru_width"] // dims["num_heads"]
        return (self.table, tokens, slots, pos, self.embedding, self.emb_scale, self.inv_freq,
                self.x, self.a, self.g, self.hidden, self.m, self.l, self.acc, self.sync,
                self.table.shape[0], self.eps, dims["head_dim"] ** -0.5, dims["width"], dims["lru_width"],
                dims["mlp_width"], self.n_qkv, dims["num_heads"], bw, dims["window"], self.nsplit)

    def _fit_grid(self) -> None:
        """Shrink the grid until every program can be resident at once."""
        props = torch.cuda.get_device_properties(self.device)
        sms = props.multi_processor_count
        one = torch.zeros(1, dtype=torch.int64, device=self.device)
        for _ in range(4):
            kernel = _decode_body_kernel.warmup(*self._args(one, one, one), **self._meta(self.programs),
                                                grid=(self.programs,), **self.launch_options)
            kernel._init_handles()
            per_warp = triton.cdiv(kernel.n_regs * 32, 256) * 256
            by_regs = props.regs_per_multiprocessor // (per_warp * self.num_warps)
            by_threads = props.max_threads_per_multi_processor // (32 * self.num_warps)
            by_smem = props.shared_memory_per_multiprocessor // max(1, kernel.metadata.shared)
            resident = sms * min(by_regs, by_threads, by_smem, 32)
            self.n_regs, self.n_spills = kernel.n_regs, kernel.n_spills
            if self.programs <= resident:
                return
            self.programs = resident
        raise RuntimeError("could not size the persistent decode grid")

    def __call__(self, tokens: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens, slots, pos: [1] int64 on the device (slot -1: a padding row:
        no state is touched). Runs every layer; returns the residual stream
        before the final norm ([width], model dtype; overwritten by the next call)."""
        self.sync[0].zero_()
        extra = {"launch_cooperative_grid": True} if self.cooperative else {}
        _decode_body_kernel[(self.programs,)](*self._args(tokens, slots, pos), **self._meta(self.programs),
                                               **self.launch_options, **extra)
        return self.x

    def barriers_given_up(self) -> int:
        """How many barrier waits hit the spin limit so far (0 unless the grid was not resident)."""
        return int(self.sync[1].item())
