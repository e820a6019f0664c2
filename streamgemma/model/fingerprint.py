"""The model's fingerprint: a cheap digest of its config and weights, which
snapshots carry so that a session is restored only into the weights it ran on."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch

from .griffin import Griffin


def fingerprint(network: Griffin, samples: int = 64) -> str:
    """A digest of the config and the weights that costs little: per parameter,
    its name, shape and `samples` evenly spaced values rounded to bfloat16 (so
    the same weights loaded in float32 or bfloat16 give the same digest; a
    float16 model takes it from the weights before their cast: `SourceDigest`).
    A quantized network keeps the digest of the weights it was quantized from,
    so sessions move between a checkpoint's formats (their state is alike)."""
    if network.quantization is not None:
        return network.quantization.fingerprint
    digest = SourceDigest(network, samples)
    for name, p in network.named_parameters():
        digest.add(name, (), p.detach())
    return digest.hexdigest()


# safetensors metadata of a save whose weights differ from those its model was fingerprinted from (float16)
SOURCE_KEY, STORED_KEY = "streamgemma.fingerprint", "streamgemma.stored_fingerprint"


def save_metadata(network: Griffin, model_fingerprint: str) -> dict[str, str]:
    """What a save of `network` records so that loading it finds `model_fingerprint`
    again: it, and the fingerprint of the weights as written, where the two differ
    (a float16 model's weights were cast after their fingerprint was taken; the
    caller passes one only for weights unchanged since that cast)."""
    if network.quantization is not None:  # (its config.json carries the fingerprint)
        return {}
    stored = fingerprint(network)
    return {} if stored == model_fingerprint else {SOURCE_KEY: model_fingerprint, STORED_KEY: stored}


def loaded_fingerprint(stored: str, metadata: Mapping[str, str] | None) -> str:
    """The fingerprint of weights whose own is `stored`: the one a save recorded
    (`save_metadata`) if these are the weights it wrote, else `stored`."""
    source = (metadata or {}).get(SOURCE_KEY)
    if (metadata or {}).get(STORED_KEY) == stored and isinstance(source, str) and len(source) == 32:
        return source
    return stored


class SourceDigest:
    """`fingerprint` of a network gathered from the tensors it is loaded from,
    as they are before any cast (float16 rounds some values differently than
    bfloat16 does, and flushes the smallest): `add` each parameter's tensor, or
    the block of it at a leading `index`, in the parameter's layout."""

    def __init__(self, network: Griffin, samples: int = 64):
        self._config = network.config.to_json()
        self._params = {name: (tuple(p.shape), sample_indices(p.numel(), samples))
                        for name, p in network.named_parameters()}
        self._values = {name: torch.zeros(len(idx), dtype=torch.bfloat16) for name, (_, idx) in self._params.items()}

    def add(self, name: str, index: tuple[int, ...], block: torch.Tensor) -> None:
        shape, idx = self._params[name]
        start = 0
        for d, i in enumerate(index):  # the block's first element in the flattened parameter
            start += i * math.prod(shape[d + 1:])
        inside = (idx >= start) & (idx < start + block.numel())
        coords = torch.unravel_index(idx[inside] - start, tuple(block.shape))
        self._values[name][inside] = block[tuple(c.to(block.device) for c in coords)].to(torch.bfloat16).cpu()

    def hexdigest(self) -> str:
        h = hashlib.sha256(self._config.encode())
        for name in sorted(self._params):
            h.update(name.encode())
            h.update(str(self._params[name][0]).encode())
            h.update(self._values[name].view(torch.int16).numpy().tobytes())
        return h.hexdigest()[:32]


def sample_indices(numel: int, samples: int) -> torch.Tensor:
    """`min(samples, numel)` evenly spaced indices into `numel` elements, first
    and last included: int64 [n] on the CPU. Integer arithmetic, so it is
    exact for any size (a float32 linspace rounds past the last element of a
    tensor over 2**24 elements, such as the 2B model's 655M-entry embedding)."""
    n = min(samples, numel)
    return torch.arange(n, dtype=torch.int64) * (numel - 1) // max(1, n - 1)
