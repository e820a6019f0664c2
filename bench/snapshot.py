"""Snapshot size and speed for one full-window session of a real model shape.

Builds the state pool of a preset (default RecurrentGemma-2B) directly, with
random values in the state tensors (no weights are needed), then times
`snapshot` (device -> bytes) and `restore` (bytes -> validated -> device) of
one slot.

    python bench/snapshot.py                      # CPU, bfloat16
    python bench/snapshot.py --device cuda        # GPU -> bytes -> GPU

Random normal values compress like real activations only roughly (both have
redundant exponent bits); sizes on real conversations may differ a little.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import streamgemma as sg
from streamgemma.session import snapshot as snapshot_format
from streamgemma.config import ATTENTION
from streamgemma.sampling.philox import RandomStream
from streamgemma.model.pool import StatePool


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


def timed(fn, repeats: int, device: torch.device) -> tuple[list[float], object]:
    """Wall times in ms of `repeats` calls (after one warm-up), and the last result."""
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
    return times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="recurrentgemma-2b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(snapshot_format.DTYPES))
    parser.add_argument("--position", type=int, default=None,
                        help="tokens the session has consumed (default: window + 123, a wrapped ring)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    config = sg.GriffinConfig.preset(args.preset)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    dtype = snapshot_format.DTYPES[args.dtype]
    position = config.attention_window + 123 if args.position is None else args.position
    pool = StatePool(config, dtype, device, capacity=2)
    src, dst = pool.allocate(), pool.allocate()
    fill_random(pool, src, position)
    fingerprint = "bench-" + args.preset
    # Roughly what a sampling session carries: its random stream (20 bytes), recent ids
    # and its next-token logits (float32 [vocab], random so they do not compress).
    logits = torch.randn(config.vocab_size, generator=torch.Generator().manual_seed(0))
    extra = {"rng": RandomStream(0, 123).to_bytes(), "detok_pending": b"",
             "recent_ids": list(range(256)), "logits": logits.numpy().tobytes(), "stopped": None}

    def snapshot() -> bytes:
        return snapshot_format.encode(pool, src, fingerprint=fingerprint, extra=extra, seed=0,
                                      metadata={"user": "bench"})

    def restore() -> None:  # into an allocated slot: load_into writes all of it
        contents = snapshot_format.decode(blob, config, fingerprint)
        snapshot_format.load_into(pool, dst, contents)

    snap_times, blob = timed(snapshot, args.repeats, device)
    restore_times, _ = timed(restore, args.repeats, device)
    for a, b in zip((t for layer in pool.layers for t in layer), (t for layer in pool.layers for t in layer)):
        assert torch.equal(a[src], b[dst]), "restored state differs from the original"

    raw = pool.slot_bytes()
    print(f"{args.preset}, {args.dtype}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", position {position} (window {config.attention_window}), {args.repeats} repeats")
    print(f"raw state   {raw / 1e6:9.2f} MB  (one slot of the pool)")
    print(f"snapshot    {len(blob) / 1e6:9.2f} MB  ({len(blob) / raw:.2f} x raw, zstd level "
          f"{snapshot_format.COMPRESSION_LEVEL})")
    print()
    print(f"{'direction':<34} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
    for name, times in ((f"snapshot ({device.type} -> bytes)", snap_times),
                        (f"restore  (bytes -> {device.type})", restore_times)):
        print(f"{name:<34} {statistics.median(times):10.2f} {min(times):8.2f} {max(times):8.2f}")


if __name__ == "__main__":
    main()
