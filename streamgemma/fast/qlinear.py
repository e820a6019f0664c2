"""`linear`: the batched paths' matrix product for plain and quantized weights.

- plain weights: F.linear (cuBLAS);
- fp8 on CUDA with fp8 tensor cores (compute capability 8.9+), bfloat16
  activations and dimensions that are multiples of 16: `F.scaled_mm`
  (torch's public `_scaled_mm`) with row-wise scales: each activation row is
  quantized to e4m3 on the fly (scale = row absmax / 448, one launch:
  `kernels/qmatmul.fp8_rows`), the weight keeps its per-channel scale, so the
  product (bias included) runs on the fp8 tensor cores, bfloat16 out;
- int8 (and fp8 elsewhere on CUDA): `kernels/qmatmul.py`, which widens the
  weight tiles in registers; from `dequantize_rows` rows up (prefill
  chunks) the weight is dequantized to the activation dtype a block of
  output features at a time (`kernels/qmatmul.dequantize`, one pass) and
  multiplied by cuBLAS: the reference's own computation, and faster than
  the untuned Triton GEMM where the product is long (bench/NOTES.md Q5);
- int4 on CUDA: `kernels/qmatmul.q4matmul`, which unpacks the nibbles in
  registers and scales each K tile's product by its group's scales; from
  `dequantize_rows` rows up, dequantized in blocks for cuBLAS as int8;
- the CPU: the reference (`quantized_linear_ref`: dequantize, then F.linear).

fp8 activations are the one place the quantized paths round the activations
themselves (to e4m3, per row): this is what the tensor cores take.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..model.quantize import quantized_linear_ref

_E4M3_MAX = 448.0


# the dequantized block of a long product: at most this many bytes of weight in the activation dtype
_DEQUANTIZED_BYTES = 64 << 20


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
           bias: torch.Tensor | None = None, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
           dequantize_rows: int = 0, fp8_split_k: bool = False) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias): `scale` None for a plain weight, the
    float32 [N] row scales of an int8 / float8_e4m3fn weight otherwise. x_fp8:
    x's e4m3 rows and scales when already made (`fp8_rows` of x, e.g. by the
    norm that wrote x); used only where the fp8 tensor-core product runs.
    dequantize_rows: from this many rows of x up, a weight not on the fp8
    tensor cores is dequantized in blocks and multiplied by cuBLAS
    (`dequantized_linear`); 0: never. fp8_split_k: an fp8 tensor-core product
    whose output tiles are too few for the GPU runs in `fp8_k_splits` slices
    of K (KernelConfig.fp8_split_k)."""
    if scale is None:
        return F.linear(x, weight, bias)
    if not x.is_cuda:
        return quantized_linear_ref(x, weight, scale, bias)
    x = x if x.stride(-1) == 1 else x.contiguous()
    if fp8_tensor_cores(x, weight):
        splits = fp8_k_splits(x.shape[0], weight.shape[0], x.shape[1], _split_k_sms(x.device)) if fp8_split_k else 1
        return fp8_linear(x, weight, scale, bias, x_fp8, splits)
    if dequantize_rows and x.shape[0] >= dequantize_rows:
        return dequantized_linear(x, weight, scale, bias)
    from streamgemma.kernels.qmatmul import q4matmul, qmatmul

    return (q4matmul if weight.dtype == torch.uint8 else qmatmul)(x, weight, scale, bias)


