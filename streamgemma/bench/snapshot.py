"""Snapshots: size, `Session.snapshot` ms and `Model.restore` ms of one session
past a full attention window.

The session consumes --position random ids (default: the window + 123, so
the ring has wrapped), then is snapshotted (device -> bytes) and restored
(bytes -> validated -> device, into a new session) --repeats times each,
after one warm-up; a restored session's own snapshot must equal the
original's byte for byte. The state holds the real activations of random
weights; the snapshot also carries the float32 next-token logits.

    streamgemma bench snapshot                                # 2B shapes, cuda if available
    streamgemma bench snapshot --device cpu --json snapshot.json
    streamgemma bench snapshot --preset tiny --device cpu --repeats 3
    streamgemma bench snapshot --level=-1 --threads 4             # the engine's level; 4 zstd threads
    streamgemma bench snapshot --parts                            # + capture, encode, decompress, ... apart
"""

from __future__ import annotations

import argparse
import statistics
import struct
import time

from .args import positive_int
from .common import build_model, describe, sync, token_ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--position", type=int, default=None,
                        help="tokens the session has consumed (default: the attention window + 123)")
    parser.add_argument("--repeats", type=positive_int, default=20, help="timed snapshots and restores (default 20)")
    parser.add_argument("--level", type=int, default=None,
                        help="zstd level of Session.snapshot (default: the library's, 1; the engine suspends at -1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of Session.snapshot and Model.restore (default: the library's, one per "
                             "core up to 16; trees before format v2 have no such argument)")
    parser.add_argument("--parts", action="store_true",
                        help="also time the parts: capture, encode, the container's decompression, msgpack and "
                             "validation, load into a slot (library internals of format v2 trees)")


def timed_ms(fn, repeats: int, model, after=None) -> tuple[list[float], object]:
    """Wall times in ms of `repeats` calls after one warm-up, and the last
    result; `after(result)` runs outside the timing for all but the last."""
    times, result = [], fn()
    for _ in range(repeats):
        if after is not None:
            after(result)
        sync(model)
        start = time.perf_counter()
        result = fn()
        sync(model)
        times.append((time.perf_counter() - start) * 1e3)
    return times, result


def time_parts(model, session, blob: bytes, args: argparse.Namespace) -> dict:
    """Median ms of each part of a snapshot and a restore, through the layer
    under Session.snapshot / Model.restore."""
    from streamgemma.session import snapshot as snapshot_format
    from streamgemma.session import snapshot_frames

    config, fingerprint, threads = model.config, model.fingerprint, args.threads
    level = snapshot_format.COMPRESSION_LEVEL if args.level is None else args.level
    contents = session.capture()
    decoded = snapshot_format.decode(blob, config, fingerprint, threads)
    target = model.session()
    limit = snapshot_format.max_snapshot_bytes(config)
    parts = {
        "capture": lambda: session.capture(),
        "encode": lambda: snapshot_format.encode_contents(contents, level, threads),
        "decompress": lambda: snapshot_frames.unpack(blob, limit, threads),
        "decode": lambda: snapshot_format.decode(blob, config, fingerprint, threads),
        "load": lambda: snapshot_format.load_into(model.pool, target.slot, decoded),
        "restore_of_a_capture": lambda: model.restore(contents),
    }
    out = {}
    for name, fn in parts.items():
        after = (lambda r: r.close()) if name == "restore_of_a_capture" else None
        times, result = timed_ms(fn, args.repeats, model, after=after)
        if after is not None:
            after(result)
        out[name] = statistics.median(times)
    target.close()
    out["msgpack_and_validation"] = out["decode"] - out["decompress"]
    return out


def container(blob: bytes) -> str:
    """The snapshot's container, from its first bytes (docs/snapshot-format.md, section 1)."""
    if blob[:4] == struct.pack("<I", 0x184D2A53):
        return f"format v2, {struct.unpack_from('<I', blob, 12)[0]} frames"
    return "format v1, one frame"


def summary(times: list[float]) -> dict:
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def run(args: argparse.Namespace) -> dict:
    model = build_model(args)
    print(model)
    position = model.config.attention_window + 123 if args.position is None else args.position
    session = model.session(seed=0)
    session.feed(token_ids(position, model.config.vocab_size))
    model.fingerprint  # noqa: B018 - computed once (a digest of the weights), outside the timings

    # `level` and `threads` only when asked: older trees' Session.snapshot has no such arguments
    options = {k: v for k, v in (("level", args.level), ("threads", args.threads)) if v is not None}
    restore_options = {"threads": args.threads} if args.threads is not None else {}

    def snapshot(s):
        return s.snapshot(**options)

    snap_times, blob = timed_ms(lambda: snapshot(session), args.repeats, model)
    # Each restored session is closed before the next restore: its slot is
    # reused, so the pool does not grow inside the timing.
    restore_times, restored = timed_ms(lambda: model.restore(blob, **restore_options), args.repeats, model,
                                       after=lambda r: r.close())
    if snapshot(restored) != blob:
        raise RuntimeError("a restored session's snapshot differs from the original's")
    raw = session.state_bytes()
    restored.close()
    parts = time_parts(model, session, blob, args) if args.parts else None
    session.close()

    out = {"model": describe(model), "position": position, "window": model.config.attention_window,
           "repeats": args.repeats, "level": args.level, "threads": args.threads, "format": container(blob),
           "state_MB": raw / 1e6, "snapshot_MB": len(blob) / 1e6,
           "snapshot_ms": summary(snap_times), "restore_ms": summary(restore_times)}
    print(f"position {position} (window {model.config.attention_window}), {args.repeats} repeats")
    print(f"state {raw / 1e6:.2f} MB (Session.state_bytes), "
          f"snapshot {len(blob) / 1e6:.2f} MB ({len(blob) / raw:.2f} x), {out['format']}")
    for name, times in (("snapshot", snap_times), ("restore", restore_times)):
        s = summary(times)
        print(f"{name:<9} median {s['median']:8.2f} ms   min {s['min']:8.2f}   max {s['max']:8.2f}")
    if parts is not None:
        out["parts_ms"] = parts
        print("parts (median ms): " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    return out
