"""Snapshot format v2: one session's complete state as bytes, one msgpack
map compressed as independent zstd frames behind a frame index (v1, still
read: one zstd frame). docs/snapshot-format.md is the specification; this
module is its implementation.

- `encode` reads one slot of a state pool into a snapshot: `capture` (a
  validated host copy of the slot, `SnapshotContents`), then
  `encode_contents` (msgpack, zstd frames). The engine captures when it suspends a
  session and encodes later, in a background writer.
- `decode` turns untrusted bytes into validated `SnapshotContents` without
  allocating a tensor: the frame, every size, the schema and the model's
  identity are checked first, and every failure is a `SnapshotError` subclass.
- `load_into` writes validated contents into a slot of a pool (casting to the
  pool's dtype and device).
The bulk copies and the streamed packing are in `snapshot_bytes`, the
zstd container (frames, index, threads) in `snapshot_frames`.

`Session.snapshot` and `Model.restore` are the public entry points; these
functions are the layer under them (benchmarks use them on a bare pool).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import reprlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack
import torch

from ..config import ATTENTION, GriffinConfig
from ..errors import (
    SnapshotError,
    SnapshotFormatError,
    SnapshotMetadataError,
    SnapshotModelMismatch,
    SnapshotVersionError,
)
from ..model.pool import StatePool
from ..validate import MAX_POSITION, SEED_END, SEED_MIN
from . import snapshot_bytes, snapshot_frames
from .files import read_regular_file

MAGIC = "streamgemma-snapshot"
FORMAT_VERSION = 2  # 2: the document in several frames behind an index; 1 (read): one frame
# Stored snapshots entropy-code literals (level 1: about a fifth smaller); the
# engine's suspensions use -1, which restores several times faster
# (bench/NOTES.md, "Snapshots"). Any level makes a valid snapshot.
COMPRESSION_LEVEL = 1

MAX_METADATA_BYTES = 1 << 20  # user metadata, msgpack-encoded
MAX_HOST_BYTES = 1 << 20  # each of the RNG state and the detokenizer's pending bytes
MAX_CONTAINER_LEN = 1 << 16  # entries of any list or map (recent_ids, metadata containers)
MAX_METADATA_ENTRIES = 1 << 17  # lists and maps in user metadata and their entries, all together
MAX_DOCUMENT_ENTRIES = 1 << 18  # the same in a whole document (metadata, recent_ids, layers)
MAX_METADATA_DEPTH = 32
MAX_FINGERPRINT_CHARS = 256
_ENVELOPE_BYTES = 1 << 16  # keys, config, per-tensor headers: everything but the payloads above

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_TOP_KEYS = frozenset({"magic", "version", "model", "dtype", "position", "seed", "layers", "extra",
                       "metadata"})
_EXTRA_KEYS = frozenset({"rng", "detok_pending", "recent_ids", "logits", "stopped"})
MAX_STOPPED_CHARS = 4096  # the description of the stop that ended the last generation
_TENSOR_KEYS = frozenset({"dtype", "shape", "data"})
_TENSOR_NAMES = {"recurrent": ("conv", "h"), ATTENTION: ("keys", "values")}


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    """One state tensor as stored: little-endian C-order bytes of `dtype` and
    `shape` (bytes when decoded, a read-only view of a host copy when captured)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    data: bytes | memoryview
    offset: int | None = dataclasses.field(default=None, compare=False)  # in the contents' arena


