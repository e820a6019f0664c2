"""Load on the websocket server: N concurrent clients, each on its own
connection, append a prompt, then all generate at once. Prints one JSON result:
aggregate tokens/s over the steady phase, gaps between tokens and between
frames per stream, and how many tokens each decode call carried.

    python bench/serve_load.py                                   # tiny random model on the CPU
    python bench/serve_load.py --preset 2b --device cuda --clients 256 --tokens 256 --procs 8
    python bench/serve_load.py --no-coalesce ...                 # one frame per token
    python bench/serve_load.py --url ws://127.0.0.1:8765/v1/stream --token T   # a running server

The server (unless --url) runs in this process, on its own event loop in a
thread; the clients run in --procs worker processes (spawned, each with its own
event loop), so they never take the server's GIL. The clients speak the
protocol with websockets directly, to time every frame as it arrives.

How the figures are computed (times from time.monotonic, shared by all
processes on one host; connection set-up and prompt prefill happen before the
clients start generating together and are not counted):
- steady tokens/s: tokens received by all clients between the moment the
  last stream received its first token and the moment the first stream
  received its last token (all streams generating), divided by that time.
  overall tokens/s: all tokens / (last token anywhere - first token anywhere).
- token gaps: per stream, the time between consecutive tokens as the client
  sees them (all of the run; steady_frame_gap_ms: frame gaps with both
  frames inside the steady window). Tokens that arrive in one coalesced frame have a gap of 0, so
  frame gaps (the time between consecutive frames of a stream) are reported
  too; with --no-coalesce the two are the same.
- tokens per decode call: the engine's counters, over the whole run and over
  the steady phase (sampled every 10 ms in the server process).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing
import os
import threading
import time
import traceback

import anyio
import anyio.from_thread
from websockets.asyncio.client import connect

PRESETS = {"2b": "recurrentgemma-2b", "9b": "recurrentgemma-9b"}  # short names; other presets by full name


# -- models and the in-process server --------------------------------------------------------
def build_model(args: argparse.Namespace):
    """The served model: a checkpoint (--model) or random weights with a
    preset's shapes (--preset; bfloat16 on CUDA, float32 on the CPU)."""
    import torch

    import streamgemma as sg

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(1)  # small models' ops are microseconds: threads only add overhead
    if args.model:
        return sg.load(args.model, device=device)
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    config = sg.GriffinConfig.preset(PRESETS.get(args.preset, args.preset))
    return sg.Model.random(config, seed=0, device=device, dtype=dtype)


@contextlib.contextmanager
def profiled_loop(portal, path: str | None):
    """cProfile the server's event-loop thread (where the engine's CUDA host
    work and all websocket work run) while the block runs; stats to `path`."""
    if not path:
        yield
        return
    import cProfile
    import pstats

    prof = cProfile.Profile()
    portal.call(prof.enable)  # runs in the loop's thread: that thread is profiled
    try:
        yield
    finally:
        portal.call(prof.disable)
        prof.dump_stats(path)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def percentiles(values: list[float], scale: float = 1e3) -> dict:
    """p50/p99/max of `values` (nearest rank) times `scale`, rounded."""
    if not values:
        return {"p50": None, "p99": None, "max": None}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return {"p50": round(scale * pick(0.50), 2), "p99": round(scale * pick(0.99), 2), "max": round(scale * v[-1], 2)}


class GcPauses:
    """Durations of the garbage collector's runs in this process (all
    threads stop for them) while the block runs."""

    def __init__(self):
        self.pauses: list[tuple[int, float]] = []
        self._start = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._start))

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        longest = sorted((d for _, d in self.pauses), reverse=True)[:3]
        return {"collections": len(self.pauses), "gen2": sum(1 for g, _ in self.pauses if g == 2),
                "longest_ms": [round(1e3 * d, 1) for d in longest]}


