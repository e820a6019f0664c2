"""The exact widening of 1-byte weights (kernels/widen.py): every int8 and
every finite e4m3 value through each interpreter-runnable variant equals
torch's float32 conversion bit for bit, and the GEMV gives bit-identical
outputs whichever variant it uses."""

import pytest
import torch
import triton
import triton.language as tl

from streamgemma.kernels.widen import widen

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
