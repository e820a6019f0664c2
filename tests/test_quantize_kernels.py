"""The kernel paths of int8 / fp8 weights against the PyTorch reference
(`quantized_linear_ref` and the quantized reference network): the GEMV
kernel's quantized weights and embedding rows, the int8/fp8 Triton GEMM, the
whole decode step (GEMV and matmul paths) and the kernel prefill. Without a
GPU they run under Triton's interpreter (conftest.py) on tiny shapes; the
fp8 tensor-core product (`F.scaled_mm`) is checked on the GPU where it has
fp8 tensor cores, else on the CPU where torch runs it there (2.13 does, 2.11
does not)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_tokens
from reference import rel_err

import streamgemma as sg
from streamgemma.fast.decode import KernelDecoder
from streamgemma.fast.fused_weights import FusedWeights
from streamgemma.model.quantize import dequantize, quantize_rows, quantized_linear_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FMTS = ("int8", "fp8")


def _scaled_mm_device() -> str:
    """Where `F.scaled_mm` runs the fp8 product: a GPU with fp8 tensor cores, else the CPU if this torch
    has a CPU kernel for it; skips the test otherwise (users run fp8 products on CUDA only)."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        return "cuda"
    one = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        F.scaled_mm(one, one.t(), torch.ones(16, 1), F.ScalingType.RowWise, torch.ones(1, 16),
                    F.ScalingType.RowWise, output_dtype=torch.bfloat16)
    except NotImplementedError:
        pytest.skip(f"torch {torch.__version__} has no CPU F.scaled_mm, and there is no GPU with fp8 tensor cores")
    return "cpu"


def _rnd(g, *shape):
    return torch.randn(*shape, generator=g).to(DEV)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("epilogue", ["plain", "geglu", "conv", "softcap"])
def test_gemv_quantized_weight_matches_the_reference(fmt, epilogue):
    """y = s[n] * sum_k q[n, k] x[k] before the bias and the epilogue; ragged blocks, NaN-poisoned outputs."""
    from streamgemma.kernels.gemv import gemv

    g = torch.Generator().manual_seed(len(epilogue) + len(fmt))
    batch, k, n = 3, 50, 37
    w = _rnd(g, 2 * n if epilogue == "geglu" else n, k) / k ** 0.5
    q, s = quantize_rows(w, fmt)
    wd = dequantize(q, s, torch.float32)  # what the kernel must multiply by
    x, delta, nscale, bias = _rnd(g, batch, k), _rnd(g, batch, k), _rnd(g, k) * 0.1, _rnd(g, w.shape[0])
    xn = x + delta
    normed = xn / torch.sqrt(xn.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + nscale)
    y = normed @ wd.T + bias
    call = dict(src=x, delta=delta, norm_scale=nscale, eps=1e-6, bias=bias, weight_scale=s, epilogue=epilogue)
    if epilogue == "geglu":
        want = F.gelu(y[:, :n], approximate="tanh") * y[:, n:]
    elif epilogue == "softcap":
        call.update(bias=None, cap=3.0)
        want = 3.0 * torch.tanh((normed @ wd.T) / 3.0)
    elif epilogue == "conv":  # all 37 features are x channels, the buffer of slots 0..2
        l, ck = n, 4
        state = _rnd(g, batch, ck - 1, l)
        cw, cb = _rnd(g, ck, l), _rnd(g, l)
        slots, pos = torch.arange(batch, device=DEV), torch.tensor([0, 2, 9], device=DEV)
        full = torch.cat([state, y[:, None, :l]], dim=1)
        want = cb + sum(full[:, ck - 1 - j] * cw[ck - 1 - j] * (pos >= j)[:, None] for j in range(ck))
        call["conv"] = (state, slots, pos, cw, cb)
    else:
        want = y
    out = torch.full((batch, want.shape[1]), float("nan"), device=DEV)
    gemv(weight=q, out=out, config=(8, 16, 4), **call)
    assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("fmt", FMTS + ("int4",))
