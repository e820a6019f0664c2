"""The exact widening of 1-byte weights (kernels/widen.py): every int8 and
every finite e4m3 value through each interpreter-runnable variant equals
torch's float32 conversion bit for bit, and the GEMV gives bit-identical
outputs whichever variant it uses."""

import pytest
import torch
import triton
import triton.language as tl

from streamgemma.kernels.widen import WORDS_INT4, widen, widen_words

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _widen_kernel(q_ptr, out_ptr, N: tl.constexpr, WIDEN: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, widen(tl.load(q_ptr + i), WIDEN))


def _widened(q: torch.Tensor, variant: int) -> torch.Tensor:
    out = torch.full(q.shape, float("nan"), device=DEV)
    _widen_kernel[(1,)](q, out, N=q.numel(), WIDEN=variant, num_warps=1)  # PRMT: 4 bytes a thread at least
    return out


def _all_values(dtype: torch.dtype) -> torch.Tensor:
    q = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)
    if dtype != torch.int8:
        q = q[~q.float().isnan()]
        q = torch.cat([q, q[:2]])  # a power-of-two length for tl.arange
    return q.to(DEV)


@pytest.mark.parametrize("dtype,variants", [(torch.int8, ["convert", "magic"] + (["prmt"] if DEV == "cuda" else [])),
                                            (torch.float8_e4m3fn, ["convert", "via_f16"])])
def test_every_variant_widens_every_value_exactly(dtype, variants):
    from streamgemma.kernels.widen import FP8_VARIANTS, INT8_VARIANTS

    table = INT8_VARIANTS if dtype == torch.int8 else FP8_VARIANTS
    q = _all_values(dtype)
    want = q.float()
    for name in variants:
        got = _widened(q, table[name])
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), name


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_gemv_output_does_not_depend_on_the_widening(fmt):
    from streamgemma.kernels.gemv import gemv
    from streamgemma.kernels.widen import FP8_VARIANTS, INT8_VARIANTS
    from streamgemma.model.quantize import quantize_rows

    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(40, 96, generator=g).to(DEV), torch.randn(2, 96, generator=g).to(DEV)
    q, s = quantize_rows(w, fmt)
    variants = INT8_VARIANTS if fmt == "int8" else FP8_VARIANTS
    outs = []
    for name, v in variants.items():
        if name == "prmt" and DEV != "cuda":
            continue
        out = torch.empty(2, 40, device=DEV)
        outs.append(gemv(x, q, out, weight_scale=s, config=(8, 64, 1), widening=v))
    assert len(outs) >= 2 and all(torch.equal(o, outs[0]) for o in outs[1:])


def test_qmatmul_output_does_not_depend_on_the_widening():
    from streamgemma.kernels.qmatmul import qmatmul
    from streamgemma.model.quantize import quantize_rows

    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(48, 64, generator=g).to(DEV), torch.randn(5, 64, generator=g).to(DEV)
    if DEV == "cuda":
        x = x.bfloat16()
    q, s = quantize_rows(w, "int8")
    direct, magic = (qmatmul(x, q, s, widening=v) for v in (0, 1))
    assert torch.equal(direct, magic)


