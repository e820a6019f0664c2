"""`KernelConfig`: the launch choices of the decode kernels, one immutable
value passed explicitly (Model -> KernelDecoder -> the kernel wrappers).

The default is what the kernels are tuned for; tuning tools build variants
(`dataclasses.replace(KernelConfig(), ...)`) instead of changing globals.
Anything left unset (an empty mapping, None) means the kernel's own default,
which lives next to the kernel (`gemv.default_config`,
`attention_decode.DEFAULT_BLOCK`, `recurrent_decode.default_launch`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import MappingProxyType

GEMV_EPILOGUES = ("plain", "geglu", "conv", "softcap")

GemvKey = tuple[int, str, int, int]  # (batch bucket, epilogue, N, K): N, K of the weight as stored
GemvBlock = tuple[int, int, int]  # (BN, BK, num_warps)


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """gemv_max_batch: largest batch on the fused GEMV path (weight-streaming
    products with the norms, GeGLU, conv and soft-cap folded in); larger
    batches use cuBLAS products, which win once many rows reuse each weight.
    0: cuBLAS only. At most `kernels/gemv.py`'s MAX_BATCH (8).

    gemv_blocks: (batch bucket, epilogue, N, K) -> (BN, BK, num_warps) for
    GEMV calls of that shape; the batch bucket is the batch rounded up to a
    power of two, N and K the weight's shape ([2N', K] for "geglu").

    attention_blocks: batch -> keys per tile of the attention decode.

    rglru_launch: (channels per program, num_warps) of the RG-LRU decode
    kernel, for every batch.

    pdl: programmatic dependent launch of the decode kernels. None: on where
    the device supports it (compute capability 9.0+, compiled); True: on
    (DeviceError where unsupported); False: plain launches.
    """

    gemv_max_batch: int = 1
    gemv_blocks: Mapping[GemvKey, GemvBlock] = dataclasses.field(default_factory=dict)
    attention_blocks: Mapping[int, int] = dataclasses.field(default_factory=dict)
    rglru_launch: tuple[int, int] | None = None
    pdl: bool | None = None

    def __post_init__(self):
        if not isinstance(self.gemv_max_batch, int) or self.gemv_max_batch < 0:
            raise ValueError(f"gemv_max_batch must be an int >= 0, got {self.gemv_max_batch!r}")
        blocks = {}
        for key, block in dict(self.gemv_blocks).items():
            bucket, epilogue, n, k = key
            bn, bk, warps = (int(v) for v in block)
            if epilogue not in GEMV_EPILOGUES or not _power_of_two(bucket):
                raise ValueError(f"gemv_blocks key {key!r}: want (power-of-two batch bucket, one of "
                                 f"{GEMV_EPILOGUES}, N, K)")
            if not (_power_of_two(bn) and _power_of_two(bk) and _power_of_two(warps)):
                raise ValueError(f"gemv_blocks[{key!r}] = {block!r}: BN, BK, num_warps must be powers of two")
            blocks[(int(bucket), epilogue, int(n), int(k))] = (bn, bk, warps)
        attention = {}
        for batch, keys in dict(self.attention_blocks).items():
            if not _power_of_two(int(keys)) or keys < 16:
                raise ValueError(f"attention_blocks[{batch!r}] = {keys!r}: a power of two >= 16")
            attention[int(batch)] = int(keys)
        launch = self.rglru_launch
        if launch is not None:
            launch = tuple(int(v) for v in launch)
            if len(launch) != 2 or not all(_power_of_two(v) for v in launch):
                raise ValueError(f"rglru_launch must be (channels, num_warps), powers of two; "
                                 f"got {self.rglru_launch!r}")
        if self.pdl not in (None, True, False):
            raise ValueError(f"pdl must be None, True or False, got {self.pdl!r}")
        # read-only copies: a config cannot change under a decoder that holds it
        object.__setattr__(self, "gemv_blocks", MappingProxyType(blocks))
        object.__setattr__(self, "attention_blocks", MappingProxyType(attention))
        object.__setattr__(self, "rglru_launch", launch)

    def __hash__(self) -> int:
        return hash((self.gemv_max_batch, frozenset(self.gemv_blocks.items()),
                     frozenset(self.attention_blocks.items()), self.rglru_launch, self.pdl))

    def gemv_block(self, batch: int, epilogue: str, n: int, k: int) -> GemvBlock | None:
        """The block shape for a GEMV of `batch` rows and an [n, k] weight, or
        None for the kernel's default."""
        return self.gemv_blocks.get((1 << (batch - 1).bit_length(), epilogue, n, k))

    def attention_block(self, batch: int) -> int | None:
        """Keys per tile of the attention decode at `batch` rows, or None for the default."""
        return self.attention_blocks.get(batch)


def gemv_blocks_from_json(entries: Mapping[str, Sequence[int]]) -> dict[GemvKey, GemvBlock]:
    """`gemv_blocks` from the "best" table that bench/dev/tune_gemv.py writes
    ({"bucket,epilogue,N,K": [BN, BK, num_warps]})."""
    blocks = {}
    for key, block in entries.items():
        bucket, epilogue, n, k = key.split(",")
        blocks[(int(bucket), epilogue, int(n), int(k))] = tuple(int(v) for v in block)
    return blocks
