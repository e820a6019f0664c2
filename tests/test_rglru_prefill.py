"""The prefill RG-LRU kernel (`rglru_chunk`, parallel over time and channels)
against the PyTorch reference `RGLRU` (griffin.py: a sequential float32 scan).
Without a GPU it runs under Triton's interpreter (conftest.py), on tiny shapes.

Chunk lengths 1, 7, 33 and 200 are no multiples of the blocks; launches with
small blocks give several time blocks, several channel blocks and a ragged
last channel block at these sizes. Outputs are poisoned with NaN first, the
pool holds random state in every slot, and the other slots must not change.

Tolerance: the kernel composes the steps in another float32 association order
(a tree within tiles, per-block maps composed across blocks), so it differs from
the sequential scan by float32 rounding: on the CPU, max |diff| / max |ref| up
to 1e-6 over these cases, for outputs and state alike, and the same for a
launch of one time block (one program walks every step: the kernel before
time blocks); from that launch (same arithmetic, the scan's order alone)
up to 4e-7. SCAN_TOL bounds both differences while a real mistake (a lost step, a wrong carry, a
missed reset) is O(1e-2) or more. On a GPU, exp and sqrt are approximations
whose error compounds along the decay, for the kernel before time blocks as
much: against the reference there the bound is the float32 kernel tests' 1e-4."""

import functools

import pytest
import torch
from conftest import compile_for_sm90, random_tokens
from reference import randomize_, rel_err

import streamgemma as sg
from streamgemma.kernels.recurrent_prefill import (
    MAX_PROGRAMS,
    MAX_TIME_BLOCKS,
    ScanLaunch,
    default_scan_launch,
    rglru_chunk,
)
from streamgemma.model.griffin import RGLRU, gelu_tanh

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SCAN_TOL = 5e-6
REF_TOL = SCAN_TOL if DEV == "cpu" else 1e-4
HEADS, BW, SLOTS = 3, 4, 3  # L = 12: a channel block of 8 spans heads, the second is ragged

LAUNCHES = {
    "default": None,
    "small blocks": ScanLaunch(block=8, tile=4, time_block=8),  # T = 200: 25 time blocks x 2 channel blocks
    "tiles of 8 in blocks of 16": ScanLaunch(block=16, tile=8, time_block=16),
    "one time block": ScanLaunch(block=16, tile=8, time_block=256),  # one program walks every step
}


def rglru_case(steps: int, seed: int):
    """Random inputs in the layouts rglru_chunk takes, and the reference module."""
    g = torch.Generator().manual_seed(seed)
    width = HEADS * BW
    lru = RGLRU(width, HEADS, torch.float32, "cpu")
    randomize_(lru, seed)  # decays 0.9-0.999 at gate 1: the state carries far
    xc = torch.randn(steps, width, generator=g)
    y = torch.randn(steps, 2 * width, generator=g)[:, width:]  # a view with row stride 2L, as prefill passes it
    h_state = torch.randn(SLOTS, width, generator=g)
    w_gates = torch.stack([lru.input_gate.w.detach(), lru.a_gate.w.detach()])
    gates = torch.matmul(xc.view(steps, HEADS, BW).transpose(0, 1), w_gates)  # [2, H, T, bw], as prefill computes
    neg8 = -8.0 * torch.nn.functional.softplus(lru.a_param.detach())
    to = lambda t: t.to(DEV)  # noqa: E731
    args = dict(gates=to(gates), bx=to(lru.input_gate.b.detach()), ba=to(lru.a_gate.b.detach()), xc=to(xc),
                y=to(y), neg8_softplus_a=to(neg8))
    return lru, args, h_state


def reference(lru, args, h0: torch.Tensor, p0: int):
    xc = args["xc"].cpu()
    pos = torch.arange(p0, p0 + xc.shape[0])[None]
    with torch.no_grad():
        hs, h = lru(xc[None], pos, h0[None])
    return hs[0] * gelu_tanh(args["y"].cpu()), h[0]


def run_kernel(args, h_state: torch.Tensor, slot: int, p0: int, launch):
    h = h_state.clone().to(DEV)
    out = torch.full(args["xc"].shape, float("nan"), device=DEV)
    rglru_chunk(h_state=h, slot=slot, p0=p0, out=out, launch=launch, **args)
    return out.cpu(), h.cpu()


@pytest.mark.parametrize("launch", list(LAUNCHES))
@pytest.mark.parametrize("steps", [1, 7, 33, 200])
@pytest.mark.parametrize("p0", [0, 9])
def test_rglru_chunk_matches_the_sequential_reference(steps, p0, launch):
    """p0 = 0: the reset at the chunk's first step (the slot's old state is
    ignored); p0 > 0: the chunk continues the slot's state."""
    lru, args, h_state = rglru_case(steps, seed=steps + p0)
    slot = 1 + p0 % 2
    want_out, want_h = reference(lru, args, h_state[slot], p0)
    got_out, got_h = run_kernel(args, h_state, slot, p0, LAUNCHES[launch])
    assert not got_out.isnan().any()
    assert rel_err(got_out, want_out) < REF_TOL
    assert rel_err(got_h[slot], want_h) < REF_TOL
    others = [s for s in range(SLOTS) if s != slot]
    assert torch.equal(got_h[others], h_state[others])
    base_out, base_h = one_time_block(steps, p0)
    assert rel_err(got_out, base_out) < SCAN_TOL
    assert rel_err(got_h[slot], base_h[slot]) < SCAN_TOL


