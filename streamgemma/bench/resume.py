"""Resume: how long a client waits for a suspended session to take input
again, with every engine slot taken.

1. Fill: --sessions stored sessions in a DirectorySnapshotStore, each a
   shared prompt of --prompt tokens (fed once, then forked) and --distinct
   tokens of its own (batched `model.decode` calls over --wave forks), so
   every context differs; snapshots (`Session.snapshot`) are written from
   --threads threads. (The distinct tokens go straight to the state: each
   stored session's next-token logits are those of the shared prompt. The
   resume below appends input, which replaces them.)
2. Serve: an engine on that store with --max-active slots, all held by
   other idle sessions of the same context length (opened and fed by
   clients that then disconnect), so every resume restores into a slot and
   suspends the least recently used session to make room.
3. Measure, for --resumes random stored ids, one at a time on a fresh
   connection (connecting is not timed): `open` with the id until `opened`
   (reads and validates the snapshot), then `append` of one token until
   `appended` (the restore happens here). Reported: p50/p99/max of open,
   append and both, and the engine's counters over the measurement where
   the served tree has them.

    streamgemma bench resume                          # cuda: 10,000 stored sessions, 256 slots
    streamgemma bench resume --sessions 1000 --json resume.json
    streamgemma bench resume --preset tiny --device cpu --sessions 40 --max-active 8 --resumes 10
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import secrets
import shutil
import tempfile
import time

import anyio
from websockets.asyncio.client import connect

from .clients import percentiles, prompt_of, request

COUNTERS = ("resumptions", "suspensions", "prefill_calls", "decode_calls", "decoded_input_tokens")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", type=int, help="sessions to store (default: 10,000 on cuda, 200 on the cpu)")
    parser.add_argument("--prompt", type=int, default=64, help="shared prompt tokens of each stored session")
    parser.add_argument("--distinct", type=int, default=4, help="tokens of its own after the prompt (default 4)")
    parser.add_argument("--max-active", type=int, help="engine slots, all held (default: 256 on cuda, 32 on the cpu)")
    parser.add_argument("--resumes", type=int, default=100, help="stored sessions resumed, timed (default 100)")
    parser.add_argument("--wave", type=int, default=256, help="sessions built per batched decode call")
    parser.add_argument("--threads", type=int, default=8, help="threads that snapshot and write (default 8)")
    parser.add_argument("--store", metavar="DIR", help="store directory (default: a temporary one, removed after)")


def fill_store(model, store, sessions: int, prompt: int, distinct: int, wave: int, threads: int) -> tuple[list, int]:
    """Store `sessions` distinct idle sessions; their ids and total bytes."""
    base = model.session(seed=0)
    base.feed(prompt_of(0, prompt))
    vocab = min(model.config.vocab_size, 250) - 10
    ids, sizes = [], []

    def store_one(item) -> int:
        sid, session = item
        blob = session.snapshot()
        store.put(sid, blob)
        return len(blob)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for start in range(0, sessions, wave):
            batch = [base.fork() for _ in range(min(wave, sessions - start))]
            for step in range(distinct):
                # Session n's own tokens spell n in base `vocab`: every context differs.
                model.decode([s.slot for s in batch],
                             [10 + ((start + n) // vocab ** step) % vocab for n in range(len(batch))])
            named = [(secrets.token_urlsafe(16), s) for s in batch]
            sizes += pool.map(store_one, named)
            for sid, s in named:
                ids.append(sid)
                s.close()
    base.close()
    return ids, sum(sizes)


async def hold_slots(url: str, count: int, prompt: int, per_connection: int) -> None:
    """Open `count` sessions through clients that then disconnect: the
    sessions stay live in their slots, idle."""
    async def one_connection(first: int, n: int) -> None:
        async with connect(url) as ws:
            for k in range(first, first + n):
                sid = (await request(ws, {"type": "open"}, "opened"))["session"]
                await request(ws, {"type": "append", "session": sid, "tokens": prompt_of(k, prompt)}, "appended")

    async with anyio.create_task_group() as tg:
        for first in range(0, count, per_connection):
            tg.start_soon(one_connection, first, min(per_connection, count - first))


async def time_resumes(url: str, ids: list[str], position: int) -> list[tuple[float, float]]:
    """(open seconds, append seconds) per id, one resume at a time."""
    out = []
    for sid in ids:
        async with connect(url) as ws:
            t0 = time.monotonic()
            await ws.send(json.dumps({"type": "open", "session": sid}))
            opened = json.loads(await ws.recv())
            t1 = time.monotonic()
            await ws.send(json.dumps({"type": "append", "tokens": [42]}))
            appended = json.loads(await ws.recv())
            t2 = time.monotonic()
            if opened.get("position") != position or appended.get("position") != position + 1:
                raise RuntimeError(f"resume of {sid}: {opened} then {appended}")
        out.append((t1 - t0, t2 - t1))
    return out


def run(args: argparse.Namespace) -> dict:
    import torch

    import streamgemma as sg

    from .common import build_model, describe
    from .serve import engine_counters, serving

    if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
        torch.set_num_threads(1)
    model = build_model(args)
    print(model)
    cuda = model.device.type == "cuda"
    sessions = args.sessions or (10_000 if cuda else 200)
    max_active = args.max_active or (256 if cuda else 32)
    position = args.prompt + args.distinct
    directory = args.store or tempfile.mkdtemp(prefix="streamgemma-bench-resume-")
    try:
        store = sg.DirectorySnapshotStore(directory)
        model.fingerprint  # noqa: B018 - computed once, outside the timed fill
        start = time.perf_counter()
        ids, stored_bytes = fill_store(model, store, sessions, args.prompt, args.distinct, args.wave, args.threads)
        fill_s = time.perf_counter() - start
        print(f"stored {len(ids)} sessions, {stored_bytes / 1e6:.1f} MB, in {fill_s:.1f} s", flush=True)

        engine = sg.Engine(model, max_active=max_active, store=store)
        server = sg.Server(engine, port=0)
        picked = random.Random(0).sample(ids, min(args.resumes, len(ids)))
        warm = [i for i in ids if i not in set(picked)][:3]
        with serving(server):
            start = time.perf_counter()
            anyio.run(hold_slots, server.url, max_active, position, server.limits.sessions_per_connection,
                      backend="asyncio")
            hold_s = time.perf_counter() - start
            held = getattr(engine, "active", None)
            anyio.run(time_resumes, server.url, warm, position, backend="asyncio")  # first restores allocate
            counters = engine_counters(engine)
            before = {name: getattr(counters, name) for name in COUNTERS if hasattr(counters, name)}
            timings = anyio.run(time_resumes, server.url, picked, position, backend="asyncio")
            during = {name: getattr(counters, name) - before[name] for name in before}
    finally:
        if not args.store:
            shutil.rmtree(directory, ignore_errors=True)

    out = {"model": describe(model),
           "store": {"sessions": len(ids), "bytes": stored_bytes, "bytes_per_session": round(stored_bytes / len(ids)),
                     "context_tokens": position},
           "fill_s": round(fill_s, 2), "fill_sessions_per_s": round(len(ids) / fill_s, 1),
           "max_active": max_active, "slots_held": held, "hold_s": round(hold_s, 2),
           "resumes": len(timings), "engine_counters": during,
           "open_ms": percentiles([t[0] for t in timings]),
           "append_ms": percentiles([t[1] for t in timings]),
           "resume_ms": percentiles([t[0] + t[1] for t in timings])}
    print(f"{len(timings)} resumes among {len(ids)} stored, {max_active} slots held: "
          f"open p50 {out['open_ms']['p50']} ms, append p50 {out['append_ms']['p50']} ms, "
          f"both p50 {out['resume_ms']['p50']} / p99 {out['resume_ms']['p99']} ms", flush=True)
    return out
