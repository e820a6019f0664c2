"""The fast paths on the Triton kernels: fused weights, kernel decode (with
CUDA graphs), kernel prefill, and `KernelConfig`, their launch choices."""

from .tuning import KernelConfig

__all__ = ["KernelConfig"]