class CounterSampler:
    """Samples the engine's decode counters every `period` s in a thread:
    (time.monotonic, decode_calls, decoded_tokens)."""

    def __init__(self, engine, server=None, period: float = 0.01):
        self.engine, self.server, self.period = engine, server, period
        self.samples: list[tuple[float, int, int]] = []
        self.phases: list[dict] = []  # per sample: engine phase seconds and the server's frame work
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "CounterSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.engine.decode_calls, self.engine.decoded_tokens))
            phases = dict(self.engine.phase_seconds)
            if self.server is not None:
                phases.update(frames=self.server.pump_seconds, frames_direct=self.server.frames_direct,
                              frames_queued=self.server.frames_queued)
            self.phases.append(phases)
            self._stop.wait(self.period)

    def stalls(self, t0: float, t1: float, top: int = 5) -> list[float]:
        """The longest spans (ms) in [t0, t1] over which no decode call
        finished, longest first (resolution: the sampling period)."""
        spans, last_change, last_calls = [], None, None
        for t, calls, _ in self.samples:
            if t < t0 or t > t1:
                continue
            if calls != last_calls:
                if last_change is not None:
                    spans.append(t - last_change)
                last_change, last_calls = t, calls
        return [round(1e3 * x, 1) for x in sorted(spans, reverse=True)[:top]]

    def per_tick(self, t0: float, t1: float) -> dict:
        """Mean milliseconds per decode call in [t0, t1] of each engine phase
        and of the server's frame work (written by the event loop's thread
        and read here without a lock: monitoring figures, good to a sample),
        and the frames written directly / queued over the window."""
        i = max([k for k, s in enumerate(self.samples) if s[0] <= t0] or [0])
        j = min([k for k, s in enumerate(self.samples) if s[0] >= t1] or [len(self.samples) - 1])
        calls = self.samples[j][1] - self.samples[i][1]
        a, b = self.phases[i], self.phases[j]
        out = {k: round(1e3 * (b[k] - a[k]) / max(1, calls), 3) for k in a if not k.startswith("frames_")}
        out.update({k: b[k] - a[k] for k in a if k.startswith("frames_")})
        return out

    def between(self, t0: float, t1: float) -> tuple[float, int, int]:
        """(seconds, decode calls, decoded tokens) from the last sample <= t0 to the first >= t1."""
        before = [s for s in self.samples if s[0] <= t0] or self.samples[:1]
        after = [s for s in self.samples if s[0] >= t1] or self.samples[-1:]
        a, b = before[-1], after[0]
        return b[0] - a[0], b[1] - a[1], b[2] - a[2]


# -- clients (in worker processes) -------------------------------------------------------------
async def request(ws, msg: dict, want: str, who: str = "") -> dict:
    """Send `msg` on the websocket and return the reply, which must be of type `want`."""
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
    arrival time and token count of every frame."""
    times: list[float] = []
    counts: list[int] = []
    async with connect(url, additional_headers=headers, max_size=None) as ws:
        async def ask(msg: dict, want: str) -> dict:
            return await request(ws, msg, want, who=f"client {index}: ")

        await ask({"type": "open", "seed": index}, "opened")
        prompt = prompt_of(index, opts["prompt"])
        await ask({"type": "append", "tokens": prompt}, "appended")
        ready()
        await go.wait()
        generate = {"type": "generate", "id": "g", "max_tokens": opts["tokens"], "stop_token_ids": []}
        if opts["coalesce"]:
            generate["coalesce"] = True
        await ws.send(json.dumps(generate))
        received, interjected = 0, not opts["interject"] or index % 2 == 0
        while True:
            e = json.loads(await ws.recv())
            now = time.monotonic()
            kind = e["type"]
            if kind == "token" or kind == "tokens":
                n = 1 if kind == "token" else len(e["ids"])
                times.append(now)
                counts.append(n)
                received += n
                if not interjected and received >= opts["tokens"] // 2:
                    interjected = True  # consumed before the next token; its `appended` is skipped below
                    await ws.send(json.dumps({"type": "append", "tokens": prompt[:8]}))
            elif kind == "done":
                break
            elif kind != "appended":
                raise RuntimeError(f"client {index}: unexpected {e}")
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
    except BaseException:  # noqa: BLE001 - reported to the main process, which fails the run
        barrier.abort()
        queue.put(("error", traceback.format_exc()))


def run_clients(url: str, token: str | None, clients: int, procs: int, opts: dict) -> tuple[float, list[dict]]:
    """Run the clients in `procs` processes; (time they were released to
    generate, per-client frame records)."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds CUDA and server threads
    procs = max(1, min(procs, clients))
    barrier, queue = ctx.Barrier(procs + 1), ctx.Queue()
    shares = [list(range(p, clients, procs)) for p in range(procs)]
    workers = [ctx.Process(target=worker, args=(url, token, share, opts, barrier, queue), daemon=True)
               for share in shares]
    for w in workers:
        w.start()
    try:
        barrier.wait(timeout=opts["timeout"])
        released = time.monotonic()
        records = []
        for _ in workers:
            status, payload = queue.get(timeout=opts["timeout"])
            if status != "ok":
                raise RuntimeError(f"a client process failed:\n{payload}")
            records += payload
    finally:
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()
    return released, records