@dataclasses.dataclass(frozen=True)
class SnapshotContents:
    """A decoded, validated snapshot (no tensors allocated yet), or a captured
    one (`capture`: the same, with its tensor bytes in host memory).

    layers: per layer, (conv [conv_width-1, lru_width] in `dtype`, h [lru_width]
    float32) for recurrent layers, (keys, values) [min(position, window),
    head_dim] in `dtype` for attention layers, rows oldest to newest.
    extra: the session's host state ({"rng", "detok_pending", "recent_ids",
    "logits", "stopped"}).
    arena: when captured, the host buffer (uint8, pinned on CUDA) that every
    record's data is a slice of, at the record's offset: `load_into` moves the
    whole state to the device in one copy.
    """

    fingerprint: str
    config: GriffinConfig
    dtype: torch.dtype
    position: int
    seed: int | None
    layers: tuple[tuple[TensorRecord, TensorRecord], ...]
    extra: dict
    metadata: dict
    arena: torch.Tensor | None = dataclasses.field(default=None, compare=False, repr=False)


# -- sizes ----------------------------------------------------------------------------
def max_snapshot_bytes(config: GriffinConfig) -> int:
    """Upper bound of a decoded (decompressed) snapshot of a model with `config`:
    its full state at 4 bytes per element (the widest dtype) plus the largest
    metadata and host state the format allows. Decoding refuses anything larger
    before allocating, so a small blob cannot make it allocate more."""
    state = 0
    for kind in config.block_types:
        if kind == ATTENTION:
            state += 2 * config.attention_window * config.head_dim * 4
        else:
            state += (config.conv_width - 1) * config.lru_width * 4 + config.lru_width * 4
    logits = 4 * config.vocab_size + 4 * MAX_STOPPED_CHARS
    return state + logits + MAX_METADATA_BYTES + 2 * MAX_HOST_BYTES + 9 * MAX_CONTAINER_LEN + _ENVELOPE_BYTES


def max_file_bytes(config: GriffinConfig) -> int:
    """Upper bound of a compressed snapshot: zstd's worst case on incompressible
    input adds a few bytes per 128 KiB block to `max_snapshot_bytes`, the
    frame index and frame headers a few more."""
    return snapshot_frames.max_container_bytes(max_snapshot_bytes(config))


# -- encode ----------------------------------------------------------------------------
def encode(pool: StatePool, slot: int, *, fingerprint: str, extra: Mapping[str, Any], seed: int | None = None,
           metadata: dict[str, Any] | None = None, level: int = COMPRESSION_LEVEL,
           threads: int | None = None) -> bytes:
    """Snapshot of `slot` in `pool` as bytes: `encode_contents(capture(...))`.

    fingerprint: the model's `fingerprint`. extra: the session's host state
    ({"rng": bytes | None, "detok_pending": bytes, "recent_ids": list[int],
    "logits": bytes | None, "stopped": str | None}).
    seed: the session's seed. metadata: a dict with str keys of plain msgpack
    values (None, bool, int, float, str, bytes, list, dict), at most
    MAX_METADATA_BYTES encoded; raises SnapshotMetadataError otherwise.
    level: the zstd level (any level makes a valid snapshot). threads: as
    `encode_contents`.
    """
    contents = capture(pool, slot, fingerprint=fingerprint, extra=extra, seed=seed, metadata=metadata)
    return encode_contents(contents, level, threads)


def capture(pool: StatePool, slot: int, *, fingerprint: str, extra: Mapping[str, Any], seed: int | None = None,
            metadata: dict[str, Any] | None = None) -> SnapshotContents:
    """The state of `slot` in `pool` copied to host memory, validated as
    `encode` validates it, not yet encoded: what `encode_contents` turns into
    bytes and `load_into` writes back into a slot. Arguments as `encode`.

    The slot's tensors are joined on their device (attention rings in logical
    order, only the filled rows) and copied to the host in one transfer (into
    pinned memory on a GPU: the contents' arena); the slot may be reused as
    soon as this returns.
    """
    _require_little_endian()
    config = pool.config
    metadata = {} if metadata is None else metadata
    _check_metadata(metadata, SnapshotMetadataError)
    metadata = copy.deepcopy(metadata)  # what was checked is what is encoded, whatever the caller changes later
    _check_extra(extra, config.vocab_size, "the session's host state", SnapshotFormatError)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise SnapshotFormatError(f"the session's seed {seed!r} is not an int or None")
    position = pool.positions[slot]
    segments = _ring_segments(position, config.attention_window)
    groups = []
    for kind, tensors in zip(config.block_types, pool.layers):
        groups += [[t[slot][a:b] for a, b in segments] if kind == ATTENTION else [t[slot]] for t in tensors]
    arena, offsets = snapshot_bytes.gather_to_host(groups)
    records = []
    for parts, offset in zip(groups, offsets):
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        data = snapshot_bytes.read_only(arena, offset, shape, parts[0].dtype)
        records.append(TensorRecord(dtype=parts[0].dtype, shape=shape, data=data, offset=offset))
    return SnapshotContents(fingerprint=fingerprint, config=config, dtype=pool.dtype, position=position,
                            seed=seed, layers=tuple(zip(records[0::2], records[1::2])),
                            extra={k: extra[k] for k in sorted(_EXTRA_KEYS)}, metadata=metadata, arena=arena)


