"""Sessions on a CUDA device: the graphed kernel decode step under generate,
fork and snapshots. Skipped where there is no GPU (CI); run on the GPU machine."""

import pytest
import torch
from conftest import random_tokens
from reference import rel_err

import streamgemma as sg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_snapshot_resume_is_bit_identical_on_cuda(dtype):
    model = sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=1, device="cuda", dtype=dtype)
    assert model.kernels
    s = model.session(seed=3)
    s.feed(random_tokens(20, 256, seed=2))
    sampling = dict(temperature=0.8, top_k=40, stop_token_ids=[])
    list(s.generate(max_tokens=5, **sampling))
    restored = model.restore(s.snapshot())
    forked = s.fork()
    want = [t.id for t in s.generate(max_tokens=30, **sampling)]
    assert [t.id for t in restored.generate(max_tokens=30, **sampling)] == want
    assert [t.id for t in forked.generate(max_tokens=30, **sampling)] == want


def test_graphed_batches_equal_single_sessions():
    model = sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=2, device="cuda", dtype="float32")
    sessions = [model.session() for _ in range(5)]
    for i, s in enumerate(sessions):
        s.feed(random_tokens(3 + 7 * i, 256, seed=i))
    twins = [model.restore(s.snapshot()) for s in sessions]
    batched = model.decode([s.slot for s in sessions], [9] * 5).clone()  # bucket 8: 3 padding rows
    for row, twin in zip(batched, twins):
        # other batch sizes pick other matmul kernels: equal to float32 rounding, not bitwise
        assert rel_err(row, twin.step(9)) < 1e-4


@pytest.mark.parametrize("batch", [1, 5])  # bucket 1: capped in the graph; bucket 8: capped after it
def test_decode_returns_logits_the_next_decode_leaves_alone(batch):
    """`Model.decode` returns a new tensor on the graphed path too (the engine
    keeps it without a copy): a later step changes neither its values nor
    shares its memory, and it equals the eager kernel step bit for bit."""
    model = sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=2, device="cuda", dtype="bfloat16")
    sessions = [model.session() for _ in range(batch)]
    for i, s in enumerate(sessions):
        s.feed(random_tokens(3 + 7 * i, 256, seed=i))
    slots = [s.slot for s in sessions]
    positions = [model.pool.positions[s] for s in slots]
    twins = [model.restore(s.snapshot()) for s in sessions]
    first = model.decode(slots, [9] * batch)
    kept = first.clone()
    second = model.decode(slots, [4] * batch)
    torch.cuda.synchronize()
    assert first.dtype == torch.float32 and first.shape == (batch, model.config.vocab_size)
    assert torch.equal(first, kept) and first.data_ptr() != second.data_ptr()
    pad = model._graphed._bucket(batch) - batch  # padding rows as the graph has them: same matmul kernels
    dev = "cuda"
    eager = model._kernel_decoder.step(torch.tensor([9] * batch + [0] * pad, device=dev),
                                       torch.tensor([t.slot for t in twins] + [-1] * pad, device=dev),
                                       torch.tensor(positions + [0] * pad, device=dev))
    assert torch.equal(eager[:batch], first)


def test_bfloat16_prefill_and_decode_stay_close_to_float32_reference():
    """The kernel paths in bfloat16 against the float32 reference path on the same
    weights, across ring wraps: within 5e-2 of the logits' scale (the bound of
    test_numerics' half-precision test, whose reasoning applies here)."""
    cfg = sg.GriffinConfig.preset("tiny")
    ref = sg.Model.random(cfg, seed=4, device="cuda", dtype="float32", kernels=False)
    fast = sg.Model.random(cfg, seed=4, device="cuda", dtype="bfloat16", kernels=True)
    tokens = random_tokens(5 * cfg.attention_window + 3, 256, seed=5)
    rs = ref.session()
    want = torch.stack([rs.step(t) for t in tokens])
    fs = fast.session()
    fed = torch.cat([fast.prefill(fs.slot, tokens[a:b], all_logits=True, chunk_size=7)
                     for a, b in ((0, 5), (5, 30), (30, len(tokens)))])
    assert rel_err(fed, want) < 5e-2
    assert (fed.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    ss = fast.session()
    stepped = torch.stack([ss.step(t) for t in tokens])
    assert rel_err(stepped, want) < 5e-2


def test_dependent_launches_change_no_result():
    """The batch-1 graphed step (fused GEMV path) with programmatic dependent
    launch on and off: identical logits step after step (a kernel touching an
    earlier kernel's output before its wait would race)."""
    from streamgemma.fast.tuning import KernelConfig
    from streamgemma.kernels import pdl

    if not pdl.supported():
        pytest.skip("needs compute capability 9.0+")
    tokens = random_tokens(40, 256, seed=8)
    outs = []
    for on in (True, False):
        model = sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=7, device="cuda", dtype="bfloat16",
                                kernel_config=KernelConfig(pdl=on))
        s = model.session()
        s.feed(tokens[:5])
        outs.append(torch.stack([s.step(t).clone() for t in tokens[5:]]))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("quantize", [None, "fp8"])
