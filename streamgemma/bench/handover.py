"""handover: time to move a live session between two workers sharing a Redis store.

Two engines of one model in one process (two workers of a fleet on one
machine), each with its own RedisSnapshotStore (its own worker id and
leases). A session is filled to --tokens (2048: the full attention window)
and generates a few tokens on worker A; then, alternately, the other worker
opens it: the holder is asked to hand it over (cancel, snapshot to Redis,
release the lease), the new worker claims the lease and reads the snapshot.
Measured per hand-over: `opened` (the resume returns) and `first_token`
(the next token is out of the new worker: the restore into its slot
included). Redis is started from `redis-server` on PATH unless --redis.

`parts_ms`: where the time goes, the median over the rounds after the
first of the time spent in each call (some overlap: the new worker's claims
run while the old one stores the snapshot): the claims (`try_claim`: one
Redis call each, asking the holder once), the holder's `snapshot`
(`capture` of the state to host memory, `encode`, `put`: the upload to
Redis) and `release`, then the new worker's `get`, `decode`, `journal_read`
and `restore` into its slot. `timeline` lists the last round's calls
(start and end, ms after the resume began).

Issue #19's target (GPU, 2B, full window): first_token at most 150 ms.
Example (CPU, seconds): streamgemma bench handover --preset tiny --tokens 256 --rounds 4
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import anyio

import streamgemma as sg

from ..session import snapshot as snapshot_format
from ..session.session import Session
from .common import build_model, describe, token_ids
from .fleet import redis_at, remove_prefix


class Parts:
    """Times calls of the hand-over's parts (wrapped while the bench runs)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.calls: list[tuple[str, float, float]] = []

    def wrap(self, owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls.append((label, started - self.start, time.perf_counter() - self.start))
        setattr(owner, name, timed)

    @contextlib.contextmanager
    def watching(self, model: sg.Model, workers: list[sg.Engine]):
        wrapped = [(model, "restore", "restore"), (Session, "capture", "capture"),
                   (snapshot_format, "encode_contents", "encode"), (snapshot_format, "decode", "decode")]
        for w in workers:
            wrapped += [(w.store, name, name) for name in ("try_claim", "put", "get", "release")]
            wrapped += [(w.store.journal(), "read", "journal_read"), (w.store.journal(), "compact", "compact")]
        saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in wrapped]
        for owner, name, label in wrapped:
            self.wrap(owner, name, label)
        try:
            yield self
        finally:
            for owner, name, original in saved:
                if original is None:
                    delattr(owner, name)
                else:
                    setattr(owner, name, original)

    def round(self) -> list[tuple[str, float, float]]:
        """The calls since the last round, and a new start."""
        calls, self.calls, self.start = self.calls, [], time.perf_counter()
        return calls


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=2048, help="session length before the hand-overs "
                                                                  "(default 2048: a full window)")
    parser.add_argument("--rounds", type=int, default=10, help="hand-overs (default 10)")
    parser.add_argument("--redis", metavar="URL", help="a Redis to use (default: start redis-server from PATH)")


async def handovers(model: sg.Model, url: str, tokens: int, rounds: int) -> dict:
    prefix = f"handover-{time.time_ns()}"
    workers = [sg.Engine(model, max_active=2, store=sg.RedisSnapshotStore(url, prefix=prefix)) for _ in range(2)]
    params = sg.SamplingParams(max_tokens=1, stop_token_ids=())
    opened, first, sizes, rounds_parts = [], [], [], []
    parts = Parts()
    try:
        with parts.watching(model, workers):
            await _rounds(model, workers, tokens, rounds, params, opened, first, sizes, rounds_parts, parts)
    finally:
        for w in workers:
            w.store.close()
        remove_prefix(url, prefix)
    ms = lambda xs: {"median": round(1e3 * statistics.median(xs), 1), "max": round(1e3 * max(xs), 1),  # noqa: E731
                     "all": [round(1e3 * x, 1) for x in xs]}
    totals = collections.defaultdict(list)
    for calls in rounds_parts[1:] or rounds_parts:
        spent = collections.defaultdict(float)
        for label, a, b in calls:
            spent[label] += b - a
        for label, seconds in spent.items():
            totals[label].append(seconds)
    return {"opened_ms": ms(opened), "first_token_ms": ms(first), "snapshot_bytes": max(sizes),
            "parts_ms": {label: round(1e3 * statistics.median(xs), 1) for label, xs in totals.items()},
            "timeline": [[label, round(1e3 * a, 1), round(1e3 * b, 1)] for label, a, b in rounds_parts[-1]]}


async def _rounds(model, workers, tokens, rounds, params, opened, first, sizes, rounds_parts, parts) -> None:
    async with anyio.create_task_group() as tg:
        for w in workers:
            tg.start_soon(w.run)
        es = await workers[0].open(seed=0)
        await workers[0].consumed(workers[0].append(es, token_ids(tokens, model.config.vocab_size)))
        async for _ in await workers[0].generate(es, sg.SamplingParams(max_tokens=4, stop_token_ids=())):
            pass
        for r in range(rounds):
            dst = workers[(r + 1) % 2]
            parts.round()
            started = time.perf_counter()
            es = await dst.resume(es.id)
            opened.append(time.perf_counter() - started)
            async for _ in await dst.generate(es, params):
                pass
            first.append(time.perf_counter() - started)
            rounds_parts.append(parts.round())
            sizes.append(len(dst.store.get(es.id)))
        tg.cancel_scope.cancel()


def run(args: argparse.Namespace) -> dict:
    if args.rounds < 1 or args.tokens < 1:
        raise SystemExit("streamgemma bench handover: --rounds and --tokens must be >= 1")
    model = build_model(args)
    with tempfile.TemporaryDirectory(prefix="sg-handover-") as tmp, redis_at(args.redis, Path(tmp)) as url:
        out = anyio.run(handovers, model, url, args.tokens, args.rounds, backend="asyncio")
    out = {"model": describe(model), "tokens": args.tokens, "rounds": args.rounds, **out}
    print(f"hand-over of a {args.tokens}-token session ({out['snapshot_bytes'] / 1e6:.1f} MB snapshot): opened in "
          f"{out['opened_ms']['median']} ms (max {out['opened_ms']['max']}), next token after "
          f"{out['first_token_ms']['median']} ms (max {out['first_token_ms']['max']})")
    print("  parts (ms, median): " + ", ".join(f"{k} {v}" for k, v in out["parts_ms"].items()))
    return out
