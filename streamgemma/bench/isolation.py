"""Isolation: a canary session generates continuously while another client,
in turn, floods the server; how much of its token rate the canary keeps.

The server runs in this process (its own event loop in a thread, as `bench
serve`), the canary and each attacker in spawned processes (no torch there).
The canary's rate alone is measured first (--baseline seconds); then each
attack runs, and the canary's rate during it and in the --recovery seconds
after it is reported as a share of the baseline (target: >= 0.8 during).
The attacks, in turn:
- appends: one connection sends --appends one-token appends as fast as the
  server takes them, and waits for every reply;
- frames: one connection sends append frames of 1 MiB of text for
  --frames-seconds, then disconnects;
- queued: --queued-sessions sessions (16 per connection) each send the
  server's per-session maximum of queued input (--queued-tokens), hold it
  for --hold seconds, then disconnect;
- connections: --connections connections open a session each and hold them
  for --hold seconds;
- abandoned: --abandoned sessions each open, append a prompt and
  disconnect without closing.
Also reported per attack: this process's peak RSS (model, server, queues;
the clients are other processes), the store's size on disk, and what the
attacker was told (replies by type or error code, refused connections).

    streamgemma bench isolation                                    # demo model, CPU, full sizes (minutes)
    streamgemma bench isolation --session-ttl 5                    # abandoned sessions expire (if supported)
    streamgemma bench isolation --baseline 1 --recovery 0.5 --appends 300 --frames-seconds 1 \\
        --queued-sessions 2 --queued-tokens 20000 --connections 20 --abandoned 20 --hold 0.5   # seconds

Only the public API is used, so an older tree can be measured: copy this
file into its streamgemma/bench/ and run `python -m streamgemma.bench.isolation`.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
import traceback

import anyio
import websockets
from websockets.asyncio.client import connect

ATTACKS = ("appends", "frames", "queued", "connections", "abandoned")
FRAME_TEXT_BYTES = 1_000_000  # with the JSON around it, just under the 1 MiB frame limit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(model="demo", device="cpu")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help=f"which, in order (default {','.join(ATTACKS)})")
    parser.add_argument("--baseline", type=float, default=10.0, help="seconds of the canary alone (default 10)")
    parser.add_argument("--recovery", type=float, default=5.0, help="seconds measured after each attack (default 5)")
    parser.add_argument("--appends", type=int, default=50_000, help="one-token appends (default 50000)")
    parser.add_argument("--frames-seconds", type=float, default=30.0, help="seconds of 1 MiB frames (default 30)")
    parser.add_argument("--queued-sessions", type=int, default=32, help="sessions of the queued attack (default 32)")
    parser.add_argument("--queued-tokens", type=int, default=1 << 20,
                        help="input each of them queues: the server's per-session maximum (default 1048576)")
    parser.add_argument("--connections", type=int, default=500, help="connections held at once (default 500)")
    parser.add_argument("--abandoned", type=int, default=2000, help="sessions opened and abandoned (default 2000)")
    parser.add_argument("--hold", type=float, default=15.0,
                        help="seconds the queued and connections attacks hold on (default 15)")
    parser.add_argument("--phase-timeout", type=float, default=300.0,
                        help="an attack still running after this is stopped (default 300 s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    parser.add_argument("--max-active", type=int, default=64, help="engine slots (default 64)")
    parser.add_argument("--session-ttl", type=float,
                        help="the engine's session_ttl, where the measured tree has one (default: none)")
    parser.add_argument("--input-share", type=float,
                        help="the engine's input_share, where the measured tree has one (default: its default)")


# -- the clients (spawned processes: no torch) ---------------------------------------------
def _open_session(frame: dict | None = None) -> str:
    return json.dumps({"type": "open", **(frame or {})})


async def _canary(url: str, stop, ready) -> list[tuple[float, int]]:
    """Generate continuously until `stop` is set; (arrival time, tokens) per frame."""
    frames: list[tuple[float, int]] = []
    async with connect(url, max_size=None, ping_interval=None) as ws:
        await ws.send(_open_session({"seed": 0}))
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "append", "tokens": [2] + [(7 * k) % 4000 + 10 for k in range(32)]}))
        json.loads(await ws.recv())
        while not stop.is_set():
            await ws.send(json.dumps({"type": "generate", "max_tokens": 4096, "temperature": 1.0,
                                      "stop_token_ids": [], "coalesce": True}))
            cancelled = False
            while True:
                e = json.loads(await ws.recv())
                if e["type"] in ("token", "tokens"):
                    frames.append((time.monotonic(), 1 if e["type"] == "token" else len(e["ids"])))
                    if not ready.is_set():
                        ready.set()
                    if stop.is_set() and not cancelled:
                        cancelled = True
                        await ws.send(json.dumps({"type": "cancel"}))
                elif e["type"] == "done":
                    break
                elif e["type"] == "error" and e.get("code") != "not_generating":
                    raise RuntimeError(f"canary: {e}")
    return frames


# Attackers do not ping: a client that sends faster than the server reads it
# has its own pings queued behind its frames, and would give up on the server.


class _Replies:
    """Counts the replies a connection gets, by type (errors by code)."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.total = 0

    async def read(self, ws, until: int | None = None) -> None:
        try:
            async for frame in ws:
                e = json.loads(frame)
                self.counts[e["type"] if e["type"] != "error" else "error:" + e.get("code", "?")] += 1
                self.total += 1
                if until is not None and self.total >= until:
                    return
        except websockets.ConnectionClosed as closed:
            self.counts[f"closed:{closed.rcvd.code if closed.rcvd else None}"] += 1