@triton.jit
def _widen_words_kernel(w_ptr, out_ptr, N: tl.constexpr, FORMAT: tl.constexpr, HOW: tl.constexpr):
    i = tl.arange(0, N)
    w0, w1, w2, w3 = widen_words(tl.load(w_ptr + i), FORMAT, HOW)
    tl.store(out_ptr + 4 * i, w0)
    tl.store(out_ptr + 4 * i + 1, w1)
    tl.store(out_ptr + 4 * i + 2, w2)
    tl.store(out_ptr + 4 * i + 3, w3)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_words_widen_every_value_exactly_in_column_order(dtype):
    """Four weights to an int32 word: byte j of word i is column 4i + j, every value exact (the PTX on CUDA too)."""
    from streamgemma.kernels.widen import WORDS_BITS, WORDS_E4M3, WORDS_INT8, WORDS_PTX

    q = _all_values(dtype)  # 256 values: 64 words
    perm = torch.randperm(q.numel(), generator=torch.Generator().manual_seed(0)).to(q.device)
    q = q.view(torch.uint8)[perm].view(dtype)  # mixed bytes in a word
    want = q.float()
    fmt = WORDS_INT8 if dtype == torch.int8 else WORDS_E4M3
    for how in [WORDS_BITS] + ([WORDS_PTX] if DEV == "cuda" else []):
        out = torch.full(q.shape, float("nan"), device=DEV)
        _widen_words_kernel[(1,)](q.view(torch.int32), out, N=q.numel() // 4, FORMAT=fmt, HOW=how, num_warps=1)
        assert torch.equal(out.view(torch.int32), want.view(torch.int32)), how


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("epilogue", ["plain", "geglu", "conv", "softcap"])
def test_batch1_gemv_reading_weight_words_matches_the_byte_path(fmt, epilogue):
    """At batch 1 the GEMV reads 1-byte weights as int32 words; a ragged K (a last tile of 8 words of 16) and N,
    the norm prologue and every epilogue give what the byte tiles give, to float32 rounding."""
    from streamgemma.kernels.gemv import gemv
    from streamgemma.model.quantize import quantize_rows

    g = torch.Generator().manual_seed(11 + len(epilogue))
    k, n = 96, 37
    rows = 2 * n if epilogue == "geglu" else n
    q, s = quantize_rows(torch.randn(rows, k, generator=g) / k ** 0.5, fmt)
    q, s = q.to(DEV), s.to(DEV)
    x, delta, nscale = (t.to(DEV) for t in (torch.randn(1, k, generator=g), torch.randn(1, k, generator=g),
                                             torch.randn(k, generator=g) * 0.1))
    call = dict(src=x, delta=delta, norm_scale=nscale, eps=1e-6, weight_scale=s, epilogue=epilogue, config=(8, 64, 4))
    if epilogue == "softcap":
        call["cap"] = 3.0
    if epilogue == "conv":
        state = torch.randn(2, 3, n, generator=g).to(DEV)
        conv = (torch.randn(4, n, generator=g).to(DEV), torch.randn(n, generator=g).to(DEV))
    outs, residuals = [], []
    for words in (True, False):
        if epilogue == "conv":
            call["conv"] = (state.clone(), torch.tensor([1], device=DEV), torch.tensor([5], device=DEV), *conv)
        res = torch.full((1, k), float("nan"), device=DEV)
        out = torch.full((1, n), float("nan"), device=DEV)
        outs.append(gemv(weight=q, out=out, residual_out=res, words=words, **call))
        residuals.append(res)
    assert torch.equal(residuals[0], residuals[1])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_words_are_refused_where_the_weight_cannot_be_read_as_words():
    """words=True on a weight whose rows are not whole aligned words: a clear error, not a bad view."""
    from streamgemma.kernels.gemv import gemv
    from streamgemma.model.quantize import quantize_rows

    q, s = quantize_rows(torch.randn(8, 130), "fp8")  # 130 bytes a row
    out = torch.empty(1, 8)
    with pytest.raises(ValueError, match="words"):
        gemv(torch.randn(1, 130).to(DEV), q.to(DEV), out.to(DEV), weight_scale=s.to(DEV), config=(8, 64, 4),
             words=True)


@triton.jit
def _widen_int4_kernel(w_ptr, out_ptr, N: tl.constexpr, HOW: tl.constexpr):
    i = tl.arange(0, N)
    cols = widen_words(tl.load(w_ptr + i), WORDS_INT4, HOW)
    for j in tl.static_range(8):
        tl.store(out_ptr + 8 * i + j, cols[j])


def test_int4_words_widen_every_nibble_exactly_in_column_order():
    """Eight nibbles to an int32 word, low nibble of byte j first: column 8i + 2j and 8i + 2j + 1, each the
    stored nibble minus 8 (every nibble value in every position; the PTX on CUDA too)."""
    from streamgemma.kernels.widen import WORDS_BITS, WORDS_PTX
    from streamgemma.model.quantize import unpack_int4

    g = torch.Generator().manual_seed(0)
    q = torch.cat([torch.arange(256, dtype=torch.int32).to(torch.uint8),
                   torch.randint(0, 256, (256,), generator=g).to(torch.uint8)]).to(DEV)  # 128 words
    want = unpack_int4(q).float()
    assert want.min() == -8 and want.max() == 7
    for how in [WORDS_BITS] + ([WORDS_PTX] if DEV == "cuda" else []):
        out = torch.full(want.shape, float("nan"), device=DEV)
        _widen_int4_kernel[(1,)](q.view(torch.int32), out, N=q.numel() // 4, HOW=how, num_warps=1)
        assert torch.equal(out.view(torch.int32), want.view(torch.int32)), how