def test_gemv_reads_quantized_embedding_rows(fmt):
    """The first product's input: quantized table rows times their row scale (int4: nibbles times their
    group's scale), times emb_scale."""
    from streamgemma.kernels.gemv import gemv

    g = torch.Generator().manual_seed(7)
    k = 96 if fmt == "int4" else 70  # int4 rows: a multiple of 32 (groups of 32 here)
    table, w, nscale = _rnd(g, 30, k), _rnd(g, 45, k), _rnd(g, k) * 0.1
    tq, ts = quantize_rows(table, fmt)
    tokens = torch.tensor([4, 29], device=DEV)
    res = torch.full((2, k), float("nan"), device=DEV)
    out = torch.full((2, 45), float("nan"), device=DEV)
    gemv(weight=w, out=out, src=tq, src_scale=ts, tokens=tokens, emb_scale=2.5, norm_scale=nscale,
         residual_out=res, config=(16, 32, 4))
    e = dequantize(tq[tokens], ts[tokens], torch.float32) * 2.5
    normed = e / torch.sqrt(e.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + nscale)
    assert rel_err(res, e) < 1e-6
    assert rel_err(out, normed @ w.T) < 1e-5


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m", [1, 5, 33])
def test_qmatmul_matches_the_reference(fmt, m):
    from streamgemma.kernels.qmatmul import qmatmul

    g = torch.Generator().manual_seed(m)
    x, w, b = _rnd(g, m, 70), _rnd(g, 45, 70), _rnd(g, 45)
    q, s = quantize_rows(w, fmt)
    assert rel_err(qmatmul(x, q, s, b), quantized_linear_ref(x, q, s, b)) < 1e-5
    assert rel_err(qmatmul(x, q, s), quantized_linear_ref(x, q, s)) < 1e-5


@pytest.mark.parametrize("fmt", FMTS)
def test_qmatmul_with_the_weight_first_matches_the_reference(fmt):
    """The operand order under measurement (weight_first): same product, ragged tiles."""
    from streamgemma.kernels.qmatmul import qmatmul

    g = torch.Generator().manual_seed(11)
    x, w, b = _rnd(g, 19, 70), _rnd(g, 45, 70), _rnd(g, 45)
    q, s = quantize_rows(w, fmt)
    got = qmatmul(x, q, s, b, block=(16, 32, 32, 4, 1), weight_first=True)
    assert rel_err(got, quantized_linear_ref(x, q, s, b)) < 1e-5


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("path", ["gemv", "gemv-words", "matmul"])
def test_decode_step_of_a_quantized_model_matches_the_reference(fmt, path):
    """3 rows; "gemv-words": 1 row (the words are a batch-1 path) read as int32 words."""
    check_decode_step(fmt, 1 if path == "gemv-words" else 3, sg.KernelConfig(one_byte_words=path == "gemv-words"),
                      gemv_max_batch=0 if path == "matmul" else 8)


def check_decode_step(fmt: str, n: int, kernel_config: sg.KernelConfig, gemv_max_batch: int | None = None,
                      tol: float = 1e-4) -> None:
    """One kernel decode step of n rows of a tiny `fmt` model (mixed positions, the same random state in both
    pools) against the reference network's: logits and every state tensor, within `tol` relative."""
    cfg = sg.GriffinConfig.preset("tiny")
    ref = sg.Model.random(cfg, seed=3, device=DEV, dtype="float32", kernels=False, quantize=fmt)
    fast = sg.Model.random(cfg, seed=3, device=DEV, dtype="float32", kernels=True, quantize=fmt)
    rows = [ref.pool.allocate() for _ in range(n)]
    assert rows == [fast.pool.allocate() for _ in range(n)]
    tokens, positions = random_tokens(n, cfg.vocab_size, seed=4), [2 * cfg.attention_window + 1, 0, 3][:n]
    for m in (ref, fast):  # the same random state in both pools
        g = torch.Generator().manual_seed(5)
        for layer in m.pool.layers:
            for t in layer:
                t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    slots_t = torch.tensor(rows, device=DEV)
    states = ref.pool.gather(slots_t)
    want, states = ref.network.forward_decode(torch.tensor(tokens, device=DEV), torch.tensor(positions, device=DEV),
                                              states)
    ref.pool.scatter(slots_t, states)
    decoder = KernelDecoder(fast.network, fast.pool, FusedWeights(fast.network), kernel_config)
    if gemv_max_batch is not None:
        decoder.gemv_max_batch = gemv_max_batch
    got = decoder.step(torch.tensor(tokens, device=DEV), slots_t, torch.tensor(positions, device=DEV))
    assert rel_err(got, want) < tol
    for rl, fl in zip(ref.pool.layers, fast.pool.layers):
        for rt, ft in zip(rl, fl):
            assert rel_err(ft, rt) < tol


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dequantize_rows", [0, 4])
def test_kernel_prefill_of_a_quantized_model_matches_the_reference(fmt, dequantize_rows):
    """On CUDA, dequantize_rows=4 takes the chunks' products through dequantize + cuBLAS (int8, and fp8 where
    the fp8 tensor cores are not used); elsewhere the products are the reference's."""
    cfg = sg.GriffinConfig.preset("tiny")
    ref = sg.Model.random(cfg, seed=8, device=DEV, dtype="float32", kernels=False, quantize=fmt)
    fast = sg.Model.random(cfg, seed=8, device=DEV, dtype="float32", kernels=True, quantize=fmt,
                           kernel_config=sg.KernelConfig(dequantize_rows=dequantize_rows))
    tokens = random_tokens(21, cfg.vocab_size, seed=9)
    with ref.session() as a, fast.session() as b:
        want = ref.prefill(a.slot, tokens, all_logits=True)
        assert rel_err(fast.prefill(b.slot, tokens, all_logits=True, chunk_size=8), want) < 1e-4