@pytest.mark.parametrize("batch", [3, 64])
def test_dependent_launches_of_the_batched_step_change_no_result(quantize, batch):
    """The batched step (norms, GeGLU, conv, fp8 rows and Triton fp8 products launched with PDL too) against
    the same step with every launch plain: identical logits step after step."""
    from streamgemma.fast.tuning import KernelConfig
    from streamgemma.kernels import pdl

    if not pdl.supported() or (quantize and torch.cuda.get_device_capability() < (8, 9)):
        pytest.skip("needs compute capability 9.0+")
    config = sg.GriffinConfig(vocab_size=512, width=256, mlp_width=768, num_heads=2, lru_width=256,
                              block_types=sg.GriffinConfig.preset("tiny").block_types, attention_window=16)
    outs = []
    for on in (True, False):
        model = sg.Model.random(config, seed=7, device="cuda", dtype="bfloat16", quantize=quantize,
                                kernel_config=KernelConfig(pdl=on, batched_pdl=True))
        sessions = [model.session() for _ in range(batch)]
        for i, s in enumerate(sessions):
            s.feed(random_tokens(2 + i % 5, 512, seed=i))
        slots = [s.slot for s in sessions]
        outs.append(torch.stack([model.decode(slots, random_tokens(batch, 512, seed=50 + t)).clone()
                                 for t in range(4)]))
    assert torch.equal(outs[0], outs[1])


def test_warm_up_captures_every_bucket_and_leaves_no_session_behind():
    model = sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=4, device="cuda", dtype="bfloat16")
    seconds = model.warm_up(5, prompt_tokens=8)
    assert seconds > 0
    assert model._graphed is not None and {1, 2, 4, 8} <= set(model._graphed._graphs)
    assert len(model.pool._free) == model.pool.capacity  # every warm-up session was closed
    s = model.session(seed=1)
    s.feed(random_tokens(10, 256, seed=3))
    assert len(list(s.generate(max_tokens=4, stop_token_ids=[]))) == 4


def test_graphed_decode_takes_tokens_on_the_device():
    """The engine's CUDA tick feeds the sampled ids to the graph from the
    device: the same logits as host ids (same bucket, so bit for bit)."""
    model = sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=2, device="cuda", dtype="bfloat16")
    sessions = [model.session() for _ in range(3)]
    for i, s in enumerate(sessions):
        s.feed(random_tokens(3 + 7 * i, 256, seed=i))
    twins = [model.restore(s.snapshot()) for s in sessions]
    want = model.decode([t.slot for t in twins], [5, 17, 3]).clone()
    got = model.decode([s.slot for s in sessions], torch.tensor([5, 17, 3], device="cuda"))
    assert torch.equal(got, want)


@pytest.mark.parametrize("batch", [3, 64, 100, 256])
def test_fp8_decode_batches_on_the_triton_product_match_cublas(batch):
    """Batched fp8 products by kernels/fp8_matmul.py (K in three slices for the down projection, summed by a
    second launch) against the same step on cuBLAS's F.scaled_mm, both against the PyTorch reference
    step (weights dequantized, activations not quantized): e4m3 activations make both ~5% off it on random
    weights, and the Triton path must be no further off than cuBLAS's."""
    from streamgemma.fast.tuning import KernelConfig

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs fp8 tensor cores")
    config = sg.GriffinConfig(vocab_size=512, width=256, mlp_width=768, num_heads=2, lru_width=256,
                              block_types=sg.GriffinConfig.preset("tiny").block_types, attention_window=16)
    steps = {}
    for name, options in (("triton", dict(kernel_config=KernelConfig())),
                          ("cublas", dict(kernel_config=KernelConfig(fp8_matmul_rows=(0, 0), fp8_head_rows=(0, 0)))),
                          ("reference", dict(kernels=False))):
        model = sg.Model.random(config, seed=3, device="cuda", dtype="bfloat16", quantize="fp8", **options)
        sessions = [model.session() for _ in range(batch)]
        for i, s in enumerate(sessions):
            s.feed(random_tokens(2 + i % 7, 512, seed=i))
        slots = [s.slot for s in sessions]
        steps[name] = torch.stack([model.decode(slots, random_tokens(batch, 512, seed=100 + t)) for t in range(2)])
    err = {name: rel_err(steps[name], steps["reference"]) for name in ("triton", "cublas")}
    assert err["cublas"] < 0.1 and err["triton"] < 1.2 * err["cublas"] + 0.01, err
    assert (steps["triton"].argmax(-1) == steps["reference"].argmax(-1)).float().mean() > 0.9
