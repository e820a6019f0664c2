"""`linear`: the batched paths' matrix product for plain and quantized weights.

- plain weights: F.linear (cuBLAS);
- fp8 on CUDA with fp8 tensor cores (compute capability 8.9+), bfloat16
  activations and dimensions that are multiples of 16: `F.scaled_mm`
  (torch's public `_scaled_mm`) with row-wise scales: each activation row is
  quantized to e4m3 on the fly (scale = row absmax / 448, one launch:
  `kernels/qmatmul.fp8_rows`), the weight keeps its per-channel scale, so the
  product (bias included) runs on the fp8 tensor cores, bfloat16 out;
  within `fp8_matmul_rows` (decode batches) the same product by
  `kernels/fp8_matmul.py`, whose smaller tiles finish sooner there;
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

import torch
import torch.nn.functional as F

from ..model.quantize import quantized_linear_ref

_E4M3_MAX = 448.0


# the dequantized block of a long product: at most this many bytes of weight in the activation dtype
_DEQUANTIZED_BYTES = 64 << 20


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
           bias: torch.Tensor | None = None, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
           dequantize_rows: int = 0, fp8_matmul_rows: tuple[int, int] = (0, 0), pdl: bool = False) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias): `scale` None for a plain weight, the
    float32 [N] row scales of an int8 / float8_e4m3fn weight otherwise. x_fp8:
    x's e4m3 rows and scales when already made (`fp8_rows` of x, e.g. by the
    norm that wrote x); used only where the fp8 tensor-core product runs.
    dequantize_rows: from this many rows of x up, a weight not on the fp8
    tensor cores is dequantized in blocks and multiplied by cuBLAS
    (`dequantized_linear`); 0: never. fp8_matmul_rows: (least, most) rows of
    x whose fp8 tensor-core product runs `kernels.fp8_matmul` (KernelConfig).
    pdl: the fp8 path's Triton launches use programmatic dependent launch."""
    if scale is None:
        return F.linear(x, weight, bias)
    if not x.is_cuda:
        return quantized_linear_ref(x, weight, scale, bias)
    x = x if x.stride(-1) == 1 else x.contiguous()
    if fp8_tensor_cores(x, weight):
        return fp8_linear(x, weight, scale, bias, x_fp8, fp8_matmul_rows, pdl)
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
               x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
               triton_rows: tuple[int, int] = (0, 0), pdl: bool = False) -> torch.Tensor:
    """The fp8 tensor-core product: x rows quantized to e4m3 with their own
    scales (one Triton launch on CUDA, or x_fp8 when given), `F.scaled_mm` with
    row-wise scales and the bias, bfloat16 out (torch also runs it on the CPU,
    slowly: the tests use that); from triton_rows[0] to triton_rows[1] rows
    of x on CUDA, the same product by `kernels.fp8_matmul` where it is
    `preferred` for the size."""
    if x_fp8 is not None:
        xq, x_scale = x_fp8
    elif x.is_cuda:
        from streamgemma.kernels.qmatmul import fp8_rows

        xq, x_scale = fp8_rows(x, pdl=pdl)
    else:
        xq, x_scale = fp8_rows_ref(x)
    if x.is_cuda and triton_rows[0] <= x.shape[0] <= triton_rows[1] and x.shape[1] % 128 == 0:
        from streamgemma.kernels.fp8_matmul import fp8_matmul, preferred

        if preferred(x.shape[0], *weight.shape):
            return fp8_matmul(xq, x_scale, weight, scale, bias, pdl=pdl)
    rowwise = F.ScalingType.RowWise
    return F.scaled_mm(xq, weight.t(), x_scale, rowwise, scale[None, :], rowwise, bias=bias,
                       output_dtype=torch.bfloat16)


def fp8_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of `kernels.qmatmul.fp8_rows`: (e4m3 [M, K], scales [M, 1])."""
    x_scale = (x.abs().amax(dim=-1, keepdim=True).float() / _E4M3_MAX).clamp(min=1e-12)
    return (x.float() / x_scale).to(torch.float8_e4m3fn), x_scale
