"""The model's fingerprint: a cheap digest of its config and weights, which
snapshots carry so that a session is restored only into the weights it ran on."""

from __future__ import annotations

import hashlib

import torch

from .griffin import Griffin


def fingerprint(network: Griffin, samples: int = 64) -> str:
    """A digest of the config and the weights that costs little: per parameter,
    its name, shape and `samples` evenly spaced values rounded to bfloat16 (so
    the same weights loaded in float32 or bfloat16 give the same digest).
    A quantized network keeps the digest of the weights it was quantized from,
    so sessions move between a checkpoint's formats (their state is alike)."""
    if network.quantization is not None:
        return network.quantization.fingerprint
    h = hashlib.sha256(network.config.to_json().encode())
    for name, p in sorted(network.named_parameters()):
        flat = p.detach().reshape(-1)
        idx = sample_indices(flat.numel(), samples).to(flat.device)
        vals = flat.index_select(0, idx).to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(vals)
    return h.hexdigest()[:32]


def sample_indices(numel: int, samples: int) -> torch.Tensor:
    """`min(samples, numel)` evenly spaced indices into `numel` elements, first
    and last included: int64 [n] on the CPU. Integer arithmetic, so it is
    exact for any size (a float32 linspace rounds past the last element of a
    tensor over 2**24 elements, such as the 2B model's 655M-entry embedding)."""
    n = min(samples, numel)
    return torch.arange(n, dtype=torch.int64) * (numel - 1) // max(1, n - 1)
