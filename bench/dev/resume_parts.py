"""Where the time of a suspension and of a restore goes, part by part, for
one session of a real model shape (default RecurrentGemma-2B, bfloat16
state, random values; no weights needed).

    python bench/dev/resume_parts.py                         # CPU
    python bench/dev/resume_parts.py --device cuda           # state on the GPU
    python bench/dev/resume_parts.py --store /mnt/disk/dir   # where the files go

Suspension, as the engine does it: `capture` (the slot's state and host
state copied to host memory: what the engine waits for), then in its writer
thread `encode_contents` (msgpack, zstd) and `DirectorySnapshotStore.put`
(temp file, fsync, rename, directory fsync). Restore: `store.get`, `decode`
(zstd decompress, msgpack unpack, validation), `load_into` (into a slot);
from a capture still held in memory only `load_into`. Each at two
positions: --position (default 68: `streamgemma bench resume`'s sessions) and a
full attention window, and at zstd level 1 (the format's default) and the
engine's suspension level.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import msgpack
import torch
import zstandard

import streamgemma as sg
from streamgemma.config import ATTENTION
from streamgemma.model.pool import StatePool
from streamgemma.serve.offload import SUSPEND_COMPRESSION_LEVEL
from streamgemma.session import snapshot as snapshot_format


def fill_random(pool: StatePool, slot: int, position: int, seed: int = 0) -> None:
    """Random state in `slot`, as a session at `position` would have: ring
    rows for positions not reached yet stay zero."""
    gen = torch.Generator().manual_seed(seed)
    for kind, layer in zip(pool.config.block_types, pool.layers):
        for t in layer:
            t[slot].copy_(torch.randn(t[slot].shape, generator=gen).to(t.dtype))
            if kind == ATTENTION:
                t[slot][position:] = 0
    pool.positions[slot] = position


def timed(fn, repeats: int, device: torch.device) -> tuple[float, object]:
    """Median wall time in ms of `repeats` calls (after one warm-up), and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="recurrentgemma-2b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(snapshot_format.DTYPES))
    parser.add_argument("--position", type=int, default=68)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--store", help="directory for the store (default: a temporary one)")
    args = parser.parse_args()
    directory = args.store or tempfile.mkdtemp(prefix="resume-parts-")
    try:
        measure(args, sg.DirectorySnapshotStore(directory))
    finally:
        if not args.store:
            shutil.rmtree(directory, ignore_errors=True)


def measure(args: argparse.Namespace, store: sg.DirectorySnapshotStore) -> None:
    torch.set_num_threads(1)
    config = sg.GriffinConfig.preset(args.preset)
    device = torch.device(args.device)
    pool = StatePool(config, snapshot_format.DTYPES[args.dtype], device, capacity=2)
    src, dst = pool.allocate(), pool.allocate()
    fingerprint = "bench-" + args.preset
    logits = torch.randn(config.vocab_size, generator=torch.Generator().manual_seed(0), device="cpu").to(device)
    limit = snapshot_format.max_snapshot_bytes(config)
    print(f"{args.preset}, {args.dtype} state on {device}, store {store.directory}, median of {args.repeats}")

    for position in (args.position, config.attention_window + 123):
        fill_random(pool, src, position)
        rows = []

        def capture():
            # What Session._extra_state does with the logits, then the pool slot.
            extra = {"rng": torch.Generator().get_state().numpy().tobytes(), "detok_pending": b"",
                     "recent_ids": list(range(min(position, 1024))),
                     "logits": logits.float().cpu().numpy().tobytes(), "stopped": None}
            return snapshot_format.capture(pool, src, fingerprint=fingerprint, extra=extra, seed=0)

        ms, contents = timed(capture, args.repeats, device)
        state = sum(len(r.data) for layer in contents.layers for r in layer)
        rows.append((f"suspend: capture ({state / 1e6:.2f} MB state, {4 * config.vocab_size / 1e6:.2f} MB logits)",
                     ms))
        blobs = {}
        for level in (snapshot_format.COMPRESSION_LEVEL, SUSPEND_COMPRESSION_LEVEL):
            ms, blobs[level] = timed(lambda: snapshot_format.encode_contents(contents, level), args.repeats, device)
            rows.append((f"writer: encode at level {level} (-> {len(blobs[level]) / 1e6:.2f} MB)", ms))
        packed = zstandard.ZstdDecompressor().decompress(blobs[SUSPEND_COMPRESSION_LEVEL])
        document = msgpack.unpackb(packed)
        rows.append((f"writer:   of which msgpack pack ({len(packed) / 1e6:.2f} MB)",
                     timed(lambda: msgpack.packb(document), args.repeats, device)[0]))
        for level, blob in blobs.items():
            rows.append((f"writer: store.put at level {level} (write, fsync, rename)",
                         timed(lambda: store.put("bench", blob), args.repeats, device)[0]))
        for level, blob in blobs.items():
            store.put("bench", blob)
            rows.append((f"restore: store.get at level {level}",
                         timed(lambda: store.get("bench"), args.repeats, device)[0]))
            decode_ms = timed(lambda: snapshot_format.decode(blob, config, fingerprint), args.repeats, device)[0]
            rows.append((f"restore: decode at level {level}", decode_ms))
            unzstd_ms = timed(lambda: zstandard.ZstdDecompressor().decompress(blob), args.repeats, device)[0]
            rows.append(("restore:   of which zstd decompress", unzstd_ms))
        unpack_ms = timed(lambda: snapshot_format._unpack(packed, limit), args.repeats, device)[0]
        rows.append(("restore:   of which msgpack unpack", unpack_ms))
        unpacked = snapshot_format._unpack(packed, limit)
        rows.append(("restore:   of which validation",
                     timed(lambda: snapshot_format._validate(unpacked, config, fingerprint), args.repeats,
                           device)[0]))
        decoded = snapshot_format.decode(blob, config, fingerprint)
        rows.append(("restore: load_into the slot (decoded)",
                     timed(lambda: snapshot_format.load_into(pool, dst, decoded), args.repeats, device)[0]))
        rows.append(("restore: load_into the slot (a capture held in memory)",
                     timed(lambda: snapshot_format.load_into(pool, dst, contents), args.repeats, device)[0]))
        for a, b in zip((t for layer in pool.layers for t in layer), (t for layer in pool.layers for t in layer)):
            assert torch.equal(a[src], b[dst]), "restored state differs from the original"
        print(f"\nposition {position} (window {config.attention_window})")
        for name, ms in rows:
            print(f"  {name:<58} {ms:8.2f} ms")


if __name__ == "__main__":
    main()