async def _appends(url: str, opts: dict) -> dict:
    replies = _Replies()
    async with connect(url, max_size=None, ping_interval=None) as ws:
        await ws.send(_open_session())
        json.loads(await ws.recv())
        n = opts["appends"]
        async with anyio.create_task_group() as tg:
            tg.start_soon(replies.read, ws, n)
            for i in range(n):
                await ws.send(f'{{"type":"append","tokens":[{i % 4000 + 10}]}}')
        return {"sent": n, "replies": dict(replies.counts)}


async def _frames(url: str, opts: dict) -> dict:
    replies, sent = _Replies(), 0
    text = ("the quick brown fox jumps over the lazy dog " * (FRAME_TEXT_BYTES // 44 + 1))[:FRAME_TEXT_BYTES]
    frame = json.dumps({"type": "append", "text": text})
    async with connect(url, max_size=None, ping_interval=None) as ws:
        await ws.send(_open_session())
        json.loads(await ws.recv())
        async with anyio.create_task_group() as tg:
            tg.start_soon(replies.read, ws)
            deadline = time.monotonic() + opts["frames_seconds"]
            try:
                while time.monotonic() < deadline:
                    with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                        await ws.send(frame)
                        sent += 1
            except websockets.ConnectionClosed:
                pass
            tg.cancel_scope.cancel()
    return {"sent": sent, "replies": dict(replies.counts)}


async def _queued(url: str, opts: dict) -> dict:
    sessions, per_frame = opts["queued_sessions"], 131_072
    replies, sent = _Replies(), 0

    bodies: dict[int, str] = {}  # the ids of a frame of n tokens, as JSON (built once)

    async def one_connection(count: int) -> None:
        nonlocal sent
        async with connect(url, max_size=None, ping_interval=None) as ws:
            ids = []
            for _ in range(count):
                await ws.send(_open_session())
                ids.append(json.loads(await ws.recv())["session"])
            async with anyio.create_task_group() as tg:
                tg.start_soon(replies.read, ws)
                for sid in ids:
                    left = opts["queued_tokens"]
                    while left > 0:
                        n = min(per_frame, left)
                        if n not in bodies:
                            bodies[n] = ",".join(str((k * 13) % 4000 + 10) for k in range(n))
                        tokens = bodies[n]
                        await ws.send(f'{{"type":"append","session":"{sid}","tokens":[{tokens}]}}')
                        sent += 1
                        left -= n
                await anyio.sleep(opts["hold"])
                tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        for start in range(0, sessions, 16):
            tg.start_soon(one_connection, min(16, sessions - start))
    return {"frames_sent": sent, "replies": dict(replies.counts)}


async def _connections(url: str, opts: dict) -> dict:
    outcome: collections.Counter = collections.Counter()
    holding = anyio.Event()
    opened = [0]

    async def one() -> None:
        try:
            async with connect(url, open_timeout=60) as ws:
                await ws.send(_open_session())
                e = json.loads(await ws.recv())
                outcome[e["type"] if e["type"] != "error" else "error:" + e["code"]] += 1
                opened[0] += 1
                if opened[0] == opts["connections"]:
                    holding.set()
                await anyio.sleep(opts["hold"] + 60)  # cancelled at the end of the hold
        except websockets.InvalidStatus as refused:
            outcome[f"http:{refused.response.status_code}"] += 1
        except (OSError, websockets.WebSocketException, TimeoutError) as e:
            outcome[type(e).__name__] += 1

    async with anyio.create_task_group() as tg:
        for _ in range(opts["connections"]):
            tg.start_soon(one)
        with anyio.move_on_after(60):
            await holding.wait()
        await anyio.sleep(opts["hold"])
        tg.cancel_scope.cancel()
    return {"outcome": dict(outcome)}


async def _abandoned(url: str, opts: dict) -> dict:
    outcome: collections.Counter = collections.Counter()
    limiter = anyio.Semaphore(64)

    async def one(i: int) -> None:
        async with limiter:
            try:
                async with connect(url) as ws:
                    await ws.send(_open_session({"seed": i}))
                    json.loads(await ws.recv())
                    # Short enough to ride along in decode rows while the canary generates.
                    await ws.send(json.dumps({"type": "append", "tokens": [2] + [(i + k) % 4000 + 10
                                                                                 for k in range(7)]}))
                    e = json.loads(await ws.recv())
                    outcome[e["type"] if e["type"] != "error" else "error:" + e["code"]] += 1
                # Leaving without "close": the session stays on the server, detached.
            except websockets.InvalidStatus as refused:
                outcome[f"http:{refused.response.status_code}"] += 1
            except (OSError, websockets.WebSocketException) as e:
                outcome[type(e).__name__] += 1

    async with anyio.create_task_group() as tg:
        for i in range(opts["abandoned"]):
            tg.start_soon(one, i)
    return {"outcome": dict(outcome)}


def _canary_process(url: str, stop, ready, queue) -> None:
    try:
        queue.put(("ok", anyio.run(_canary, url, stop, ready, backend="asyncio")))
    except BaseException:  # noqa: BLE001 - reported to the main process
        ready.set()
        queue.put(("error", traceback.format_exc()))


def _attack_process(kind: str, url: str, opts: dict, queue) -> None:
    try:
        queue.put(("ok", anyio.run(globals()[f"_{kind}"], url, opts, backend="asyncio")))
    except BaseException:  # noqa: BLE001 - reported to the main process
        queue.put(("error", traceback.format_exc()))


# -- the measurement (this process: the server) ------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
    """Samples this process's RSS every 0.1 s; `take()` returns the peak since the last take."""

    def __init__(self):
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, _rss_bytes())

    def take(self) -> int:
        peak, self.peak = self.peak, _rss_bytes()
        return peak

    def close(self) -> None:
        self._stop.set()


def _disk_bytes(directory: str) -> int:
    total = 0
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False):
            total += entry.stat().st_blocks * 512
    return total


