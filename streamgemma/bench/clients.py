"""Websocket clients for the serving benchmarks. They speak the protocol
(docs/protocol.md) with websockets directly, to time every frame as it
arrives; `run_clients` spreads them over spawned worker processes, each
with its own event loop, so they never take the server's GIL. This module
imports neither torch nor the model (the workers import only it)."""

from __future__ import annotations

import json
import math
import multiprocessing
import threading
import time

import anyio
import anyio.to_thread
from websockets.asyncio.client import connect

from ..errors import StreamgemmaError


def percentiles(values: list[float], scale: float = 1e3) -> dict:
    """p50/p99/max of `values` (nearest rank) times `scale`, rounded."""
    if not values:
        return {"p50": None, "p99": None, "max": None}
    v = sorted(values)
    pick = lambda q: v[max(0, math.ceil(q * len(v)) - 1)]  # noqa: E731 (the ceil(q n)-th value)
    return {"p50": round(scale * pick(0.50), 3), "p99": round(scale * pick(0.99), 3),
            "max": round(scale * v[-1], 3)}


async def request(ws, msg: dict, want: str, who: str = "") -> dict:
    """Send `msg` and return the reply, which must be of type `want`."""
    await ws.send(json.dumps(msg))
    reply = json.loads(await ws.recv())
    if reply.get("type") != want:
        raise RuntimeError(f"{who}{msg['type']} got {reply}")
    return reply


def prompt_of(index: int, length: int) -> list[int]:
    """A distinct prompt per client; ids in [10, 250) exist in every vocabulary here."""
    return [(17 * index + 31 * k) % 240 + 10 for k in range(length)]


async def one_client(url: str, headers: dict | None, index: int, opts: dict, ready, go: anyio.Event) -> dict:
    """One connection, one session: prompt, wait for `go`, generate; the
    arrival time (time.monotonic) and token count of every frame."""
    times: list[float] = []
    counts: list[int] = []
    async with connect(url, additional_headers=headers, max_size=None) as ws:
        who = f"client {index}: "
        await request(ws, {"type": "open", "seed": index}, "opened", who)
        prompt = prompt_of(index, opts["prompt"])
        await request(ws, {"type": "append", "tokens": prompt}, "appended", who)
        ready()
        await go.wait()
        generate = {"type": "generate", "id": "g", "max_tokens": opts["tokens"], "stop_token_ids": [],
                    **opts.get("sampling", {})}
        if opts["coalesce"]:
            generate["coalesce"] = True
        await ws.send(json.dumps(generate))
        received, interjected = 0, not opts["interject"] or index % 2 == 0
        while True:
            e = json.loads(await ws.recv())
            now = time.monotonic()
            if e["type"] in ("token", "tokens"):
                n = 1 if e["type"] == "token" else len(e["ids"])
                times.append(now)
                counts.append(n)
                received += n
                if not interjected and received >= opts["tokens"] // 2:
                    interjected = True  # its `appended` reply is skipped below
                    await ws.send(json.dumps({"type": "append", "tokens": prompt[:8]}))
            elif e["type"] == "done":
                break
            elif e["type"] != "appended":
                raise RuntimeError(f"{who}unexpected {e}")
        await ws.send(json.dumps({"type": "close", "id": "c"}))
        while json.loads(await ws.recv()).get("type") != "closed":
            pass
    return {"times": times, "counts": counts}


