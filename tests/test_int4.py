"""int4 weights (model/quantize.py): the packing and group scales against
first principles, the reference network, load/save, snapshots across
formats, and the kernel paths (the batch-1 GEMV reading words of eight
nibbles, the dequantize kernel, the decode step and the prefill) against the
reference. Without a GPU the kernels run under Triton's interpreter
(conftest.py) on tiny shapes."""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_tokens
from reference import rel_err

import streamgemma as sg
from streamgemma.fast.decode import KernelDecoder
from streamgemma.fast.fused_weights import FusedWeights
from streamgemma.model.quantize import dequantize, int4_group, quantize_rows, quantized_linear_ref, unpack_int4

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rnd(g, *shape):
    return torch.randn(*shape, generator=g).to(DEV)


# -- the format ------------------------------------------------------------------------------------
def test_int4_packs_two_nibbles_a_byte_with_a_scale_per_group():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 256, generator=g)
    w[2, 128:] = 0  # an all-zero group: scale 1, q 0
    q, s = quantize_rows(w, "int4")
    assert q.dtype == torch.uint8 and q.shape == (6, 128) and s.shape == (6, 2)
    vals = unpack_int4(q)
    assert vals.shape == (6, 256) and vals.min() >= -8 and vals.max() <= 7
    assert torch.equal(vals[:, 0::2], (q & 0xF).to(torch.int8) - 8)  # column 2j: the low nibble of byte j
    assert torch.equal(vals[:, 1::2], (q >> 4).to(torch.int8) - 8)
    assert s[2, 1] == 1 and (vals[2, 128:] == 0).all()
    d = dequantize(q, s, torch.float32)
    assert torch.equal(d, (vals.float().view(6, 2, 128) * s[..., None]).view(6, 256))
    # each group's scale is the least-error one tried: never worse than absmax / 7 (which clips nothing)
    plain_s = w.view(6, 2, 128).abs().amax(-1) / 7
    plain_s = torch.where(plain_s > 0, plain_s, torch.ones_like(plain_s))
    plain = ((w.view(6, 2, 128) / plain_s[..., None]).round().clamp(-8, 7) * plain_s[..., None]).view(6, 256)
    err, plain_err = ((d - w) ** 2).view(6, 2, 128).sum(-1), ((plain - w) ** 2).view(6, 2, 128).sum(-1)
    assert (err <= plain_err + 1e-6).all() and (err < plain_err).any()


@pytest.mark.parametrize("k,group", [(256, 128), (192, 64), (96, 32)])
def test_int4_group_is_the_largest_that_divides_the_row(k, group):
    assert int4_group(k) == group
    q, s = quantize_rows(torch.randn(3, k), "int4")
    assert q.shape == (3, k // 2) and s.shape == (3, k // group)


def test_int4_refuses_rows_no_group_divides():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_rows(torch.randn(3, 48), "int4")
    cfg = sg.GriffinConfig.preset("tiny").replace(width=48, lru_width=48, mlp_width=96)
    with pytest.raises(ValueError, match="width=48"):
        sg.Model.random(cfg, device="cpu", quantize="int4")


# -- the reference network, saving, snapshots ------------------------------------------------------
def test_int4_model_saves_and_loads_without_requantizing(tmp_path):
    m = sg.load("demo", device="cpu", quantize="int4")
    assert m.quantization == "int4" and m.num_parameters() == sg.load("demo", device="cpu").num_parameters()
    m.save(tmp_path / "q")
    back = sg.load(tmp_path / "q", device="cpu")
    assert back.quantization == "int4" and back.fingerprint == m.fingerprint
    for (name, a), (_, b) in zip(m.network.named_parameters(), back.network.named_parameters()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    with m.session(seed=0) as s, back.session(seed=0) as t:
        s.feed("The socket module")
        t.feed("The socket module")
        assert [x.id for x in s.generate(max_tokens=8)] == [x.id for x in t.generate(max_tokens=8)]


def test_snapshots_move_between_float_and_int4_weights():
    tiny = sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0, device="cpu", dtype="float32")
    q4 = sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0, device="cpu", dtype="float32", quantize="int4")
    with tiny.session() as s:
        s.feed(random_tokens(20, 256, seed=1))
        blob = s.snapshot()
        want = s.step(7)
    with q4.restore(blob) as r:
        assert r.position == 20
        assert rel_err(r.step(7), want) < 0.5  # 4 bits a weight: close, not equal
        back = r.snapshot()
    with tiny.restore(back) as r2:
        assert r2.position == 21