def encode_contents(contents: SnapshotContents, level: int = COMPRESSION_LEVEL,
                    threads: int | None = None) -> bytes:
    """`contents` (from `capture` or `decode`) as snapshot bytes (format v2),
    compressed at zstd `level`: 1 (the default) and above entropy-code
    literals, which shrinks bf16 state by about a fifth; negative levels
    store them raw, which decompresses several times faster per thread
    (bench/NOTES.md, "Snapshots"). The frames are compressed on up to
    `threads` threads (None: one per core, at most 16); the bytes do not
    depend on it."""
    if isinstance(level, bool) or not isinstance(level, int):  # (zstandard's own error named no argument)
        raise TypeError(f"level must be an int (a zstd level), got {type(level).__name__}")
    _require_little_endian()
    _check_writable(contents)
    layers = []
    for kind, records in zip(contents.config.block_types, contents.layers):
        layer = {"kind": kind}
        for name, record in zip(_TENSOR_NAMES[kind], records):
            layer[name] = {"dtype": _DTYPE_NAMES[record.dtype], "shape": list(record.shape), "data": record.data}
        layers.append(layer)
    document = {
        "magic": MAGIC,
        "version": FORMAT_VERSION,
        "model": {"fingerprint": contents.fingerprint, "config": contents.config.to_dict()},
        "dtype": _DTYPE_NAMES[contents.dtype],
        "position": contents.position,
        "seed": contents.seed,
        "layers": layers,
        "extra": contents.extra,
        "metadata": contents.metadata,
    }
    return snapshot_frames.pack(snapshot_bytes.msgpack_pieces(document), level, threads)


def _check_writable(contents: SnapshotContents) -> None:
    """Refuse on write what `decode` refuses on read: no snapshot is written that cannot be restored."""
    if not 0 <= contents.position < MAX_POSITION:
        raise SnapshotFormatError(f"cannot snapshot position {contents.position}: the format holds [0, 2**62)")
    if contents.seed is not None and not SEED_MIN <= contents.seed < SEED_END:
        raise SnapshotFormatError("cannot snapshot a seed outside [-2**63, 2**64)")


def _ring_segments(position: int, window: int) -> list[tuple[int, int]]:
    """Ring index ranges [start, stop) holding positions position - n ..
    position - 1 (n = min(position, window)), oldest first: one range before
    the ring wraps, two after."""
    n = min(position, window)
    start = (position - n) % window
    first = min(n, window - start)
    return [(start, start + first)] + ([(0, n - first)] if n > first else [])


