"""The container of a snapshot (docs/snapshot-format.md, section 1): the
msgpack document compressed as zstd frames.

- Version 2, written: an index (a zstd skippable frame, which ordinary zstd
  decoders skip) and then independent zstd frames of FRAME_BYTES of the
  document each, so several threads compress and decompress them at once.
  One entropy-coded frame decodes on one thread only: a full-window 2B
  snapshot at level 1 took 25.9 ms to decompress on the GPU host
  (bench/NOTES.md, "Snapshots").
- Version 1, read: the whole document in one zstd frame.

`unpack` treats its input as untrusted: every failure is a SnapshotError
subclass, and every size is checked against the caller's bound before
anything is allocated or decompressed.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence

import zstandard

from ..errors import SnapshotCorrupted, SnapshotFormatError

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Skippable frame magics are 0x184D2A50-5F; 0x53 is ours (pzstd writes 0x50,
# the seekable format 0x5E). The tag inside says whose index it is.
INDEX_MAGIC = struct.pack("<I", 0x184D2A53)
INDEX_TAG = b"SGS2"
FRAME_BYTES = 256 << 10  # of the document per frame: ~70 frames for a 2B snapshot, so 16 threads stay busy
MAX_FRAMES = 1024
# The cores this process may run on (a container's or taskset's, not the host's), at most 16.
DEFAULT_THREADS = min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
_HEAD = struct.Struct("<4sI4sI")  # skippable magic, its payload size, tag, frame count
_ENTRY = struct.Struct("<III")  # compressed size, content size, content checksum (the frame's last 4 bytes)
_U32 = struct.Struct("<I")
_FRAME_OVERHEAD = 32  # a frame header (at most 18 bytes) and its checksum (4), rounded up


def max_container_bytes(content_limit: int) -> int:
    """Bytes of the largest container of at most `content_limit` bytes of
    document, in either version: zstd's worst case on incompressible input
    (a few bytes per 128 KiB block), the index and every frame's header."""
    index = _HEAD.size + MAX_FRAMES * _ENTRY.size + _U32.size
    return content_limit + (content_limit >> 8) + 4096 + index + MAX_FRAMES * _FRAME_OVERHEAD