def test_demo_heldout_loss_with_int4_weights():
    """int4 keeps the demo model usable: the held-out loss rises 1.47% (3.2544 -> 3.3022, docs/quantization.md);
    the bound leaves room for float rounding only."""
    import json

    from test_demo import sample_documents, sample_loss

    from streamgemma.session.model import demo_path

    recorded = json.loads((demo_path() / "metrics.json").read_text())["sample_loss_nats_per_token"]
    loss, count = sample_loss(sg.load("demo", device="cpu", dtype="float32", quantize="int4"), sample_documents())
    assert count > 5000
    assert loss <= recorded * 1.02, f"{loss:.4f} vs recorded {recorded:.4f}"


# -- kernels ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("half_dot", [False, True])
@pytest.mark.parametrize("epilogue", ["plain", "geglu", "conv", "softcap"])
def test_batch1_gemv_of_int4_words_matches_the_reference(epilogue, half_dot):
    """Words of eight nibbles, each word's sum times its group's scale (groups of 32: several a tile, and a
    ragged last tile), the norm prologue and every epilogue, NaN-poisoned outputs. half_dot: a word's products
    summed in float16 pairs, so float16 rounding of the input and the partial sums (~5e-4 relative)."""
    from streamgemma.kernels.gemv import gemv

    g = torch.Generator().manual_seed(len(epilogue))
    k, n = 160, 37
    w = _rnd(g, 2 * n if epilogue == "geglu" else n, k) / k ** 0.5
    q, s = quantize_rows(w, "int4")
    assert s.shape[1] == 5
    wd = dequantize(q, s, torch.float32)
    x, delta, nscale, bias = _rnd(g, 1, k), _rnd(g, 1, k), _rnd(g, k) * 0.1, _rnd(g, w.shape[0])
    xn = x + delta
    normed = xn / torch.sqrt(xn.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + nscale)
    y = normed @ wd.T + bias
    res = torch.full((1, k), float("nan"), device=DEV)
    call = dict(src=x, delta=delta, norm_scale=nscale, eps=1e-6, bias=bias, weight_scale=s, epilogue=epilogue,
                residual_out=res)
    if epilogue == "geglu":
        want = F.gelu(y[:, :n], approximate="tanh") * y[:, n:]
    elif epilogue == "softcap":
        call.update(bias=None, cap=3.0)
        want = 3.0 * torch.tanh((normed @ wd.T) / 3.0)
    elif epilogue == "conv":
        ck = 4
        state = _rnd(g, 2, ck - 1, n)
        cw, cb = _rnd(g, ck, n), _rnd(g, n)
        full = torch.cat([state[1:2], y[:, None, :]], dim=1)
        want = cb + sum(full[:, ck - 1 - j] * cw[ck - 1 - j] for j in range(ck))
        call["conv"] = (state, torch.tensor([1], device=DEV), torch.tensor([9], device=DEV), cw, cb)
    else:
        want = y
    out = torch.full((1, want.shape[1]), float("nan"), device=DEV)
    gemv(weight=q, out=out, config=(8, 64, 4), half_dot=half_dot, **call)
    assert torch.equal(res, xn)
    err = rel_err(out, want)
    assert err < 2e-3 if half_dot else err < 1e-5
    if half_dot:
        assert err > 1e-6  # the float16 path ran: it is not exact


@pytest.mark.parametrize("big", [32000.0, 1e6, 1e30])
def test_int4_half_dots_stay_finite_and_close_for_any_finite_input(big):
    """Each word's inputs are scaled to float16's range before the half dot: inputs far beyond float16
    (1e6, 1e30), the largest |q| (8) on their words, next to words of tiny inputs (2^-12 x a normal draw,
    float16 subnormals if unscaled) and a word of zeros, in one row."""
    from streamgemma.kernels.gemv import gemv

    g = torch.Generator().manual_seed(24)
    k, n = 256, 24
    q, s = quantize_rows(_rnd(g, n, k), "int4")
    q[:, :4] = 0  # nibbles q + 8 = 0: the largest |q| (8) on the first eight columns
    x = _rnd(g, 1, k) * 2.0 ** -12
    x[0, :8] = big
    x[0, 8:16] = 0.0
    want = x.double() @ dequantize(q, s, torch.float32).double().T
    out = torch.empty(1, n, device=DEV)
    gemv(x, q, out, weight_scale=s, config=(8, 64, 4), half_dot=True)
    assert torch.isfinite(out).all() and rel_err(out.double(), want) < 2e-3
    # without the big words, the tiny ones alone are still summed to float16's relative precision
    x[0, :8] = 0.0
    want = x.double() @ dequantize(q, s, torch.float32).double().T
    gemv(x, q, out, weight_scale=s, config=(8, 64, 4), half_dot=True)
    assert rel_err(out.double(), want) < 2e-3