def _rate(frames: list[tuple[float, int]], t0: float, t1: float) -> float | None:
    if t1 <= t0:
        return None
    return sum(n for t, n in frames if t0 <= t < t1) / (t1 - t0)


def run(args: argparse.Namespace) -> dict:
    import torch

    import streamgemma as sg

    from . import common
    from .serve import serving

    torch.set_num_threads(args.threads)
    model = common.build_model(args)
    store_dir = tempfile.mkdtemp(prefix="sg-isolation-")
    engine_options = {"max_active": args.max_active, "store": sg.DirectorySnapshotStore(store_dir)}
    for name in ("session_ttl", "input_share"):  # options of newer trees
        if getattr(args, name) is not None and name in inspect.signature(sg.Engine).parameters:
            engine_options[name] = getattr(args, name)
    server = sg.Server(sg.Engine(model, **engine_options), port=0)
    opts = {k: getattr(args, k) for k in ("appends", "frames_seconds", "queued_sessions", "queued_tokens",
                                          "connections", "abandoned", "hold")}
    ctx = multiprocessing.get_context("spawn")
    rss = _PeakRss()
    phases = []
    try:
        with serving(server):
            stop, ready, canary_out = ctx.Event(), ctx.Event(), ctx.Queue()
            canary = ctx.Process(target=_canary_process, args=(server.url, stop, ready, canary_out), daemon=True)
            canary.start()
            if not ready.wait(120):
                raise RuntimeError("the canary never received a token")
            time.sleep(min(2.0, args.baseline))  # past the first tokens' warm-up
            for kind in [a for a in args.attacks.split(",") if a]:
                if kind not in ATTACKS:
                    raise ValueError(f"unknown attack {kind!r}; choose from {', '.join(ATTACKS)}")
                phases.append(_attack(ctx, kind, server.url, opts, args, rss, store_dir))
                print(f"{kind}: {json.dumps(phases[-1]['attacker'])}", flush=True)
            stop.set()
            status, frames = canary_out.get(timeout=120)
            canary.join(10)
            if status != "ok":
                raise RuntimeError(f"the canary failed:\n{frames}")
    finally:
        rss.close()
        shutil.rmtree(store_dir, ignore_errors=True)
    return _report(model, phases, frames, common)