@pytest.mark.parametrize("m", [1, 7])
def test_fp8_scaled_mm_product_at_small_shapes(m):
    """The call the fp8 tensor-core path makes (on the CPU where there is no GPU): row-wise
    e4m3 activations, so the error is that of fp8 activations (~3% relative)."""
    from streamgemma.fast.qlinear import fp8_linear

    dev = _scaled_mm_device()
    g = torch.Generator().manual_seed(m)
    x, w, b = torch.randn(m, 64, generator=g).bfloat16(), torch.randn(48, 64, generator=g), torch.randn(48).bfloat16()
    q, s = quantize_rows(w, "fp8")
    y = fp8_linear(x.to(dev), q.to(dev), s.to(dev), b.to(dev)).cpu()
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), quantized_linear_ref(x.float(), q, s, b.float())) < 0.05


@pytest.mark.parametrize("k", [64, 70])
def test_fp8_row_quantization_kernel_matches_its_reference(k):
    from streamgemma.fast.qlinear import fp8_rows_ref
    from streamgemma.kernels.qmatmul import fp8_rows

    g = torch.Generator().manual_seed(k)
    x = (torch.randn(5, k, generator=g) * torch.rand(5, 1, generator=g) * 10).to(DEV)
    x[2] = 0  # an all-zero row: the smallest scale, q = 0
    q, s = fp8_rows(x)
    q_ref, s_ref = fp8_rows_ref(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 1)
    assert torch.allclose(s, s_ref, rtol=1e-6, atol=0)
    same = q.float() == q_ref.float()
    if DEV == "cpu":
        # Triton 3.9's interpreter converts to e4m3 without carrying a rounded-up mantissa
        # into the exponent (125.6 -> 64, not 128); the GPU's conversion rounds to nearest.
        # Elsewhere the values must agree exactly.
        carry = q_ref.float().abs().log2() == q_ref.float().abs().log2().round()
        same |= carry & (q.float() * 2 == q_ref.float())
    assert same.all()


def test_the_norm_makes_the_fp8_rows_of_its_output_in_the_same_launch():
    """add_rmsnorm(fp8=...) writes what fp8_rows would make of the normed rows,
    bit for bit, and the product takes them instead of quantizing again."""
    from streamgemma.fast.qlinear import fp8_linear
    from streamgemma.kernels.elementwise import add_rmsnorm
    from streamgemma.kernels.qmatmul import fp8_rows

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 96, generator=g) * 4).bfloat16().to(DEV)
    delta, scale = (torch.randn(5, 96, generator=g).bfloat16().to(DEV), torch.randn(96, generator=g).bfloat16().to(DEV))
    normed, fused = torch.empty_like(x), (torch.empty(5, 96, dtype=torch.float8_e4m3fn, device=DEV),
                                          torch.empty(5, 1, device=DEV))
    add_rmsnorm(x, delta, scale, 1e-6, normed, fp8=fused)
    q, s = fp8_rows(normed)
    assert torch.equal(fused[0].view(torch.uint8), q.view(torch.uint8)) and torch.equal(fused[1], s)
    w, b = torch.randn(32, 96, generator=g), torch.randn(32).bfloat16()
    wq, ws = quantize_rows(w, "fp8")
    mm = _scaled_mm_device()
    given = (torch.zeros(5, 96, dtype=torch.float8_e4m3fn, device=mm), torch.ones(5, 1, device=mm))  # not fp8_rows
    out = fp8_linear(normed.to(mm), wq.to(mm), ws.to(mm), b.to(mm), x_fp8=given)
    assert torch.equal(out.cpu(), b.expand(5, 32))


