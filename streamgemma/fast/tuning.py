"""`KernelConfig`: the launch choices of the decode and prefill kernels, one immutable
value passed explicitly (Model -> KernelDecoder -> the kernel wrappers).

The default is what the kernels are tuned for; tuning tools build variants
(`dataclasses.replace(KernelConfig(), ...)`) instead of changing globals.
Anything left unset (an empty mapping, None) means the kernel's own default,
which lives next to the kernel (`gemv.default_config`,
`attention_decode.DEFAULT_BLOCK`, `recurrent_decode.default_launch`,
`attention_prefill.PrefillTiles`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import MappingProxyType

GEMV_EPILOGUES = ("plain", "geglu", "conv", "softcap")

WEIGHT_FORMATS = ("float", "int8", "fp8", "int4")  # float: the model dtype (bf16, fp16, fp32)
TENSOR_CORES = "tc"  # a block's optional 4th element: the tensor-core kernel (kernels/gemv.py)

# (batch bucket, epilogue, N, K[, weight format]): N, K of the weight as stored
GemvKey = tuple[int, str, int, int] | tuple[int, str, int, int, str]
# (BN, BK, num_warps[, "tc"[, num_stages[, K splits]]])
GemvBlock = tuple[int, int, int] | tuple[int, int, int, str] | tuple[int, int, int, str, int] \
    | tuple[int, int, int, str, int, int]
PREFILL_ATTENTION = ("triton", "sdpa")


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """gemv_max_batch: largest batch on the fused GEMV path (weight-streaming
    products with the norms, GeGLU, conv and soft-cap folded in); larger
    batches use cuBLAS products, which win once many rows reuse each weight.
    0: cuBLAS only. At most `kernels/gemv.py`'s MAX_BATCH (16).

    gemv_blocks: (batch bucket, epilogue, N, K) -> (BN, BK, num_warps) for
    GEMV calls of that shape; the batch bucket is the batch rounded up to a
    power of two, N and K the weight's shape ([2N', K] for "geglu"). A key
    may end in a weight format ("float", "int8", "fp8", "int4"): it then applies to
    that format only and wins over the key without one. A block whose 4th
    element is "tc" ((BN, BK, num_warps, "tc"[, num_stages[, splits]]), BN
    and BK >= 16) runs the tensor-core kernel (`kernels/gemv_tc.py`: batch
    padded to 16 rows for the MMA, a pipelined K loop num_stages deep,
    default 4, and K split over `splits` programs per tile, default 1; the
    decoder owns the split workspaces).

    gemv_tensor_cores: weight format -> batch buckets whose GEMV calls run the
    tensor-core variant with its default block where gemv_blocks names none
    (e.g. {"float": (2, 4, 8, 16), "int8": (1, 2, 4, 8, 16)}). Default: none.

    attention_blocks: batch -> keys per tile of the attention decode.

    rglru_launch: (channels per program, num_warps) of the RG-LRU decode
    kernel, for every batch.

    pdl: programmatic dependent launch of the decode kernels. None: on where
    the device supports it (compute capability 9.0+, compiled); True: on
    (DeviceError where unsupported); False: plain launches.

    prefill_attention: "triton", the sliding-window flash kernel of
    `kernels/attention_prefill.py`; "sdpa", PyTorch's memory-efficient
    attention with an explicit mask (the earlier path, kept for comparisons).

    prefill_attention_tiles: (block_m, block_n, num_warps, num_stages) of
    that kernel: (query, head) pairs and keys per tile, powers of two >= 16.

    one_byte_words: the batch-1 GEMV reads int8 / fp8 weights as int32 words
    of four and widens them a word at a time (`kernels/widen.py`; default
    True: on an H100 a 2B step took 19% less time with fp8 and 25% less with
    int8, bench/NOTES.md Q4); False: as byte tensors.

    fp8_matmul_rows, fp8_head_rows: (least, most) rows of the batched fp8
    tensor-core products of the layers, and of the LM head, run by
    `kernels/fp8_matmul.py` instead of cuBLAS's `F.scaled_mm` (defaults (2,
    256) and (2, 64): on an H100 each product was faster there, and 2B steps
    4-16% faster, bench/NOTES.md D15); (0, 0): cuBLAS always.

    batched_pdl: with `pdl` on, the batched step's norms, GeGLU, conv, fp8
    row quantization and Triton fp8 products launch with it too (as the
    RG-LRU and attention kernels do); default False: plainly (not yet
    measured on a GPU, bench/NOTES.md "Waiting for a GPU").

    int4_half_dot: the batch-1 GEMV sums an int4 word's eight products in
    float16 pairs (`kernels/widen.int4_word_dots`; default True: on an H100
    a 2B step took 21% less time, bench/NOTES.md Q7), with float16 rounding
    of the input (each word's columns scaled by a power of two to its
    largest: no range limit) and of a word's partial sums (~5e-4 relative on a product's
    output); False: in float32.
    """

    gemv_max_batch: int = 1
    gemv_blocks: Mapping[GemvKey, GemvBlock] = dataclasses.field(default_factory=dict)
    gemv_tensor_cores: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)
    attention_blocks: Mapping[int, int] = dataclasses.field(default_factory=dict)
    rglru_launch: tuple[int, int] | None = None
    pdl: bool | None = None
    prefill_attention: str = "triton"
    prefill_attention_tiles: tuple[int, int, int, int] | None = None
    one_byte_words: bool = True
    dequantize_rows: int = 512
    int4_half_dot: bool = True
    fp8_matmul_rows: tuple[int, int] = (2, 256)
    fp8_head_rows: tuple[int, int] = (2, 64)
    batched_pdl: bool = False

    def __post_init__(self):
        if not isinstance(self.gemv_max_batch, int) or self.gemv_max_batch < 0:
            raise ValueError(f"gemv_max_batch must be an int >= 0, got {self.gemv_max_batch!r}")
        blocks = {_gemv_key(key): _gemv_block(key, block) for key, block in dict(self.gemv_blocks).items()}
        for key, block in blocks.items():
            if key[4:] == ("int4",) and (len(block) > 3 or key[0] > 1):
                raise ValueError(f"gemv_blocks[{key!r}] = {block!r}: int4 weights run the CUDA-core GEMV at batch 1 "
                                 "only: a (1, ...) key and a (BN, BK, num_warps) block")
        tensor_cores = {}
        for fmt, buckets in dict(self.gemv_tensor_cores).items():
            if fmt not in WEIGHT_FORMATS or fmt == "int4" or not all(_power_of_two(int(b)) for b in buckets):
                raise ValueError(f"gemv_tensor_cores: want {{weight format in {WEIGHT_FORMATS[:3]}: power-of-two "
                                 f"batch buckets}}, got {fmt!r}: {buckets!r}")
            tensor_cores[fmt] = frozenset(int(b) for b in buckets)
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
        if not isinstance(self.dequantize_rows, int) or self.dequantize_rows < 0:
            raise ValueError(f"dequantize_rows must be an int >= 0, got {self.dequantize_rows!r}")
        for flag in ("one_byte_words", "int4_half_dot", "batched_pdl"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        for name in ("fp8_matmul_rows", "fp8_head_rows"):
            rows = getattr(self, name)
            if not (isinstance(rows, (tuple, list)) and len(rows) == 2
                    and all(type(v) is int and v >= 0 for v in rows)):
                raise ValueError(f"{name} must be (least, most) rows, ints >= 0; got {rows!r}")
            object.__setattr__(self, name, tuple(rows))
        if self.pdl not in (None, True, False):
            raise ValueError(f"pdl must be None, True or False, got {self.pdl!r}")
        if self.prefill_attention not in PREFILL_ATTENTION:
            raise ValueError(f"prefill_attention must be one of {PREFILL_ATTENTION}, got {self.prefill_attention!r}")
        tiles = self.prefill_attention_tiles
        if tiles is not None:
            tiles = tuple(int(v) for v in tiles)
            if len(tiles) != 4 or not all(_power_of_two(v) for v in tiles[:3]) or min(tiles[:2]) < 16 \
                    or tiles[3] < 1:
                raise ValueError("prefill_attention_tiles must be (block_m, block_n, num_warps, num_stages): "
                                 f"powers of two, blocks >= 16, stages >= 1; got {self.prefill_attention_tiles!r}")
        # read-only copies: a config cannot change under a decoder that holds it
        object.__setattr__(self, "gemv_blocks", MappingProxyType(blocks))
        object.__setattr__(self, "gemv_tensor_cores", MappingProxyType(tensor_cores))
        object.__setattr__(self, "attention_blocks", MappingProxyType(attention))
        object.__setattr__(self, "rglru_launch", launch)
        object.__setattr__(self, "prefill_attention_tiles", tiles)

    def __hash__(self) -> int:
        return hash((self.gemv_max_batch, frozenset(self.gemv_blocks.items()),
                     frozenset(self.gemv_tensor_cores.items()),
                     frozenset(self.attention_blocks.items()), self.rglru_launch, self.pdl,
                     self.prefill_attention, self.prefill_attention_tiles, self.one_byte_words,
                     self.dequantize_rows, self.int4_half_dot, self.fp8_matmul_rows, self.fp8_head_rows,
                     self.batched_pdl))

    def gemv_block(self, batch: int, epilogue: str, n: int, k: int, weight_format: str = "float") -> GemvBlock | None:
        """The block shape for a GEMV of `batch` rows and an [n, k] weight, or
        None for the kernel's default."""
        bucket = 1 << (batch - 1).bit_length()
        block = self.gemv_blocks.get((bucket, epilogue, n, k, weight_format))
        return block if block is not None else self.gemv_blocks.get((bucket, epilogue, n, k))

    def gemv_launch(self, batch: int, epilogue: str, n: int, k: int,
                    weight_format: str = "float") -> tuple[GemvBlock | None, bool]:
        """(block or None for the default, whether the tensor-core variant runs)
        for a GEMV of `batch` rows and an [n, k] weight of `weight_format`."""
        block = self.gemv_block(batch, epilogue, n, k, weight_format)
        if block is not None:
            return block, len(block) >= 4
        bucket = 1 << (batch - 1).bit_length()
        return None, bucket in self.gemv_tensor_cores.get(weight_format, ())

    def attention_block(self, batch: int) -> int | None:
        """Keys per tile of the attention decode at `batch` rows, or None for the default."""
        return self.attention_blocks.get(batch)