def _attack(ctx, kind: str, url: str, opts: dict, args, rss: _PeakRss, store_dir: str) -> dict:
    out = ctx.Queue()
    process = ctx.Process(target=_attack_process, args=(kind, url, opts, out), daemon=True)
    # The canary alone just before: its reference rate (the machine's load drifts).
    quiet = time.monotonic()
    time.sleep(args.baseline)
    rss.take()
    started = time.monotonic()
    process.start()
    try:
        status, result = out.get(timeout=args.phase_timeout)
    except Exception:  # noqa: BLE001 - queue.Empty: the attack ran past its time
        status, result = "timeout", f"still running after {args.phase_timeout:g} s; stopped"
    ended = time.monotonic()
    process.join(5)
    if process.is_alive():
        process.kill()
    peak = rss.take()
    time.sleep(args.recovery)
    return {"phase": kind, "baseline": (quiet, started), "window": (started, ended),
            "recovery": (ended, time.monotonic()),
            "attack_seconds": round(ended - started, 2),
            "attacker": result if status == "ok" else {"status": status, "detail": str(result)[-2000:]},
            "rss_peak_MB": round(max(peak, rss.take()) / 2**20, 1),
            "store_MB_after": round(_disk_bytes(store_dir) / 2**20, 1)}


def _report(model, phases: list[dict], frames: list[tuple[float, int]], common) -> dict:
    """Per attack: the canary's tokens/s alone just before it, during it and
    after it; shares of the rate just before, and of the first baseline."""
    first = _rate(frames, *phases[0]["baseline"]) if phases else None
    results = {"model": common.describe(model), "phases": []}
    for p in phases:
        base, during = _rate(frames, *p["baseline"]), _rate(frames, *p["window"])
        after = _rate(frames, *p["recovery"])
        row = {k: v for k, v in p.items() if k not in ("baseline", "window", "recovery")}
        row["canary_tokens_per_s"] = {"before": round(base, 1), "during": round(during, 1),
                                      "after": round(after, 1) if after is not None else None}
        row["canary_share"] = round(during / base, 3)
        row["canary_share_of_first_baseline"] = round(during / first, 3)
        row["canary_share_after"] = round(after / base, 3) if after is not None else None
        results["phases"].append(row)
        print(f"{p['phase']:>12}: canary {row['canary_share']:.0%} of its rate just before "
              f"({base:.0f} tokens/s) during the attack ({row['attack_seconds']} s), "
              f"{row['canary_share_after']:.0%} after; RSS peak {row['rss_peak_MB']} MB; "
              f"store {row['store_MB_after']} MB", flush=True)
    return results


if __name__ == "__main__":  # the same benchmark against another tree (see the module docstring)
    from . import common as _common

    _parser = argparse.ArgumentParser(prog="python -m streamgemma.bench.isolation", description=__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_parser)
    _common.add_model_arguments(_parser)
    _args = _parser.parse_args()
    _common.finish("isolation", _args, run(_args))