def test_the_geglu_makes_the_fp8_rows_of_its_output_in_the_same_launch():
    """geglu(fp8=...) writes its output and what fp8_rows would make of it, bit
    for bit (the down projection's input on the fp8 tensor cores)."""
    from streamgemma.kernels.elementwise import geglu
    from streamgemma.kernels.qmatmul import fp8_rows

    g = torch.Generator().manual_seed(4)
    gate_up = (torch.randn(3, 2 * 80, generator=g) * 3).bfloat16().to(DEV)  # E = 80: a row padded to 128
    plain = geglu(gate_up, torch.empty(3, 80, dtype=torch.bfloat16, device=DEV))
    out = torch.empty_like(plain)
    fused = (torch.empty(3, 80, dtype=torch.float8_e4m3fn, device=DEV), torch.empty(3, 1, device=DEV))
    geglu(gate_up, out, fp8=fused)
    q, s = fp8_rows(out)
    assert torch.equal(out, plain)
    assert torch.equal(fused[0].view(torch.uint8), q.view(torch.uint8)) and torch.equal(fused[1], s)


# -- CUDA only -------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="fp8 tensor cores and bfloat16 kernels need CUDA")


@cuda
@pytest.mark.parametrize("m", [1, 64, 256, 2048])
def test_fp8_tensor_core_linear_matches_the_reference(m):
    """F.scaled_mm with row-wise scales: the activations are rounded to e4m3
    per row too, so the error is that of fp8 activations (~2-3% relative)."""
    from streamgemma.fast.qlinear import fp8_linear, fp8_tensor_cores, linear

    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 2560, generator=g).to("cuda", torch.bfloat16)
    w, b = torch.randn(3072, 2560, generator=g).cuda() / 50, torch.randn(3072, generator=g).to("cuda", torch.bfloat16)
    q, s = quantize_rows(w, "fp8")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no fp8 tensor cores on this GPU")
    assert fp8_tensor_cores(x, q)
    want = quantized_linear_ref(x.float(), q, s, b.float())
    assert rel_err(fp8_linear(x, q, s, b).float(), want) < 0.05
    assert rel_err(linear(x, q, s, b).float(), want) < 0.05


@cuda
@pytest.mark.parametrize("fmt", FMTS + ("int4",))
@pytest.mark.parametrize("batch", [1, 4, 64])
def test_bfloat16_quantized_decode_on_cuda_matches_the_reference(fmt, batch):
    """The graphed decode step (GEMV at batch 1, qmatmul / _scaled_mm above) and the
    prefill of a bfloat16 model with quantized weights, against the reference path."""
    cfg = sg.GriffinConfig.preset("tiny").replace(vocab_size=4096, width=256, mlp_width=768, lru_width=256,
                                                  num_heads=4, attention_window=64)
    ref = sg.Model.random(cfg, seed=1, device="cuda", dtype="bfloat16", kernels=False, quantize=fmt)
    fast = sg.Model.random(cfg, seed=1, device="cuda", dtype="bfloat16", quantize=fmt)
    prompt = random_tokens(100, cfg.vocab_size, seed=2)
    rs = [ref.session() for _ in range(batch)]
    fs = [fast.session() for _ in range(batch)]
    for a, b in zip(rs, fs):
        assert rel_err(b.feed(prompt), a.feed(prompt)) < 0.1
    tokens = random_tokens(batch, cfg.vocab_size, seed=3)
    want = ref.decode([s.slot for s in rs], tokens)
    got = fast.decode([s.slot for s in fs], tokens)
    assert rel_err(got, want) < 0.1
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("fmt", FMTS)
# bfloat16 on CUDA only: Triton's interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest
@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if DEV == "cuda" else []))
def test_dequantize_kernel_rounds_as_the_reference(fmt, dtype):
    """One pass of `kernels.qmatmul.dequantize`: bit for bit model.quantize.dequantize (ragged tiles)."""
    from streamgemma.kernels.qmatmul import dequantize as dequantize_kernel

    g = torch.Generator().manual_seed(21)
    q, s = quantize_rows(_rnd(g, 37, 70), fmt)
    assert torch.equal(dequantize_kernel(q, s, dtype), dequantize(q, s, dtype))