def _gemv_key(key) -> GemvKey:
    if len(key) not in (4, 5) or key[1] not in GEMV_EPILOGUES or not _power_of_two(int(key[0])) \
            or (len(key) == 5 and key[4] not in WEIGHT_FORMATS):
        raise ValueError(f"gemv_blocks key {key!r}: want (power-of-two batch bucket, one of "
                         f"{GEMV_EPILOGUES}, N, K[, one of {WEIGHT_FORMATS}])")
    return (int(key[0]), key[1], int(key[2]), int(key[3])) + tuple(key[4:])


def _gemv_block(key, block) -> GemvBlock:
    bad = ValueError(f"gemv_blocks[{key!r}] = {block!r}: want (BN, BK, num_warps[, {TENSOR_CORES!r}[, num_stages"
                     f"[, splits]]]), BN, BK, num_warps powers of two (BN, BK >= 16 with {TENSOR_CORES!r}), "
                     "num_stages and splits >= 1")
    if len(block) not in (3, 4, 5, 6) or (len(block) >= 4 and block[3] != TENSOR_CORES):
        raise bad
    bn, bk, warps = (int(v) for v in block[:3])
    extra = tuple(int(v) for v in block[4:])
    if not (_power_of_two(bn) and _power_of_two(bk) and _power_of_two(warps)) or \
            (len(block) >= 4 and min(bn, bk) < 16) or any(v < 1 for v in extra):
        raise bad
    return (bn, bk, warps) + tuple(block[3:4]) + extra


def gemv_blocks_from_json(entries: Mapping[str, Sequence]) -> dict[GemvKey, GemvBlock]:
    """`gemv_blocks` from the "best" table that bench/dev/tune_gemv.py writes
    ({"bucket,epilogue,N,K[,format]": [BN, BK, num_warps[, "tc"[, num_stages[, splits]]]]}), or its
    "best_tensor_core" table (tensor-core blocks only)."""
    blocks = {}
    for key, block in entries.items():
        bucket, epilogue, n, k, *fmt = key.split(",")
        blocks[(int(bucket), epilogue, int(n), int(k), *fmt)] = tuple(v if v == TENSOR_CORES else int(v)
                                                                      for v in block)
    return blocks
