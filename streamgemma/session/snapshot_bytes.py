"""The bulk byte work of snapshots (`snapshot` is the format): a session's
state between a device and host memory in one copy each way, and the msgpack
document in pieces, so the compressor reads the tensors' bytes where they are.

A full-window 2B state is ~17 MB in 52 tensors: one transfer of all of them
costs about what one of them did as 52 separate synchronising copies
(bench/NOTES.md, "Snapshots")."""

from __future__ import annotations

import math
import struct

import msgpack
import numpy as np
import torch


def gather_to_host(groups: list[list[torch.Tensor]]) -> tuple[torch.Tensor, list[int]]:
    """(arena, offsets): the bytes of every group's tensors (each group's parts
    concatenated along dim 0, groups one after another) in one host buffer,
    group i at arena[offsets[i]:]. On a GPU the parts are joined on the device
    and copied ONCE into pinned memory; on the CPU through numpy views."""
    flat = [p.reshape(-1).view(torch.uint8) for group in groups for p in group]
    if flat[0].device.type == "cpu":
        arena = torch.from_numpy(np.concatenate([p.numpy() for p in flat]))
    else:
        joined = torch.cat(flat)
        arena = torch.empty(joined.numel(), dtype=torch.uint8, pin_memory=True)
        arena.copy_(joined, non_blocking=True)
        torch.cuda.current_stream(joined.device).synchronize()
    offsets, at = [], 0
    for group in groups:
        offsets.append(at)
        at += sum(p.numel() * p.element_size() for p in group)
    return arena, offsets


def read_only(arena: torch.Tensor, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> memoryview:
    """The bytes of a `shape` x `dtype` tensor at `offset` in `arena`, as a read-only memoryview."""
    size = math.prod(shape) * dtype.itemsize
    return memoryview(arena.numpy()[offset:offset + size]).toreadonly()


def to_device(buffers: list[bytes | memoryview], device: torch.device, arena: torch.Tensor | None = None,
              offsets: list[int | None] | None = None) -> list[torch.Tensor]:
    """Each buffer as a uint8 tensor on `device`, from ONE host-to-device copy:
    of `arena` (buffer i at offsets[i], as `gather_to_host` made it), or of the
    buffers gathered into a pinned staging buffer. Each result starts at an
    offset aligned for any dtype view (16 bytes) or is a copy of its own."""
    if arena is None:
        offsets, total = [], 0
        for b in buffers:
            offsets.append(total)
            total += -(-len(b) // 16) * 16
        arena = torch.empty(total, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        raw = arena.numpy()
        for b, o in zip(buffers, offsets):
            raw[o:o + len(b)] = np.frombuffer(b, dtype=np.uint8)
    staged = arena.to(device, non_blocking=True)
    out = []
    for b, o in zip(buffers, offsets):
        piece = staged[o:o + len(b)]
        out.append(piece if o % 16 == 0 else piece.clone())  # a view as another dtype needs alignment
    return out


def cpu_destination_and_source(dst: torch.Tensor, data: bytes | memoryview, dtype: torch.dtype,
                               shape: tuple[int, ...]):
    """(destination, source) that slice-assign into each other on the CPU: numpy
    byte views for a destination of `dtype` (a plain memory copy, no torch
    kernel), else the destination tensor and the data as a tensor cast to it."""
    if dst.dtype == dtype:
        view = byte_view(dst)
        return view, np.frombuffer(data, dtype=np.uint8).reshape(*shape[:-1], view.shape[-1])
    return dst, host_tensor(data, dtype, shape).to(dtype=dst.dtype)


def host_tensor(data: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A CPU tensor holding a copy of `data` (torch.frombuffer would alias
    read-only bytes, which torch warns about)."""
    out = torch.empty(shape, dtype=dtype)
    if out.numel():
        np.copyto(byte_view(out).reshape(-1), np.frombuffer(data, dtype=np.uint8))
    return out


def byte_view(t: torch.Tensor) -> np.ndarray:
    """A numpy uint8 view of a CPU tensor with a contiguous last dim: same
    shape, the last dim in bytes. Writable: it aliases the tensor."""
    return t.view(torch.uint8).numpy()


def msgpack_pieces(document: dict) -> list[bytes | memoryview]:
    """msgpack.packb(document) in pieces whose concatenation is exactly it, with
    the data of every tensor (document["layers"][i][name]["data"]) as the
    caller's own buffer: no packed copy of the whole state is built."""
    packer = msgpack.Packer(autoreset=True)
    out: list[bytes | memoryview] = [packer.pack_map_header(len(document))]
    for key, value in document.items():
        out.append(packer.pack(key))
        if key != "layers":
            out.append(packer.pack(value))
            continue
        out.append(packer.pack_array_header(len(value)))
        for layer in value:
            out.append(packer.pack_map_header(len(layer)))
            for name, field in layer.items():
                out.append(packer.pack(name))
                if not isinstance(field, dict):
                    out.append(packer.pack(field))
                    continue
                out.append(packer.pack_map_header(len(field)))
                for k, v in field.items():
                    out.append(packer.pack(k))
                    out += [bin_header(len(v)), v] if k == "data" else [packer.pack(v)]
    return out


def bin_header(size: int) -> bytes:
    """The msgpack header of a bin of `size` bytes (bin 8, 16 or 32), as packb writes it."""
    if size < 1 << 8:
        return struct.pack(">BB", 0xC4, size)
    if size < 1 << 16:
        return struct.pack(">BH", 0xC5, size)
    return struct.pack(">BI", 0xC6, size)