@pytest.mark.parametrize("fmt", FMTS)
def test_dequantized_linear_in_blocks_matches_the_reference(fmt):
    """The long products' path: the weight dequantized 256 features at a time (a ragged last block), each
    block's product by F.linear, bias included."""
    from streamgemma.fast.qlinear import dequantized_linear

    g = torch.Generator().manual_seed(22)
    x, w, b = _rnd(g, 9, 64), _rnd(g, 600, 64), _rnd(g, 600)
    q, s = quantize_rows(w, fmt)
    want = quantized_linear_ref(x, q, s, b)
    for block_bytes in (256 * 64 * 4, 1 << 20):  # 256 rows a block (3 blocks), then one block
        torch.testing.assert_close(dequantized_linear(x, q, s, b, block_bytes=block_bytes), want,
                                   rtol=1e-5, atol=1e-5)


def test_dequantized_blocks_are_whole_tiles(monkeypatch):
    """A block of odd width (2B's MLP input in 64 MB blocks was 13,107 features) sent cuBLAS to a slow
    unaligned kernel and made int8 prefill 2.5x slower than no blocks: every block but the last is a
    multiple of 256 features."""
    import torch.nn.functional as F

    from streamgemma.fast.qlinear import dequantized_linear

    widths, linear = [], F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: widths.append(w.shape[0]) or linear(x, w, b))
    g = torch.Generator().manual_seed(23)
    q, s = quantize_rows(_rnd(g, 1100, 64), "int8")
    dequantized_linear(_rnd(g, 3, 64), q, s, block_bytes=300 * 64 * 4)
    assert widths == [256, 256, 256, 256, 76]


def test_words_blocks_at_batch1_follow_the_format_and_shape():
    from streamgemma.kernels.gemv import EPILOGUES, WORDS_LONG_K, words_config

    # the 2B shapes: the down product [2560, 7680] has its own block for int8 / fp8, not for int4
    assert words_config("plain", False, 2560, 7680) == WORDS_LONG_K
    assert words_config("plain", False, 3072, 2560) != WORDS_LONG_K
    assert words_config("plain", True, 2560, 7680) == words_config("plain", True, 3072, 2560)
    for int4 in (False, True):
        for epilogue in EPILOGUES:
            bn, bk, warps = words_config(epilogue, int4, 2560, 2560)
            wpk = 8 if int4 else 4
            # powers of two, and wide enough that gemv reads the weight as words (BK >= 8 words)
            assert all(v & (v - 1) == 0 for v in (bn, bk, warps)) and bk >= 8 * wpk


@pytest.mark.parametrize("block", [(16, 32, 32, 1, 1, 1), (16, 32, 32, 1, 1, 2), (32, 16, 64, 1, 1, 2)])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_fp8_matmul_matches_its_reference(block, m):
    """The decode batches' fp8 tensor-core product (kernels/fp8_matmul.py), one launch or K in slices summed by a
    second: ragged rows and columns (N 48 against tiles of 16 and 32), with and without a bias; x's rows strided."""
    from streamgemma.kernels.fp8_matmul import fp8_matmul, fp8_matmul_ref

    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, 160, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)[:, :128].to(DEV)
    w = (torch.randn(48, 128, generator=g) * 3).to(torch.float8_e4m3fn).to(DEV)
    xs, ws = (torch.rand(m, 1, generator=g) / 50).to(DEV), (torch.rand(48, generator=g) / 50).to(DEV)
    for bias in (None, torch.randn(48, generator=g).bfloat16().to(DEV)):
        y = fp8_matmul(x, xs, w, ws, bias, block=block)
        assert y.dtype == torch.bfloat16 and y.shape == (m, 48)
        assert rel_err(y.float(), fp8_matmul_ref(x, xs, w, ws, bias).float()) < 8e-3
        assert torch.equal(fp8_matmul(x, xs, w, ws, bias, block=block), y)  # the same sums every call
    with pytest.raises(ValueError, match="not a multiple of BK"):
        fp8_matmul(x[:, :96], xs, w[:, :96].contiguous(), ws, block=(16, 32, 64, 1, 1, 1))