# -- decode ------------------------------------------------------------------------------
def decode(blob: bytes | bytearray | memoryview, config: GriffinConfig, fingerprint: str,
           threads: int | None = None) -> SnapshotContents:
    """Validate `blob` (format v2 or v1) as a snapshot for the model with
    `config` and `fingerprint`, without allocating a tensor; a v2 blob's
    frames are decompressed on up to `threads` threads (None: one per
    core, at most 16).

    Raises (all subclasses of SnapshotError): SnapshotFormatError (not a
    snapshot, malformed, impossible sizes), SnapshotCorrupted (truncated or
    damaged), SnapshotVersionError (newer format), SnapshotModelMismatch
    (another model's snapshot).
    """
    _require_little_endian()
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise SnapshotFormatError(f"a snapshot is bytes, got {type(blob).__name__}")
    limit = max_snapshot_bytes(config)
    container, packed = snapshot_frames.unpack(blob, limit, threads)
    return _validate(_unpack(packed, limit), config, fingerprint, container)


def _unpack(packed: bytes, limit: int) -> Any:
    budget = [MAX_DOCUMENT_ENTRIES]  # objects outgrow their bytes (an empty list: 1 byte packed, 56 built)

    def counted(container):
        budget[0] -= 1 + len(container)
        if budget[0] < 0:
            raise SnapshotFormatError(f"the snapshot's document has more than {MAX_DOCUMENT_ENTRIES} entries")
        return container

    try:
        return msgpack.unpackb(packed, raw=False, strict_map_key=True, use_list=True,
                               max_bin_len=limit, max_str_len=MAX_METADATA_BYTES,
                               max_array_len=MAX_CONTAINER_LEN, max_map_len=MAX_CONTAINER_LEN,
                               max_ext_len=0, list_hook=counted, object_hook=counted)
    except SnapshotFormatError:
        raise
    except Exception as e:  # msgpack raises ValueError, TypeError, its own classes, UnicodeDecodeError...
        raise SnapshotFormatError(f"the snapshot's content is not a valid msgpack document "
                                  f"({type(e).__name__}: {e}); it was not written by streamgemma") from None