async def worker_main(url: str, token: str | None, indices: list[int], opts: dict, barrier) -> list[dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    go, all_ready = anyio.Event(), anyio.Event()
    waiting = [len(indices)]

    def ready() -> None:
        waiting[0] -= 1
        if waiting[0] == 0:
            all_ready.set()

    results: dict[int, dict] = {}

    async def run_one(i: int) -> None:
        results[i] = await one_client(url, headers, i, opts, ready, go)

    async with anyio.create_task_group() as tg:
        for i in indices:
            tg.start_soon(run_one, i)
        await all_ready.wait()
        await anyio.to_thread.run_sync(barrier.wait)  # every process is ready: generate together
        go.set()
    return [results[i] for i in indices]


def worker(url: str, token: str | None, indices: list[int], opts: dict, barrier, queue) -> None:
    """A worker process: its share of the clients on one event loop."""
    try:
        queue.put(("ok", anyio.run(worker_main, url, token, indices, opts, barrier, backend="asyncio")))
    except BaseException as e:  # noqa: BLE001 - reported to the main process, which fails the run
        barrier.abort()
        while getattr(e, "exceptions", None):  # (an exception group of the task group: its first cause)
            e = e.exceptions[0]
        queue.put(("error", f"{type(e).__name__}: {e}"))


class ClientsFailed(StreamgemmaError, RuntimeError):
    """A client process of the benchmark failed (e.g. the server cannot be reached)."""


def _failure(queue, url: str, timeout: float, procs: int) -> ClientsFailed:
    """Why the barrier broke: the first process's own error (the others then report the barrier)."""
    reasons = []
    try:
        while len(reasons) < procs:
            reasons.append(queue.get(timeout=5)[1])
    except Exception:  # noqa: BLE001 - (queue.Empty) the rest said nothing more
        pass
    causes = [r for r in reasons if not r.startswith("BrokenBarrierError")]
    if not causes:
        return ClientsFailed(f"the clients were not ready to generate within {timeout:g} s ({url})")
    return ClientsFailed(f"a client process failed against {url}: {causes[0]}")


def run_clients(url: str, token: str | None, clients: int, procs: int, opts: dict) -> tuple[float, list[dict]]:
    """Run the clients in `procs` processes; (the time they were released
    to generate, per-client frame records)."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds CUDA and server threads
    procs = max(1, min(procs, clients))
    barrier, queue = ctx.Barrier(procs + 1), ctx.Queue()
    shares = [list(range(p, clients, procs)) for p in range(procs)]
    workers = [ctx.Process(target=worker, args=(url, token, share, opts, barrier, queue), daemon=True)
               for share in shares]
    for w in workers:
        w.start()
    try:
        try:
            barrier.wait(timeout=opts["timeout"])
        except threading.BrokenBarrierError:  # a worker failed (it aborts the barrier), or a timeout
            raise _failure(queue, url, opts["timeout"], procs) from None
        released = time.monotonic()
        records = []
        for _ in workers:
            status, payload = queue.get(timeout=opts["timeout"])
            if status != "ok":
                raise ClientsFailed(f"a client process failed against {url}: {payload}")
            records += payload
    finally:
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()
    return released, records


def summarize(released: float, records: list[dict]) -> dict:
    """Throughput and gaps of the client records; "_window" is the steady
    phase (the last stream's first token to the first stream's last)."""
    firsts = [r["times"][0] for r in records]
    lasts = [r["times"][-1] for r in records]
    generated = sum(sum(r["counts"]) for r in records)
    t0, t1 = max(firsts), min(lasts)
    steady_tokens = sum(n for r in records for t, n in zip(r["times"], r["counts"]) if t0 < t <= t1)
    token_gaps, frame_gaps, steady_frame_gaps = [], [], []
    for r in records:
        for k, (t, n) in enumerate(zip(r["times"], r["counts"])):
            if k:
                gap = t - r["times"][k - 1]
                frame_gaps.append(gap)
                token_gaps.append(gap)
                if r["times"][k - 1] >= t0 and t <= t1:
                    steady_frame_gaps.append(gap)
            token_gaps += [0.0] * (n - 1)  # the other tokens of a frame arrive with it
    frames = sum(len(r["times"]) for r in records)
    return {
        "generated": generated,
        "frames": frames,
        "tokens_per_frame": round(generated / frames, 2),
        "steady": {"seconds": round(t1 - t0, 3), "tokens": steady_tokens,
                   "tokens_per_s": round(steady_tokens / (t1 - t0), 1) if t1 > t0 else None},
        "overall_tokens_per_s": round(generated / max(1e-9, max(lasts) - min(firsts)), 1),
        "token_gap_ms": percentiles(token_gaps),
        "frame_gap_ms": percentiles(frame_gaps),
        "steady_frame_gap_ms": percentiles(steady_frame_gaps),
        "first_token_ms": percentiles([t - released for t in firsts]),
        "_window": (t0, t1),
    }