def summarize(released: float, records: list[dict]) -> dict:
    firsts = [r["times"][0] for r in records]
    lasts = [r["times"][-1] for r in records]
    generated = sum(sum(r["counts"]) for r in records)
    t0, t1 = max(firsts), min(lasts)
    steady_tokens = sum(n for r in records for t, n in zip(r["times"], r["counts"]) if t0 < t <= t1)
    token_gaps, frame_gaps, steady_frame_gaps = [], [], []
    for r in records:
        for k, (t, n) in enumerate(zip(r["times"], r["counts"])):
            if k:
                frame_gaps.append(t - r["times"][k - 1])
                token_gaps.append(t - r["times"][k - 1])
                if r["times"][k - 1] >= t0 and t <= t1:
                    steady_frame_gaps.append(t - r["times"][k - 1])
            token_gaps += [0.0] * (n - 1)  # the other tokens of a frame arrive with it
    frames = sum(len(r["times"]) for r in records)
    return {
        "generated": generated,
        "frames": frames,
        "tokens_per_frame": round(generated / frames, 2),
        "steady": {"seconds": round(t1 - t0, 3), "tokens": steady_tokens,
                   "tokens_per_s": round(steady_tokens / (t1 - t0), 1) if t1 > t0 else None},
        "overall_tokens_per_s": round(generated / (max(lasts) - min(firsts)), 1),
        "token_gap_ms": percentiles(token_gaps),
        "frame_gap_ms": percentiles(frame_gaps),
        "steady_frame_gap_ms": percentiles(steady_frame_gaps),  # both frames inside the steady window
        "first_token_ms": percentiles([t - released for t in firsts]),
        "_window": (t0, t1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="tokens each client generates")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per client")
    parser.add_argument("--procs", type=int, default=2, help="client worker processes")
    parser.add_argument("--coalesce", action=argparse.BooleanOptionalAction, default=True,
                        help="ask for coalesced token frames (default: yes)")
    parser.add_argument("--coalesce-ms", type=float, default=20.0,
                        help="in-process server's least time between two frames of a coalesced stream")
    parser.add_argument("--interject", action="store_true",
                        help="odd-numbered clients append 8 tokens halfway through their generation")
    parser.add_argument("--url", help="a running server (default: one in this process)")
    parser.add_argument("--token", help="bearer token of --url")
    parser.add_argument("--preset", default="tiny", help="random weights with this preset's shapes: tiny, 2b, ...")
    parser.add_argument("--model", help="a checkpoint instead of --preset")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--max-active", type=int, help="engine slots (default: --clients)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before giving up")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--gc-freeze", action=argparse.BooleanOptionalAction, default=True,
                        help="gc.freeze() after the warm-up, as `streamgemma serve` does (default: yes)")
    parser.add_argument("--profile", help="write a cProfile of the server's event-loop thread to this file")
    args = parser.parse_args()
    opts = {"tokens": args.tokens, "prompt": args.prompt, "coalesce": args.coalesce, "interject": args.interject,
            "timeout": args.timeout}
    result: dict = {"clients": args.clients, "procs": args.procs, "tokens_per_client": args.tokens,
                    "prompt_tokens": args.prompt, "coalesce": args.coalesce, "interject": args.interject}

    if args.url:
        released, records = run_clients(args.url, args.token, args.clients, args.procs, opts)
        result.update(summarize(released, records))
        result.pop("_window")
    else:
        import streamgemma as sg

        model = build_model(args)
        # kernels compiled and graphs captured before the clients connect, as `streamgemma serve` does
        warm_s = model.warm_up(args.clients, prompt_tokens=args.prompt)
        if args.gc_freeze:
            gc.collect()
            gc.freeze()  # as `streamgemma serve` does after loading the model
        engine = sg.Engine(model, max_active=args.max_active or args.clients)
        limits = sg.Limits(max_tokens=max(4096, args.tokens), coalesce_interval=args.coalesce_ms / 1e3)
        server = sg.Server(engine, port=0, limits=limits)
        gc_pauses = GcPauses()
        with anyio.from_thread.start_blocking_portal(backend="asyncio") as portal, \
                CounterSampler(engine, server) as counters, gc_pauses:
            future, _port = portal.start_task(server.serve)
            try:
                with profiled_loop(portal, args.profile):
                    released, records = run_clients(server.url, None, args.clients, args.procs, opts)
            finally:
                portal.call(server.stop)
                future.result(timeout=60)
        summary = summarize(released, records)
        window = summary.pop("_window")
        seconds, calls, decoded = counters.between(*window)
        result.update(model=model.source, preset=None if args.model else args.preset, device=str(model.device),
                      dtype=str(model.dtype).replace("torch.", ""), coalesce_interval_ms=args.coalesce_ms,
                      warm_up_s=round(warm_s, 1), **summary)
        result["decode"] = {
            "calls": engine.decode_calls,
            "tokens_per_call": round(engine.decoded_tokens / max(1, engine.decode_calls), 2),
            "steady_tokens_per_call": round(decoded / max(1, calls), 2),
            "steady_engine_tokens_per_s": round(decoded / seconds, 1) if seconds > 0 else None,
            "longest_pauses_ms": counters.stalls(*window),
            "steady_ms_per_call": counters.per_tick(*window),
        }
        result["gc"] = gc_pauses.summary()
    result["host_cpus"] = os.cpu_count()
    report(result, args.json)


def report(result: dict, path: str | None) -> None:
    """Print the result as JSON, and also write it to `path` if given."""
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