@functools.cache
def one_time_block(steps: int, p0: int):
    """The test case above through the launch of one time block (the scan before time blocks)."""
    _, args, h_state = rglru_case(steps, seed=steps + p0)
    return run_kernel(args, h_state, 1 + p0 % 2, p0, LAUNCHES["one time block"])


def test_the_state_carries_from_one_chunk_to_the_next():
    """200 steps as chunks of 33, 7, 160 (different block counts) equal one chunk of 200."""
    lru, args, h_state = rglru_case(200, seed=5)
    want_out, want_h = reference(lru, args, h_state[0], 0)
    h = h_state.clone().to(DEV)
    outs = []
    for a, b in ((0, 33), (33, 40), (40, 200)):
        part = dict(args, gates=args["gates"][:, :, a:b].contiguous(), xc=args["xc"][a:b], y=args["y"][a:b])
        out = torch.full(part["xc"].shape, float("nan"), device=DEV)
        rglru_chunk(h_state=h, slot=0, p0=a, out=out, launch=LAUNCHES["small blocks"], **part)
        outs.append(out.cpu())
    assert rel_err(torch.cat(outs), want_out) < REF_TOL
    assert rel_err(h[0].cpu(), want_h) < REF_TOL


def test_an_empty_chunk_leaves_the_state_alone():
    _, args, h_state = rglru_case(0, seed=1)
    got_out, got_h = run_kernel(args, h_state, 1, 5, None)
    assert got_out.shape == (0, HEADS * BW) and torch.equal(got_h, h_state)


def test_default_launch_by_shape():
    # RecurrentGemma-2B's chunk of 2,048: 16 time blocks x 40 channel blocks
    assert default_scan_launch(2048, 2560) == ScanLaunch(block=64, tile=32, time_block=64)
    assert default_scan_launch(7, 2560).time_block >= 7  # a short chunk: one launch
    assert default_scan_launch(20, 12) == ScanLaunch(block=16, tile=32, time_block=32)
    for steps in (1, 31, 33, 2048, 8192, 65536):
        for width in (12, 2560, 4096):
            ln = default_scan_launch(steps, width)
            blocks = -(-steps // ln.time_block)
            assert blocks <= MAX_TIME_BLOCKS
            assert blocks * -(-width // ln.block) <= MAX_PROGRAMS or ln.time_block == ln.tile


@pytest.mark.parametrize("bad", [dict(block=48), dict(tile=0), dict(time_block=16, tile=32), dict(num_warps=3)])
def test_scan_launch_refuses_bad_block_sizes(bad):
    with pytest.raises(ValueError, match="ScanLaunch"):
        ScanLaunch(**bad)


@pytest.mark.slow
def test_kernel_prefill_of_long_chunks_matches_the_reference():
    """The whole model: chunks of 40 tokens take two time blocks with the default
    launch, from position 0 and mid-session, against the reference path."""
    cfg = sg.GriffinConfig.preset("tiny")
    ref = sg.Model.random(cfg, seed=21, device=DEV, dtype="float32", kernels=False)
    fast = sg.Model.random(cfg, seed=21, device=DEV, dtype="float32", kernels=True)
    tokens = random_tokens(80, cfg.vocab_size, seed=22)
    assert default_scan_launch(40, cfg.lru_width).time_block < 40
    with ref.session() as a, fast.session() as b:
        want = ref.prefill(a.slot, tokens, all_logits=True)
        got = fast.prefill(b.slot, tokens, all_logits=True, chunk_size=40)
        assert rel_err(got, want) < 1e-4
        for rl, fl in zip(ref.pool.layers, fast.pool.layers):
            for rt, ft in zip(rl, fl):
                assert rel_err(ft[b.slot], rt[a.slot]) < 1e-4



COMPILE_FOR_SM90 = """
from streamgemma.kernels import recurrent_prefill as rp

inputs = {n: "*bf16" for n in ("gates_ptr", "bx_ptr", "ba_ptr", "xc_ptr")}
ints, sizes = dict(slot="i32", p0="i32"), dict(T="i32", L="i32", BW="i32", TB="i32")
aggregate = {**inputs, "h_ptr": "*fp32", **ints, "neg8_ptr": "*fp32", "carry_ptr": "*fp32", **sizes}
scan = {**inputs, "y_ptr": "*bf16", "y_stride": "i32", "h_ptr": "*fp32", **ints, "neg8_ptr": "*fp32",
        "carry_ptr": "*fp32", "out_ptr": "*bf16", **sizes}
ln = rp.default_scan_launch(2048, 2560)
blocks = dict(TT=ln.tile, BLOCK=ln.block)
compiled(rp._rglru_aggregate_kernel, aggregate, blocks, ln.num_warps)
for from_carry in (False, True):
    compiled(rp._rglru_scan_kernel, scan, dict(blocks, FROM_CARRY=from_carry, FOLD=rp.FOLD), ln.num_warps)
"""


@pytest.mark.slow
def test_the_kernels_compile_for_the_gpu():
    """The interpreter accepts programs the compiler refuses (a loop-carried value
    whose shape changes, say): both phases compiled for sm_90 with Triton's own
    ptxas, no GPU needed (in a child without the interpreter), at the default
    launch of a 2B chunk, with and without earlier blocks to compose."""
    compile_for_sm90(COMPILE_FOR_SM90)