def test_int4_gemv_refuses_what_it_cannot_run():
    from streamgemma.kernels.gemv import gemv

    q, s = quantize_rows(torch.randn(8, 64), "int4")
    q, s = q.to(DEV), s.to(DEV)
    with pytest.raises(ValueError, match="int4"):
        gemv(torch.randn(2, 64, device=DEV), q, torch.empty(2, 8, device=DEV), weight_scale=s)
    with pytest.raises(ValueError, match="int4"):
        gemv(torch.randn(1, 64, device=DEV), q, torch.empty(1, 8, device=DEV), weight_scale=s, tensor_cores=True)
    with pytest.raises(ValueError, match="half_dot applies to int4 weights only"):
        gemv(torch.randn(1, 64, device=DEV), torch.randn(8, 64, device=DEV), torch.empty(1, 8, device=DEV),
             half_dot=True)


# float32: Triton's interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest
@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if DEV == "cuda" else []))
def test_int4_dequantize_kernel_rounds_as_the_reference(dtype):
    from streamgemma.kernels.qmatmul import dequantize as dequantize_kernel

    g = torch.Generator().manual_seed(21)
    q, s = quantize_rows(_rnd(g, 37, 96), "int4")
    assert torch.equal(dequantize_kernel(q, s, dtype), dequantize(q, s, dtype))