def test_fp8_matmul_blocks_follow_the_sweep():
    """default_block: 64-wide tiles up to 64 rows, the wide product's 128 x 128 above, a long K in three slices."""
    from streamgemma.kernels.fp8_matmul import default_block

    assert default_block(64, 2560, 2560) == (64, 64, 128, 4, 4, 1)
    assert default_block(64, 2560, 7680) == (64, 64, 128, 4, 4, 3)
    assert default_block(256, 2560, 7680) == (128, 64, 128, 4, 4, 3)
    assert default_block(256, 15360, 2560) == (128, 128, 128, 8, 3, 1)
    assert default_block(128, 15360, 2560) == (64, 128, 128, 4, 4, 1)
    assert default_block(256, 3072, 2560) == (64, 64, 128, 4, 4, 1)
    assert default_block(256, 2560, 7680 + 128)[5] == 1  # K not in three whole slices of 128


def test_fp8_matmul_is_preferred_where_it_was_measured_faster():
    """Every product up to 128 rows; at 256 the 2B q|k|v, out and down (in slices), not x|y and gate|up, and no 9B
    product (a 9B step with all of them was 11% slower than on cuBLAS)."""
    from streamgemma.kernels.fp8_matmul import preferred

    two_b = {"qkv": (3072, 2560), "xy": (5120, 2560), "up": (15360, 2560), "out": (2560, 2560), "down": (2560, 7680)}
    nine_b = {"qkv": (4608, 4096), "xy": (8192, 4096), "up": (24576, 4096), "out": (4096, 4096), "down": (4096, 12288)}
    for shapes in (two_b, nine_b):
        assert all(preferred(m, *nk) for nk in shapes.values() for m in (2, 8, 64, 128))
    assert {name for name, nk in two_b.items() if preferred(256, *nk)} == {"qkv", "out", "down"}
    assert not any(preferred(256, *nk) for nk in nine_b.values())


@pytest.mark.parametrize("rows", [(64, 32), (0, -1), (1, 2, 3), "64", (1.0, 8)])
def test_fp8_matmul_rows_must_be_a_pair_of_counts(rows):
    from streamgemma.fast.tuning import KernelConfig

    if rows == (64, 32):  # an empty range is allowed: cuBLAS always, like (0, 0)
        assert KernelConfig(fp8_matmul_rows=rows).fp8_matmul_rows == (64, 32)
        return
    with pytest.raises(ValueError, match="fp8_matmul_rows"):
        KernelConfig(fp8_matmul_rows=rows)


@pytest.mark.parametrize("slices", [1, 2])
def test_fp8_matmul_takes_strided_scales_and_bias(slices):
    """Scales and bias that are strided views passed the shape checks, and the kernel read them as dense."""
    from streamgemma.kernels.fp8_matmul import fp8_matmul, fp8_matmul_ref

    g = torch.Generator().manual_seed(0)
    m, n, k = 5, 48, 128
    x = (torch.randn(m, k, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn).to(DEV)
    w = (torch.randn(n, k, generator=g) * 3).to(torch.float8_e4m3fn).to(DEV)
    xs = (torch.rand(m, 2, generator=g) / 50).to(DEV)[:, 1:]  # [M, 1], stride (2, 1)
    ws = (torch.rand(n, 2, generator=g) / 50).to(DEV)[:, 1]  # [N], stride 2
    bias = torch.randn(n, 2, generator=g).bfloat16().to(DEV)[:, 0]
    y = fp8_matmul(x, xs, w, ws, bias, block=(16, 32, 32, 1, 1, slices))
    assert rel_err(y.float(), fp8_matmul_ref(x, xs, w, ws, bias).float()) < 8e-3
