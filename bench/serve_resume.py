"""Resuming suspended sessions through the server: fill a snapshot store with
many idle sessions, start the server on it with every engine slot taken, and
time how long a client waits for a stored session to take input again.

    python bench/serve_resume.py                                  # tiny random model, CPU, 200 sessions
    python bench/serve_resume.py --preset 2b --device cuda        # 2B shapes, 10,000 sessions

1. Fill: --sessions sessions, each a distinct short context: a shared prompt
   of --prompt tokens, then --distinct tokens of its own. The prompt is fed
   once and forked; the distinct tokens go through batched decode calls (a
   `Generation` per session, fed chosen ids: what `Session.step` does, a
   wave of --wave sessions per call), and the sessions are snapshotted to a
   DirectorySnapshotStore from --threads threads (compression and file writes
   release the GIL), at the zstd level the engine writes suspended sessions
   with (--level). Reported: count, bytes, seconds.
2. Serve: an engine on that store with --max-active slots, all of them held
   by other idle sessions with the same kind of context (opened and fed by
   clients that then disconnect), so every resume restores into a slot
   and suspends the least recently used session to make room (its state
   copied to host memory; its snapshot written by the engine's background
   writer).
3. Measure, for --resumes random stored ids, one at a time on a fresh
   connection (connecting is not timed): `open` with the id until `opened`
   (reads and validates the stored snapshot), then `append` of one token
   until `appended` (the restore happens here: the input needs the
   session's state in a slot; the token is then consumed as a decode row,
   or by a prefill if the engine's idle_step_input_tokens is 0). Reported:
   p50/p99/max of open, append and both together, and the engine's calls
   during the measurement (which path the appends took).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import secrets
import shutil
import tempfile
import time

import anyio
from websockets.asyncio.client import connect

from serve_load import build_model, percentiles, prompt_of, report, request
from streamgemma.serve.engine import SUSPEND_COMPRESSION_LEVEL  # noqa: E402 - after serve_load, as the others


def fill_store(model, store, sessions: int, prompt: int, distinct: int, wave: int, threads: int,
               level: int) -> list[str]:
    """Store `sessions` distinct idle sessions (zstd `level`); returns their ids."""
    import streamgemma as sg
    from streamgemma.session import snapshot as snapshot_format

    base = model.session(seed=0)
    base.feed(prompt_of(0, prompt))
    vocab = min(model.config.vocab_size, 250) - 10
    params = sg.SamplingParams(max_tokens=distinct, temperature=0.0, stop_token_ids=())
    ids: list[str] = []

    def store_one(item: tuple[str, "sg.Session"]) -> None:
        sid, session = item
        store.put(sid, snapshot_format.encode_contents(session._capture(), level))

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for start in range(0, sessions, wave):
            batch = [base.fork() for _ in range(min(wave, sessions - start))]
            generations = [s.start_generation(params) for s in batch]
            for step in range(distinct):
                # Session n's own tokens spell n in base `vocab`: every context differs.
                chosen = [10 + ((start + n) // vocab ** step) % vocab for n in range(len(batch))]
                with model.lock:
                    logits = model.decode([s.slot for s in batch], chosen)
                    rows = [logits[n].clone() for n in range(len(batch))]
                for g, token, row in zip(generations, chosen, rows):
                    g.accept(token, row)
            named = [(secrets.token_urlsafe(16), s) for s in batch]
            list(pool.map(store_one, named))
            for sid, s in named:
                ids.append(sid)
                s.close()
    base.close()
    return ids


async def hold_slots(url: str, count: int, prompt: int, per_connection: int) -> None:
    """Open `count` sessions with short contexts through clients that then
    disconnect: the sessions stay live in their slots, idle."""
    async def one_connection(first: int, n: int) -> None:
        async with connect(url) as ws:
            async def ask(msg: dict, want: str) -> dict:
                return await request(ws, msg, want)

            for k in range(first, first + n):
                sid = (await ask({"type": "open"}, "opened"))["session"]
                await ask({"type": "append", "session": sid, "tokens": prompt_of(k, prompt)}, "appended")

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="random weights with this preset's shapes: tiny, 2b, ...")
    parser.add_argument("--model", help="a checkpoint instead of --preset")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--sessions", type=int, help="sessions to store (default: 10,000 on CUDA, 200 on the CPU)")
    parser.add_argument("--prompt", type=int, default=64, help="shared prompt tokens of each stored session")
    parser.add_argument("--distinct", type=int, default=4, help="tokens of its own after the prompt")
    parser.add_argument("--max-active", type=int,
                        help="engine slots, all held during the test (default: 256 on CUDA, 32 on the CPU)")
    parser.add_argument("--resumes", type=int, default=100, help="stored sessions to resume, timed")
    parser.add_argument("--wave", type=int, default=256, help="sessions built per batched decode call")
    parser.add_argument("--threads", type=int, default=8, help="threads that snapshot and write")
    parser.add_argument("--store", help="store directory (default: a temporary one, removed afterwards)")
    parser.add_argument("--level", type=int, default=SUSPEND_COMPRESSION_LEVEL,
                        help="zstd level of the stored sessions and of the engine's writes "
                             f"(default: the engine's, {SUSPEND_COMPRESSION_LEVEL})")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()

    import streamgemma as sg

    model = build_model(args)
    cuda = model.device.type == "cuda"
    sessions = args.sessions or (10_000 if cuda else 200)
    max_active = args.max_active or (256 if cuda else 32)
    directory = args.store or tempfile.mkdtemp(prefix="serve-resume-")
    try:
        store = sg.DirectorySnapshotStore(directory)
        model.fingerprint  # computed once, outside the timed fill
        start = time.perf_counter()
        ids = fill_store(model, store, sessions, args.prompt, args.distinct, args.wave, args.threads, args.level)
        fill_s = time.perf_counter() - start
        sizes = [os.path.getsize(store.path(sid)) for sid in ids]

        engine = sg.Engine(model, max_active=max_active, store=store, compression_level=args.level)
        server = sg.Server(engine, port=0)
        picked = random.Random(0).sample(ids, min(args.resumes, len(ids)))
        warm = [i for i in ids if i not in set(picked)][:3]
        with sg.server.serve_in_thread(server) as url:
            start = time.perf_counter()
            anyio.run(hold_slots, url, max_active, args.prompt + args.distinct,
                      server.limits.sessions_per_connection, backend="asyncio")
            hold_s = time.perf_counter() - start
            held = engine.active
            position = args.prompt + args.distinct
            anyio.run(time_resumes, url, warm, position, backend="asyncio")  # first restores compile/allocate
            counters = ("resumptions", "suspensions", "prefill_calls", "decode_calls", "decoded_input_tokens")
            before = {name: getattr(engine, name) for name in counters}
            timings = anyio.run(time_resumes, url, picked, position, backend="asyncio")
            during = {name: getattr(engine, name) - before[name] for name in counters}
            unwritten = engine.unwritten
    finally:
        if not args.store:
            shutil.rmtree(directory, ignore_errors=True)

    result = {
        "model": model.source, "preset": None if args.model else args.preset, "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "store": {"sessions": len(ids), "bytes": sum(sizes), "bytes_per_session": round(sum(sizes) / len(ids)),
                  "context_tokens": args.prompt + args.distinct},
        "fill_s": round(fill_s, 2), "fill_sessions_per_s": round(len(ids) / fill_s, 1),
        "slots_held": held, "max_active": max_active, "hold_s": round(hold_s, 2),
        "resumes": len(timings), "restores": during["resumptions"], "suspensions": during["suspensions"],
        "prefill_calls": during["prefill_calls"], "decode_calls": during["decode_calls"],
        "decoded_input_tokens": during["decoded_input_tokens"], "unwritten_at_end": unwritten,
        "idle_step_input_tokens": engine.idle_step_input_tokens, "compression_level": engine.compression_level,
        "open_ms": percentiles([t[0] for t in timings]),
        "append_ms": percentiles([t[1] for t in timings]),
        "resume_ms": percentiles([t[0] + t[1] for t in timings]),
        "host_cpus": os.cpu_count(),
    }
    report(result, args.json)


if __name__ == "__main__":
    main()