def test_int4_linear_of_any_rows_matches_the_reference():
    """Batches above 1 and prefill chunks: the weight dequantized in blocks, then F.linear."""
    from streamgemma.fast.qlinear import dequantized_linear, linear

    g = torch.Generator().manual_seed(22)
    x, w, b = _rnd(g, 9, 64), _rnd(g, 600, 64), _rnd(g, 600)
    q, s = quantize_rows(w, "int4")
    want = quantized_linear_ref(x, q, s, b)
    torch.testing.assert_close(linear(x, q, s, b), want, rtol=1e-5, atol=1e-5)
    for block_bytes in (256 * 64 * 4, 1 << 20):
        torch.testing.assert_close(dequantized_linear(x, q, s, b, block_bytes=block_bytes), want,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_of_an_int4_model_matches_the_reference(batch):
    """Batch 1: the fused GEMVs reading int4 words (the embedding rows in the first one's prologue); 3 rows:
    the embedding lookup and dequantized products."""
    from test_quantize_kernels import check_decode_step

    check_decode_step("int4", batch, sg.KernelConfig(int4_half_dot=False))


def test_decode_step_with_int4_half_dots_stays_within_float16_rounding():
    """The default at batch 1: a word's products summed in float16 pairs."""
    from test_quantize_kernels import check_decode_step

    assert sg.KernelConfig().int4_half_dot
    check_decode_step("int4", 1, sg.KernelConfig(), tol=5e-3)
    with pytest.raises(ValueError, match="int4_half_dot must be True or False"):
        sg.KernelConfig(int4_half_dot=1)


def test_int4_model_refuses_a_fused_gemv_above_batch_1():
    fast = sg.Model.random(sg.GriffinConfig.preset("tiny"), device=DEV, dtype="float32", kernels=True,
                           quantize="int4")
    with pytest.raises(ValueError, match="int4"):
        KernelDecoder(fast.network, fast.pool, FusedWeights(fast.network), sg.KernelConfig(gemv_max_batch=4))


def test_kernel_prefill_of_an_int4_model_matches_the_reference():
    cfg = sg.GriffinConfig.preset("tiny")
    ref = sg.Model.random(cfg, seed=8, device=DEV, dtype="float32", kernels=False, quantize="int4")
    fast = sg.Model.random(cfg, seed=8, device=DEV, dtype="float32", kernels=True, quantize="int4")
    tokens = random_tokens(21, cfg.vocab_size, seed=9)
    with ref.session() as a, fast.session() as b:
        want = ref.prefill(a.slot, tokens, all_logits=True)
        assert rel_err(fast.prefill(b.slot, tokens, all_logits=True, chunk_size=8), want) < 1e-4


@pytest.mark.parametrize("m", [1, 5, 33])
def test_q4matmul_matches_the_reference(m):
    """The batched products' int4 GEMM: nibbles unpacked in registers, a K tile's product times its group's
    scales (groups of 32 here: a K tile each; a ragged N)."""
    from streamgemma.kernels.qmatmul import q4matmul

    g = torch.Generator().manual_seed(m)
    x, w, b = _rnd(g, m, 96), _rnd(g, 45, 96), _rnd(g, 45)
    q, s = quantize_rows(w, "int4")
    assert rel_err(q4matmul(x, q, s, b), quantized_linear_ref(x, q, s, b)) < 1e-5
    assert rel_err(q4matmul(x, q, s), quantized_linear_ref(x, q, s)) < 1e-5
    q, s = quantize_rows(_rnd(g, 45, 256), "int4")  # groups of 128: several K tiles a group
    x = _rnd(g, m, 256)
    assert rel_err(q4matmul(x, q, s, block=(16, 32, 32, 4, 1)), quantized_linear_ref(x, q, s)) < 1e-5


def test_quantized_example_runs():
    import subprocess
    import sys
    from pathlib import Path

    from conftest import subprocess_env

    example = Path(__file__).resolve().parent.parent / "examples" / "quantized.py"
    done = subprocess.run([sys.executable, str(example), "--device", "cpu"], capture_output=True, text=True,
                          timeout=300, env=subprocess_env())
    assert done.returncode == 0, done.stderr
    assert "int4 saved and loaded back as stored" in done.stdout and "resumed in int4" in done.stdout


@pytest.mark.skipif(DEV == "cuda", reason="the tools' CPU modes (on a GPU they run the 2B shapes)")
def test_the_tuning_tools_run_int4_on_the_cpu(tmp_path):
    """tune_gemv.py --quantize int4 (batch 1, CUDA-core blocks) and decode_variants.py --tiny --quantize int4
    end to end under the interpreter, checked against the reference."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from conftest import subprocess_env

    dev = Path(__file__).resolve().parents[1] / "bench" / "dev"
    run = lambda *a: subprocess.run([sys.executable, *a], env=subprocess_env(TRITON_INTERPRET="1"),  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    tuned = tmp_path / "tune.json"
    done = run(str(dev / "tune_gemv.py"), "--quick", "--batches", "1", "--kernels", "cuda", "--shapes", "out,lm",
               "--quantize", "int4", "--no-int4-half-dot", "--json", str(tuned))
    assert done.returncode == 0, done.stderr[-2000:]
    table = json.loads(tuned.read_text())
    assert not table["int4_half_dot"]
    assert all(key.endswith(",int4") for key in table["best_cuda_core"]) and len(table["best_cuda_core"]) == 2
    half = run(str(dev / "tune_gemv.py"), "--quick", "--batches", "1", "--kernels", "cuda", "--shapes", "out",
               "--quantize", "int4", "--json", str(tmp_path / "half.json"))  # the default
    assert half.returncode == 0, half.stderr[-2000:]
    table_half = json.loads((tmp_path / "half.json").read_text())
    assert table_half["int4_half_dot"] and 1e-6 < table_half["results"][0]["errors"]["cuda"] < 2e-3
    assert all(r["errors"]["cuda"] < 1e-5 for r in table["results"])
    refused = run(str(dev / "tune_gemv.py"), "--quick", "--batches", "2", "--quantize", "int4")
    assert refused.returncode == 2 and "batch-1 CUDA-core kernel only" in refused.stderr
    out = tmp_path / "variants.json"
    done = run(str(dev / "decode_variants.py"), "--tiny", "--variants", "base,full4", "--positions", "9",
               "--quantize", "int4", "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    checks = json.loads(out.read_text())["checks"]
    half, full = checks["base b1"], checks["full4 b1"]  # the default sums in float16 pairs
    assert 1e-6 < half["logits_rel_err"] < 5e-3 and half["state_rel_err"] < 5e-3
    assert full["logits_rel_err"] < 1e-4 and full["state_rel_err"] < 1e-4


def test_int4_gemv_blocks_are_keyed_by_the_products_columns():
    """A gemv_blocks entry for an int4 product is found under (N, K) of the product, not of the packed bytes
    (K / 2): a block too narrow for the words (BK 32) given for the q|k|v product reaches the kernel, which
    refuses it."""
    cfg = sg.GriffinConfig.preset("tiny")
    fast = sg.Model.random(cfg, device=DEV, dtype="float32", kernels=True, quantize="int4")
    qkv_rows = cfg.width + 2 * cfg.head_dim
    bad = sg.KernelConfig(gemv_blocks={(1, "plain", qkv_rows, cfg.width, "int4"): (4, 32, 4)})
    decoder = KernelDecoder(fast.network, fast.pool, FusedWeights(fast.network), bad)
    slot = fast.pool.allocate()
    one = lambda v: torch.tensor([v], device=DEV)  # noqa: E731
    with pytest.raises(ValueError, match="words"):
        decoder.step(one(3), one(slot), one(0))
    KernelDecoder(fast.network, fast.pool, FusedWeights(fast.network)).step(one(3), one(slot), one(0))