def _validate(doc: Any, config: GriffinConfig, fingerprint: str, container: int) -> SnapshotContents:
    if not isinstance(doc, dict) or doc.get("magic") != MAGIC:
        raise SnapshotFormatError(f"not a streamgemma snapshot: the msgpack map has no {MAGIC!r} tag")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise SnapshotFormatError(f"the snapshot's format version is {_short(version)}; expected an int >= 1")
    if version > FORMAT_VERSION:
        raise SnapshotVersionError(f"the snapshot is in format version {version}, newer than version "
                                   f"{FORMAT_VERSION} that this streamgemma reads: upgrade streamgemma")
    if version != container:  # v1 is one frame, v2 the frame index and frames
        raise SnapshotFormatError(f"the snapshot's document says format version {version}, but its "
                                  f"container is that of version {container}")
    if set(doc) != _TOP_KEYS:
        missing, unknown = sorted(_TOP_KEYS - set(doc)), sorted(set(doc) - _TOP_KEYS, key=repr)
        raise SnapshotFormatError(f"the snapshot's map has missing fields {missing} and unknown fields "
                                  f"{unknown} for format version {version}")
    _check_model(doc["model"], config, fingerprint)
    dtype_name = doc["dtype"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise SnapshotFormatError(f"the snapshot's dtype {_short(dtype_name)} is not one of {', '.join(DTYPES)}")
    dtype = DTYPES[dtype_name]
    position = doc["position"]
    if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < MAX_POSITION:
        raise SnapshotFormatError(f"the snapshot's position {_short(position)} is not an int in [0, 2**62)")
    seed = doc["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise SnapshotFormatError(f"the snapshot's seed {_short(seed)} is not an int or nil")
    layers = _check_layers(doc["layers"], config, dtype, position)
    _check_extra(doc["extra"], config.vocab_size, "the snapshot's extra state", SnapshotFormatError)
    _check_metadata(doc["metadata"], SnapshotFormatError)
    return SnapshotContents(fingerprint=doc["model"]["fingerprint"], config=config, dtype=dtype,
                            position=position, seed=seed, layers=layers, extra=doc["extra"],
                            metadata=doc["metadata"])


def check_contents_model(contents: SnapshotContents, config: GriffinConfig, fingerprint: str) -> None:
    """SnapshotModelMismatch unless a captured state (no bytes between) is of this model."""
    _check_model({"fingerprint": contents.fingerprint, "config": contents.config.to_dict()}, config, fingerprint)


def _check_model(model: Any, config: GriffinConfig, fingerprint: str) -> None:
    if not isinstance(model, dict) or set(model) != {"fingerprint", "config"}:
        raise SnapshotFormatError("the snapshot's 'model' field is not a map of 'fingerprint' and 'config'")
    saved_fp, saved_config = model["fingerprint"], model["config"]
    if not isinstance(saved_fp, str) or len(saved_fp) > MAX_FINGERPRINT_CHARS:
        raise SnapshotFormatError(f"the snapshot's model fingerprint {_short(saved_fp)} is not a short string")
    if not isinstance(saved_config, dict):
        raise SnapshotFormatError("the snapshot's model config is not a map")
    ours = config.to_dict()
    if saved_fp == fingerprint and saved_config == ours:
        return
    if saved_config == ours:
        detail = ("same architecture but different weights: restore it with the weights the "
                  "conversation ran on")
    else:
        fields = sorted(set(saved_config) | set(ours), key=repr)  # (a hostile key need not be a str)
        diffs = [f"{k} (snapshot {_short(saved_config.get(k))}, model {_short(ours.get(k))})"
                 for k in fields if saved_config.get(k) != ours.get(k)]
        detail = "configs differ in " + ", ".join(diffs[:6]) + (", ..." if len(diffs) > 6 else "")
    raise SnapshotModelMismatch(
        f"this snapshot was made with model {_short(saved_fp)} ({_describe(saved_config)}), but it is being "
        f"restored into model {fingerprint!r} ({_describe(ours)}): {detail}")


def _describe(config_dict: dict) -> str:
    try:
        config = GriffinConfig.from_dict(config_dict)
    except Exception:  # untrusted values; this only words an error message
        return "an unreadable config"
    name = config.matching_preset()
    shape = f"{config.num_layers} layers, width {config.width}, vocab {config.vocab_size}"
    return f"{name}: {shape}" if name else shape


def _check_layers(layers: Any, config: GriffinConfig, dtype: torch.dtype,
                  position: int) -> tuple[tuple[TensorRecord, TensorRecord], ...]:
    if not isinstance(layers, list) or len(layers) != config.num_layers:
        count = len(layers) if isinstance(layers, list) else "no list of"
        raise SnapshotFormatError(f"the snapshot has {count} layers; this model has {config.num_layers}")
    rows = min(position, config.attention_window)
    out = []
    for i, (kind, layer) in enumerate(zip(config.block_types, layers)):
        names = _TENSOR_NAMES[kind]
        if not isinstance(layer, dict) or layer.get("kind") != kind or set(layer) != {"kind", *names}:
            found = layer.get("kind") if isinstance(layer, dict) else None
            raise SnapshotFormatError(f"layer {i} of the snapshot is not a {kind} layer with fields "
                                      f"{list(names)} (found kind {_short(found)}): this model's block "
                                      f"{i} is {kind}")
        if kind == ATTENTION:
            expected = [(dtype, (rows, config.head_dim))] * 2
        else:
            expected = [(dtype, (config.conv_width - 1, config.lru_width)), (torch.float32, (config.lru_width,))]
        out.append(tuple(_check_tensor(layer[name], f"layer {i} ({kind}) tensor {name!r}", *exp)
                         for name, exp in zip(names, expected)))
    return tuple(out)


def _check_tensor(record: Any, where: str, dtype: torch.dtype, shape: tuple[int, ...]) -> TensorRecord:
    if not isinstance(record, dict) or set(record) != _TENSOR_KEYS:
        raise SnapshotFormatError(f"{where} is not a map of {sorted(_TENSOR_KEYS)}")
    if record["dtype"] != _DTYPE_NAMES[dtype]:
        raise SnapshotFormatError(f"{where} has dtype {_short(record['dtype'])}, expected {_DTYPE_NAMES[dtype]}")
    if record["shape"] != list(shape):
        raise SnapshotFormatError(f"{where} has shape {_short(record['shape'])}, but this model's config "
                                  f"needs {list(shape)}")
    data = record["data"]
    nbytes = math.prod(shape) * dtype.itemsize
    if not isinstance(data, bytes) or len(data) != nbytes:
        size = len(data) if isinstance(data, bytes) else f"no bytes ({type(data).__name__})"
        raise SnapshotFormatError(f"{where} has {size} bytes of data; shape {list(shape)} of "
                                  f"{_DTYPE_NAMES[dtype]} needs {nbytes}")
    return TensorRecord(dtype=dtype, shape=shape, data=data)


def _check_extra(extra: Any, vocab_size: int, where: str, error: type[SnapshotError]) -> None:
    if not isinstance(extra, Mapping) or set(extra) != _EXTRA_KEYS:
        keys = sorted(map(str, extra)) if isinstance(extra, Mapping) else type(extra).__name__
        raise error(f"{where} must be a map with exactly the keys {sorted(_EXTRA_KEYS)}, got {keys}")
    rng, pending, ids = extra["rng"], extra["detok_pending"], extra["recent_ids"]
    if rng is not None and (not isinstance(rng, bytes) or len(rng) > MAX_HOST_BYTES):
        raise error(f"{where}: 'rng' must be None or at most {MAX_HOST_BYTES} bytes, got {_short(rng)}")
    if not isinstance(pending, bytes) or len(pending) > MAX_HOST_BYTES:
        raise error(f"{where}: 'detok_pending' must be at most {MAX_HOST_BYTES} bytes, got {_short(pending)}")
    if not isinstance(ids, list) or len(ids) > MAX_CONTAINER_LEN:
        raise error(f"{where}: 'recent_ids' must be a list of at most {MAX_CONTAINER_LEN} token ids, "
                    f"got {_short(ids)}")
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise error(f"{where}: recent_ids[{i}] = {_short(t)} is not a token id in [0, {vocab_size})")
    logits, stopped = extra["logits"], extra["stopped"]
    if logits is not None and (not isinstance(logits, bytes) or len(logits) != 4 * vocab_size):
        raise error(f"{where}: 'logits' must be None or {4 * vocab_size} bytes (float32 [vocab]), "
                    f"got {_short(logits)}")
    if stopped is not None and (not isinstance(stopped, str) or len(stopped) > MAX_STOPPED_CHARS):
        raise error(f"{where}: 'stopped' must be None or a string of at most {MAX_STOPPED_CHARS} "
                    f"characters, got {_short(stopped)}")


def _check_metadata(metadata: Any, error: type[SnapshotError]) -> int:
    """Validate user metadata (see docs/snapshot-format.md); returns its msgpack size."""
    if not isinstance(metadata, dict):
        raise error(f"snapshot metadata must be a dict with str keys, got {type(metadata).__name__}")
    entries = _check_plain(metadata, "metadata", 0, error)
    if entries > MAX_METADATA_ENTRIES:
        raise error(f"snapshot metadata has {entries} lists, maps and entries in all, more than the "
                    f"{MAX_METADATA_ENTRIES} allowed")
    try:
        size = len(msgpack.packb(metadata))
    except (TypeError, ValueError, OverflowError) as e:  # e.g. a str with lone surrogates
        raise error(f"snapshot metadata cannot be encoded as msgpack: {e}") from None
    if size > MAX_METADATA_BYTES:
        raise error(f"snapshot metadata is {size} bytes as msgpack, more than the {MAX_METADATA_BYTES} allowed")
    return size


def _check_plain(value: Any, where: str, depth: int, error: type[SnapshotError]) -> int:
    """Accept exactly the values that round-trip unchanged through msgpack;
    returns how many lists, maps and entries of them `value` holds."""
    if value is None or isinstance(value, (bool, float, str, bytes)):
        return 0
    if isinstance(value, int):
        if not -(1 << 63) <= value < (1 << 64):
            raise error(f"{where} = {value} does not fit in 64 bits")
        return 0
    if not isinstance(value, (list, dict)):
        raise error(f"{where} is a {type(value).__name__}; metadata values must be None, bool, int, "
                    "float, str, bytes, list, or dict with str keys")
    if depth >= MAX_METADATA_DEPTH:
        raise error(f"{where} is nested deeper than {MAX_METADATA_DEPTH} levels")
    if len(value) > MAX_CONTAINER_LEN:
        raise error(f"{where} has {len(value)} entries, more than {MAX_CONTAINER_LEN}")
    entries = 1 + len(value)
    if isinstance(value, list):
        for i, v in enumerate(value):
            entries += _check_plain(v, f"{where}[{i}]", depth + 1, error)
        return entries
    for k, v in value.items():
        if not isinstance(k, str):
            raise error(f"{where} has a key {_short(k)} of type {type(k).__name__}; keys must be str")
        entries += _check_plain(v, f"{where}[{k!r}]", depth + 1, error)
    return entries


def _short(value: Any, limit: int = 60) -> str:
    """repr of an untrusted value, cut so a message stays readable (and
    shallow: a container nested 1,000 deep would exhaust the stack)."""
    shallow = reprlib.Repr()
    shallow.maxlevel = 3
    text = shallow.repr(value) if isinstance(value, (list, dict)) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise SnapshotFormatError("snapshots store little-endian tensor bytes; this big-endian host "
                                  "cannot read or write them")


# -- load -------------------------------------------------------------------------------------
def load_into(pool: StatePool, slot: int, contents: SnapshotContents) -> None:
    """Write validated contents into `slot` of `pool` and set its position.
    Every entry of the slot is written (ring entries the snapshot does not hold
    become zero, as in a fresh slot). Tensors are cast to the pool's dtype and
    moved to its device (all of them in one host-to-device copy); the RG-LRU
    state stays float32."""
    segments = _ring_segments(contents.position, pool.config.attention_window)
    records = [r for layer in contents.layers for r in layer]
    sources = None
    if pool.device.type != "cpu":  # one host-to-device copy of every tensor's bytes
        captured = contents.arena is not None and all(r.offset is not None for r in records)
        staged = snapshot_bytes.to_device([r.data for r in records], pool.device,
                                          contents.arena if captured else None, [r.offset for r in records])
        sources = [b.view(r.dtype).view(r.shape) for b, r in zip(staged, records)]
    destinations = [t[slot] for layer in pool.layers for t in layer]
    kinds = [kind for kind in pool.config.block_types for _ in range(2)]
    for i, (kind, dst, record) in enumerate(zip(kinds, destinations, records)):
        if sources is None:
            dst, src = snapshot_bytes.cpu_destination_and_source(dst, record.data, record.dtype, record.shape)
        else:
            src = sources[i].to(dst.dtype)
        if kind == ATTENTION:
            done = 0
            for a, b in segments:
                dst[a:b] = src[done:done + b - a]
                done += b - a
            dst[done:] = 0  # unfilled rows: only before the ring wraps, when segments start at 0
        else:
            dst[...] = src
    pool.positions[slot] = contents.position


def read_file(path: str | os.PathLike, config: GriffinConfig) -> bytes:
    """The bytes of a snapshot file, refusing files larger than any snapshot
    of a model with `config` can be (so a wrong path does not read gigabytes)
    and anything but a regular file (a FIFO would block the read forever).
    OSError (missing file, permissions) propagates."""
    return read_regular_file(Path(path), max_file_bytes(config))