# -- writing (version 2) ---------------------------------------------------------------
def pack(pieces: Sequence[bytes | memoryview], level: int, threads: int | None = None) -> bytes:
    """The document given as `pieces` (their concatenation) as a version-2
    container: frames of FRAME_BYTES each (larger ones where MAX_FRAMES of
    them would not hold it), compressed at zstd `level` with content size
    and checksum, on up to `threads` threads (None: one per core, at most
    16). The bytes do not depend on `threads`: each frame is compressed on
    its own with the same parameters."""
    threads = _threads(threads)
    data = memoryview(b"".join(pieces))  # frames need contiguous input; one copy of the document
    step = max(FRAME_BYTES, -(-len(data) // MAX_FRAMES))  # larger frames past MAX_FRAMES of them
    chunks = [data[i:i + step] for i in range(0, len(data), step)]
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    frames = None
    if threads > 1 and len(chunks) > 1:
        try:
            collection = compressor.multi_compress_to_buffer(chunks, threads=min(threads, len(chunks)))
            frames = [collection[i] for i in range(len(collection))]
        except NotImplementedError:  # zstandard's cffi backend has no threads: one at a time
            pass
    if frames is None:
        frames = [compressor.compress(c) for c in chunks]
    entries = b"".join(_ENTRY.pack(len(f), len(c), _U32.unpack(memoryview(f)[-4:])[0])
                       for f, c in zip(frames, chunks))
    body = INDEX_TAG + struct.pack("<I", len(frames)) + entries
    head = INDEX_MAGIC + struct.pack("<I", len(body) + _U32.size)
    return b"".join([head, body, _U32.pack(zlib.crc32(body)), *frames])


def _threads(threads: int | None) -> int:
    if threads is None:
        return DEFAULT_THREADS
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
    return threads


# -- reading (versions 1 and 2) ------------------------------------------------------------
def unpack(blob: bytes | bytearray | memoryview, limit: int, threads: int | None = None) -> tuple[int, bytes]:
    """(container version, document bytes) of an untrusted snapshot whose
    document can be at most `limit` bytes. Raises SnapshotFormatError (not a
    snapshot container, sizes beyond `limit`, malformed index) or
    SnapshotCorrupted (truncated, trailing bytes, checksum mismatch)."""
    threads = _threads(threads)
    data = memoryview(blob)
    if not (data.ndim == 1 and data.format == "B" and data.c_contiguous):
        data = memoryview(data.tobytes())
    if data[:4] == ZSTD_MAGIC:
        return 1, _unpack_v1(data, limit)
    if data[:4] == INDEX_MAGIC:
        return 2, _unpack_v2(data, limit, threads)
    raise SnapshotFormatError("not a streamgemma snapshot: it does not start with a zstd frame or a "
                              f"streamgemma frame index (first bytes {data[:8].hex() or 'none: it is empty'})")


def _unpack_v1(data: memoryview, limit: int) -> bytes:
    frame = _frame_parameters(data, "the snapshot's zstd frame")
    if frame.content_size > limit:
        raise SnapshotFormatError(f"the snapshot declares {frame.content_size} bytes of content, more than "
                                  f"the {limit} bytes any snapshot of this model can have: it is not a "
                                  "snapshot of this model, or it is damaged")
    try:
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=limit, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise SnapshotCorrupted(f"the snapshot is truncated or damaged: zstd could not decompress it "
                                f"or its checksum does not match ({e})") from None


def _frame_parameters(frame: memoryview, where: str) -> zstandard.FrameParameters:
    """The header of one zstd frame that must have a content size and checksum."""
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as e:
        raise SnapshotCorrupted(f"{where}'s header is truncated or damaged ({e})") from None
    if not params.has_checksum:
        raise SnapshotFormatError(f"{where} has no content checksum; streamgemma always writes one, "
                                  "so this was not written by streamgemma or its header is damaged")
    if params.content_size == zstandard.CONTENTSIZE_UNKNOWN:
        raise SnapshotFormatError(f"{where} does not declare its content size; streamgemma always "
                                  "does, so this was not written by streamgemma or its header is damaged")
    return params


def _frame_length(frame: memoryview, where: str) -> int:
    """Bytes of the zstd frame at the start of `frame` (with a checksum): its
    header, then blocks of a 3-byte header each (bit 0: the last; bits 1-2: raw,
    RLE (one byte of content) or compressed; then the size), then the checksum."""
    at = zstandard.frame_header_size(frame)
    while True:
        if at + 3 > len(frame):
            raise SnapshotCorrupted(f"{where} is truncated: the snapshot is damaged")
        head = int.from_bytes(frame[at:at + 3], "little")
        if (head >> 1) & 3 == 3:
            raise SnapshotCorrupted(f"{where} holds a block of the reserved type: the snapshot is damaged")
        at += 3 + (1 if (head >> 1) & 3 == 1 else head >> 3)
        if head & 1:
            return at + 4


def _unpack_v2(data: memoryview, limit: int, threads: int) -> bytes:
    frames, sizes = _read_index(data, limit)
    for i, (frame, size) in enumerate(zip(frames, sizes)):
        where = f"frame {i} of the snapshot"
        if frame[:4] != ZSTD_MAGIC:
            raise SnapshotCorrupted(f"{where} does not start with a zstd frame: the snapshot is damaged")
        declared = _frame_parameters(frame, where).content_size
        if declared != size:
            raise SnapshotCorrupted(f"{where} declares {declared} bytes of content, its index {size}: "
                                    "the snapshot is damaged")
        if _frame_length(frame, where) != len(frame):  # (zstd would ignore bytes after the frame)
            raise SnapshotCorrupted(f"{where} does not fill its slot in the index: the snapshot is damaged")
    try:
        return b"".join(_decompress(frames, sizes, threads))
    except zstandard.ZstdError as e:
        raise SnapshotCorrupted(f"the snapshot is damaged: zstd could not decompress it or a checksum "
                                f"does not match ({e})") from None


def _decompress(frames: list[memoryview], sizes: list[int], threads: int) -> list:
    """Each frame's content (ZstdError if one fails to decode or to match its checksum)."""
    decompressor = zstandard.ZstdDecompressor()
    if threads > 1 and len(frames) > 1:
        try:
            out = decompressor.multi_decompress_to_buffer(
                frames, decompressed_sizes=struct.pack(f"={len(sizes)}Q", *sizes), threads=min(threads, len(frames)))
            return [out[i] for i in range(len(out))]
        except NotImplementedError:  # zstandard's cffi backend has no threads: one at a time
            pass
    return [decompressor.decompress(f, max_output_size=size) for f, size in zip(frames, sizes)]


def _read_index(data: memoryview, limit: int) -> tuple[list[memoryview], list[int]]:
    """The frames (views of `data`) and their content sizes, from the index,
    after checking it against itself, `limit` and the length of `data`."""
    if len(data) < _HEAD.size:
        raise SnapshotCorrupted(f"the snapshot is truncated: {len(data)} bytes, shorter than its index header")
    _, payload, tag, count = _HEAD.unpack(data[:_HEAD.size])
    if tag != INDEX_TAG:
        raise SnapshotFormatError(f"not a streamgemma snapshot: its first skippable frame is not a "
                                  f"streamgemma frame index (tag {bytes(tag)!r})")
    if not 1 <= count <= MAX_FRAMES or payload != 8 + count * _ENTRY.size + _U32.size:
        raise SnapshotFormatError(f"the snapshot's frame index is malformed ({count} frames in a "
                                  f"{payload}-byte index; at most {MAX_FRAMES} frames)")
    end = 8 + payload
    if len(data) < end:
        raise SnapshotCorrupted(f"the snapshot is truncated: {len(data)} bytes, shorter than its "
                                f"{end}-byte frame index")
    body = data[8:end - _U32.size]
    if zlib.crc32(body) != _U32.unpack(data[end - _U32.size:end])[0]:
        raise SnapshotCorrupted("the snapshot's frame index does not match its checksum: it is damaged")
    entries = list(_ENTRY.iter_unpack(body[8:]))
    sizes = [content for _, content, _ in entries]
    if sum(sizes) > limit or min(sizes) < 1:
        raise SnapshotFormatError(f"the snapshot's index declares {sum(sizes)} bytes of content, more than "
                                  f"the {limit} bytes any snapshot of this model can have (or an empty "
                                  "frame): it is not a snapshot of this model, or it is damaged")
    total = end + sum(size for size, _, _ in entries)
    if len(data) != total:
        state = "truncated" if len(data) < total else "followed by trailing bytes"
        raise SnapshotCorrupted(f"the snapshot is {state}: {len(data)} bytes where its index "
                                f"accounts for {total}")
    frames, at = [], end
    for size, _, checksum in entries:
        frame = data[at:at + size]
        at += size
        if size < 4 or _U32.unpack(frame[-4:])[0] != checksum:  # also binds the frames' order
            raise SnapshotCorrupted(f"frame {len(frames)} of the snapshot does not end with the checksum "
                                    "its index gives: the snapshot is damaged or its frames are reordered")
        frames.append(frame)
    return frames, sizes
