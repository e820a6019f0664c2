"""Triton kernels for streamgemma (imported as `streamgemma.kernels`).

The pure-PyTorch path in `streamgemma.griffin` is the reference these kernels
are tested against.
"""