def dequantized_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                       block_bytes: int = _DEQUANTIZED_BYTES) -> torch.Tensor:
    """`quantized_linear_ref`'s computation with its weight dequantized one
    block of output features at a time (at most `block_bytes` of it in x's
    dtype), each block's product by F.linear."""
    from streamgemma.kernels.qmatmul import dequantize

    n, k = weight.shape[0], x.shape[-1]
    # whole tiles of 256 rows: a block of odd width sends cuBLAS to a slow unaligned kernel
    rows = max(256, block_bytes // (k * x.element_size()) // 256 * 256)
    if rows >= n:
        return F.linear(x, dequantize(weight, scale, x.dtype), bias)
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        out[:, n0:n1] = F.linear(x, dequantize(weight[n0:n1], scale[n0:n1], x.dtype),
                                 None if bias is None else bias[n0:n1])
    return out


def fp8_tensor_cores(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `fp8_linear` can run this product."""
    return (weight.dtype == torch.float8_e4m3fn and x.dtype == torch.bfloat16 and x.is_cuda
            and torch.cuda.get_device_capability(x.device) >= (8, 9)
            and x.shape[-1] % 16 == 0 and weight.shape[0] % 16 == 0)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
               x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None, k_splits: int = 1) -> torch.Tensor:
    """The fp8 tensor-core product: x rows quantized to e4m3 with their own
    scales (one Triton launch on CUDA, or x_fp8 when given), `F.scaled_mm` with
    row-wise scales and the bias, bfloat16 out (torch also runs it on the CPU,
    slowly: the tests use that). k_splits > 1: one product per slice of K
    (float32 out), summed with the bias by `kernels.qmatmul.sum_partials`."""
    if x_fp8 is not None:
        xq, x_scale = x_fp8
    elif x.is_cuda:
        from streamgemma.kernels.qmatmul import fp8_rows

        xq, x_scale = fp8_rows(x)
    else:
        xq, x_scale = fp8_rows_ref(x)
    rowwise = F.ScalingType.RowWise
    if k_splits == 1:
        return F.scaled_mm(xq, weight.t(), x_scale, rowwise, scale[None, :], rowwise, bias=bias,
                           output_dtype=torch.bfloat16)
    from streamgemma.kernels.qmatmul import sum_partials

    k = x.shape[1]
    if not 2 <= k_splits <= 4 or k % (16 * k_splits):
        raise ValueError(f"fp8_linear: k_splits must be 1-4 and split K ({k}) into multiples of 16, got {k_splits}")
    step = k // k_splits
    parts = [F.scaled_mm(xq[:, k0:k0 + step], weight[:, k0:k0 + step].t(), x_scale, rowwise, scale[None, :],
                         rowwise, output_dtype=torch.float32) for k0 in range(0, k, step)]
    return sum_partials(parts, bias, torch.bfloat16)


# cuBLAS's fp8 kernels on the H100 write 128 x 128 output tiles (bench/NOTES.md D13)
_FP8_TILE = 128


def fp8_k_splits(m: int, n: int, k: int, sms: int) -> int:
    """Slices of K for an fp8 product [m, k] x [k, n]: enough that its output
    tiles times the slices reach the GPU's `sms` (at most 4), where the tiles
    alone fill under half of them; each slice a multiple of 16 columns and
    at least 512 long. 1: no split (also where `sms` is 0)."""
    tiles = math.ceil(m / _FP8_TILE) * math.ceil(n / _FP8_TILE)
    if 2 * tiles >= sms:
        return 1
    splits = min(4, math.ceil(sms / tiles))
    while splits > 1 and (k % (16 * splits) or k // splits < 512):
        splits -= 1
    return splits


@functools.cache
@functools.cache
def _split_k_sms(device: torch.device) -> int:
    """The device's multiprocessors where the split products can run: their
    float32 partials need cuBLAS's row-wise fp8 product, which torch uses on
    compute capability 9.0 with a recent enough cuBLAS (elsewhere row-wise
    scaling gives bfloat16 only, or refuses float32). So one tiny product
    asks, once per device (the first step runs before any graph capture); 0
    where it fails."""
    props = torch.cuda.get_device_properties(device)
    if (props.major, props.minor) != (9, 0):
        return 0
    a = torch.zeros(16, 32, device=device).to(torch.float8_e4m3fn)
    ones = torch.ones(16, 1, device=device)
    rowwise = F.ScalingType.RowWise
    try:
        F.scaled_mm(a, a.t(), ones, rowwise, ones.t(), rowwise, output_dtype=torch.float32)
    except RuntimeError:
        return 0
    return props.multi_processor_count


def fp8_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of `kernels.qmatmul.fp8_rows`: (e4m3 [M, K], scales [M, 1])."""
    x_scale = (x.abs().amax(dim=-1, keepdim=True).float() / _E4M3_MAX).clamp(min=1e-12)
    return (x.float() / x_scale).to(torch.float8_e4m3fn), x_scale
