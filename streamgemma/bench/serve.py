"""Serving: N websocket clients, each on its own connection, append a prompt,
then all generate M tokens at once; tokens/s against the decode step alone.

The server (unless --url) runs in this process on its own event loop in a
thread, after `model.warm_up(N)` and `gc.freeze()` as `streamgemma serve`
does; the clients run in --procs spawned worker processes (module
streamgemma.bench.clients). Before the server starts, the batch-N decode
step alone is timed on the same model (`model.decode` loop, as `bench
decode`), and the clients' steady tokens/s is reported as a share of it.

Figures (times from time.monotonic, shared by all processes of a host;
connection set-up and prompt prefill are not counted):
- steady tokens/s: tokens received between the moment the last stream
  received its first token and the moment the first stream received its
  last (all streams generating), over that time; overall: all tokens over
  first to last token anywhere.
- gaps per stream: between consecutive frames, and between tokens (tokens
  of one coalesced frame have a gap of 0); steady_frame_gap_ms counts frames
  inside the steady window.
- tokens per decode call and per-phase ms per call: the engine's and the
  server's monitoring counters, where the served tree has them; and
  loop_cpu_seconds, the CPU time of the server's event-loop thread per
  decode call (the host's whole share of a tick: engine, pump, websockets).

    streamgemma bench serve                                           # 2B shapes, 256 clients x 512 tokens
    streamgemma bench serve --no-coalesce                             # one frame per token
    streamgemma bench serve --temperature 0.8 --top-k 40 --top-p 0.95  # clients sample with filters
    streamgemma bench serve --url ws://HOST:PORT/v1/stream --token T  # a running server
    streamgemma bench serve --http --http-scrape 1                    # with the HTTP API on (and scraped)
    streamgemma bench serve --preset tiny --device cpu --clients 4 --tokens 8 --procs 1
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import threading
import time

import anyio
import anyio.from_thread

from .args import at_least_zero, positive_int
from .clients import run_clients, summarize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=256, help="concurrent clients (default 256)")
    parser.add_argument("--tokens", type=positive_int, default=512, help="tokens each client generates (default 512)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per client (default 128)")
    parser.add_argument("--procs", type=int, default=8, help="client worker processes (default 8)")
    parser.add_argument("--coalesce", action=argparse.BooleanOptionalAction, default=True,
                        help="ask for coalesced token frames, as sg.Client does (default: yes)")
    parser.add_argument("--coalesce-ms", type=float, default=20.0,
                        help="the server's least time between two frames of a coalesced stream (default 20)")
    parser.add_argument("--interject", action="store_true",
                        help="odd-numbered clients append 8 tokens halfway through their generation")
    parser.add_argument("--max-active", type=int, help="engine slots (default: --clients)")
    parser.add_argument("--decode-steps", type=int, default=64,
                        help="steps of the batch-N decode baseline (default 64; 0: not run)")
    parser.add_argument("--gc-freeze", action=argparse.BooleanOptionalAction, default=True,
                        help="gc.freeze() after the warm-up, as `streamgemma serve` does (default: yes)")
    parser.add_argument("--gc-threshold", type=at_least_zero, metavar="N",
                        help="the collector's first threshold while serving (gc.set_threshold; 0: no "
                             "collections, an upper bound of what they cost; default: Python's)")
    g = parser.add_argument_group("sampling (each client's generate request; default: the protocol's)")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--http", action=argparse.BooleanOptionalAction, default=False,
                        help="also run the OpenAI HTTP API on the server, as `streamgemma serve --http-port` "
                             "(default: no); the websocket clients are measured as without it")
    parser.add_argument("--http-scrape", type=float, metavar="SECONDS",
                        help="with --http: GET /metrics every SECONDS during the run (as a Prometheus would)")
    parser.add_argument("--store", metavar="DIR|URL", help="the engine's store: a directory or "
                        "redis://HOST:PORT/DB, with its write-ahead journal (default: memory, no journal)")
    parser.add_argument("--store-prefix", default="streamgemma-bench", help="key prefix in a Redis store")
    g = parser.add_argument_group("simulated device (the host's side alone, on any machine; module "
                                  "streamgemma.bench.simulated)")
    g.add_argument("--simulate-step-ms", type=float, metavar="MS",
                   help="a tiny CPU model whose decode step books MS on a simulated in-order device; the "
                        "engine does its host work as on CUDA; clients sample greedily unless given "
                        "sampling options; the share is of CLIENTS / MS")
    g.add_argument("--simulate-sample-ms", type=float, default=0.2, metavar="MS",
                   help="device time of a tick's sampling, with --simulate-step-ms (default 0.2)")
    parser.add_argument("--url", help="a running server instead of one in this process")
    parser.add_argument("--token", help="bearer token of --url")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before giving up (default 600)")


@contextlib.contextmanager
def serving(server):
    """Run `server` on an event loop in a background thread until the block ends."""
    with anyio.from_thread.start_blocking_portal(backend="asyncio") as portal:
        future, _port = portal.start_task(server.serve)
        try:
            yield portal
        finally:
            portal.call(server.stop)
            future.result(timeout=60)


class GcPauses:
    """Durations of the garbage collector's runs (all threads stop for them) while the block runs."""

    def __init__(self):
        self.pauses: list[tuple[int, float]] = []
        self._start = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._start))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        longest = sorted((d for _, d in self.pauses), reverse=True)[:3]
        return {"collections": len(self.pauses), "gen2": sum(1 for g, _ in self.pauses if g == 2),
                "total_ms": round(1e3 * sum(d for _, d in self.pauses), 1),
                "longest_ms": [round(1e3 * d, 1) for d in longest]}


@contextlib.contextmanager
def gc_threshold(first: int | None):
    """The collector's first threshold inside the block (None: unchanged)."""
    before = gc.get_threshold()
    if first is not None:
        gc.set_threshold(first, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


def engine_counters(engine):
    """Where the engine keeps its monitoring counters: `engine.stats`, or
    the engine itself in trees before the engine was split."""
    return getattr(engine, "stats", engine)


class BackgroundLoop:
    """`_run` in a daemon thread while the `with` block runs (if `wanted`);
    `_run` loops until `self._stop` is set."""

    wanted = True

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if self.wanted:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        raise NotImplementedError


class CounterSampler(BackgroundLoop):
    """Samples the engine's and the server's monitoring counters (those the
    served tree has) every `period` s in a thread: (time, counters)."""

    ENGINE = ("decode_calls", "decoded_tokens")
    SERVER = ("pump_seconds", "frames_direct", "frames_queued", "frames_deferred")

    def __init__(self, engine, server, period: float = 0.01, loop_thread: int | None = None):
        self.engine, self.server, self.period = engine_counters(engine), server, period
        self.samples: list[tuple[float, dict]] = []
        # The CPU time of the server's event-loop thread (where the engine's host work, the pump and
        # the websockets run): per decode call, how busy the host is, without the noise of a share.
        self._loop_clock = None
        if loop_thread is not None and hasattr(time, "pthread_getcpuclockid"):
            self._loop_clock = time.pthread_getcpuclockid(loop_thread)

    @property
    def available(self) -> bool:
        return all(hasattr(self.engine, name) for name in self.ENGINE)

    wanted = available

    def _run(self) -> None:
        while not self._stop.is_set():
            values = {name: getattr(self.engine, name) for name in self.ENGINE}
            values.update(getattr(self.engine, "phase_seconds", {}))
            values.update({f"server_{n}": getattr(self.server, n) for n in self.SERVER if hasattr(self.server, n)})
            if self._loop_clock is not None:
                values["loop_cpu_seconds"] = time.clock_gettime(self._loop_clock)
            self.samples.append((time.monotonic(), values))
            self._stop.wait(self.period)

    def window(self, t0: float, t1: float) -> dict:
        """Over [t0, t1]: decode calls, tokens per call and per second, the
        longest spans without a finished decode call (ms, to the sampling
        period), the mean ms per decode call of each timed phase, and the
        frames written per sampling period (median, 90th percentile, most:
        how evenly the pumps spread them)."""
        inside = [(t, v) for t, v in self.samples if t0 <= t <= t1]
        a = ([s for s in self.samples if s[0] <= t0] or self.samples[:1])[-1]
        b = ([s for s in self.samples if s[0] >= t1] or self.samples[-1:])[0]
        calls = b[1]["decode_calls"] - a[1]["decode_calls"]
        tokens = b[1]["decoded_tokens"] - a[1]["decoded_tokens"]
        spans, last_change, last_calls = [], None, None
        for t, v in inside:
            if v["decode_calls"] != last_calls:
                if last_change is not None:
                    spans.append(t - last_change)
                last_change, last_calls = t, v["decode_calls"]
        per_call = {k: round(1e3 * (b[1][k] - a[1][k]) / max(1, calls), 3)
                    for k, x in a[1].items() if isinstance(x, float)}
        counts = {k: b[1][k] - a[1][k] for k, x in a[1].items() if k.startswith("server_frames")}
        written = [sum(v.get(k, 0) for k in ("server_frames_direct", "server_frames_queued")) for _, v in inside]
        steps = sorted(y - x for x, y in zip(written, written[1:]))
        if steps:
            counts[f"frames_per_{round(1e3 * self.period)}ms"] = {
                "p50": steps[len(steps) // 2], "p90": steps[len(steps) * 9 // 10], "max": steps[-1]}
        return {"calls": calls, "tokens_per_call": round(tokens / max(1, calls), 2),
                "engine_tokens_per_s": round(tokens / (b[0] - a[0]), 1) if b[0] > a[0] else None,
                "longest_pauses_ms": [round(1e3 * x, 1) for x in sorted(spans, reverse=True)[:5]],
                "ms_per_call": per_call, **counts}


SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


class Scraper(BackgroundLoop):
    """GETs the server's /metrics every `period` seconds in a thread while the block runs (nothing without both)."""

    def __init__(self, server, period: float | None):
        self.server = server
        self.period = period
        self.count = 0
        self.wanted = self.server is not None and bool(self.period)

    def _run(self) -> None:
        import urllib.request

        url = f"http://{self.server.host}:{self.server.http.port}/metrics"
        while not self._stop.wait(self.period):
            with urllib.request.urlopen(url, timeout=30) as reply:
                reply.read()
            self.count += 1


def sampling_of(args: argparse.Namespace) -> dict:
    """The sampling fields given on the command line, as the protocol names them."""
    return {name: getattr(args, name) for name in SAMPLING if getattr(args, name) is not None}


def options(args: argparse.Namespace) -> dict:
    return {"tokens": args.tokens, "prompt": args.prompt, "coalesce": args.coalesce,
            "interject": args.interject, "timeout": args.timeout, "sampling": sampling_of(args)}


def run(args: argparse.Namespace) -> dict:
    simulate = args.simulate_step_ms is not None
    if simulate and (args.url or args.model or args.quantize):
        raise SystemExit("streamgemma bench serve: --simulate-step-ms runs its own tiny CPU model; "
                         "it takes no --url, --model or --quantize")
    if simulate and not (args.simulate_step_ms > 0 and args.simulate_sample_ms >= 0):
        raise SystemExit("streamgemma bench serve: --simulate-step-ms must be > 0 and --simulate-sample-ms >= 0")
    if simulate and not sampling_of(args):
        args.temperature = 0.0  # a sampled row's noise would be CPU arithmetic here, not the host's work
    out: dict = {"clients": args.clients, "procs": args.procs, "tokens_per_client": args.tokens,
                 "prompt_tokens": args.prompt, "coalesce": args.coalesce, "interject": args.interject,
                 "sampling": sampling_of(args)}
    if args.url:
        released, records = run_clients(args.url, args.token, args.clients, args.procs, options(args))
        out.update(summarize(released, records))
        out.pop("_window")
        return out

    import torch

    import streamgemma as sg

    from .common import build_model, describe
    from .decode import time_decode

    if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
        torch.set_num_threads(1)  # small models' ops are microseconds: threads only add overhead
    if simulate:
        from .simulated import attach, simulated_model

        model = simulated_model()
    else:
        model = build_model(args)
    print(model)
    warm_s = model.warm_up(args.clients, prompt_tokens=args.prompt)  # as `streamgemma serve` does
    if sampling_of(args):  # compile the sampling settings' kernels before any client waits on them
        s = model.session(seed=0)
        s.feed([2, 3, 4, 5])
        list(s.generate(max_tokens=2, stop_token_ids=[], **sampling_of(args)))
        s.close()
    if simulate:
        out["decode_alone_tok_s"] = args.clients / (args.simulate_step_ms / 1e3)
        out["simulated"] = {"step_ms": args.simulate_step_ms, "sample_ms": args.simulate_sample_ms}
    elif args.decode_steps:
        # at position 100 (the figure of earlier runs), and at the clients' mean position, where
        # attention reads as much of the ring as it does while they generate
        mid = args.prompt + args.tokens // 2
        for key, position in (("decode_alone_tok_s", 100), ("decode_alone_mid_tok_s", mid)):
            sec = time_decode(model, args.clients, args.decode_steps, position)
            out[key] = args.clients / sec
            print(f"decode alone, batch {args.clients}, position {position}: {args.clients / sec:.0f} tokens/s, "
                  f"{sec * 1e3:.2f} ms/step", flush=True)
        out["decode_alone_mid_position"] = mid
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    store = sg.open_store(args.store, prefix=args.store_prefix) if args.store else None
    engine = sg.Engine(model, max_active=args.max_active or args.clients, store=store,
                       **({"host_work": "loop"} if simulate else {}))
    if simulate:
        device = attach(engine, args.simulate_step_ms / 1e3, args.simulate_sample_ms / 1e3, args.clients)
    limits = sg.Limits(max_tokens=max(4096, args.tokens), coalesce_interval=args.coalesce_ms / 1e3)
    server = sg.Server(engine, port=0, limits=limits, **({"http": sg.HttpConfig()} if args.http else {}))
    with gc_threshold(args.gc_threshold), GcPauses() as pauses, serving(server) as portal, \
            CounterSampler(engine, server, loop_thread=portal.call(threading.get_ident)) as counters, \
            Scraper(server if args.http else None, args.http_scrape) as scrapes:
        released, records = run_clients(server.url, None, args.clients, args.procs, options(args))
    summary = summarize(released, records)
    window = summary.pop("_window")
    out.update(model=describe(model), coalesce_interval_ms=args.coalesce_ms, warm_up_s=round(warm_s, 2), **summary)
    if "decode_alone_tok_s" in out and out["steady"]["tokens_per_s"]:
        out["steady_share_of_decode"] = round(out["steady"]["tokens_per_s"] / out["decode_alone_tok_s"], 4)
        if "decode_alone_mid_tok_s" in out:
            out["steady_share_of_decode_mid"] = round(out["steady"]["tokens_per_s"] / out["decode_alone_mid_tok_s"], 4)
    if counters.available:
        out["engine"] = counters.window(*window)
    if simulate:
        out["simulated"]["device_busy_s"] = round(device.busy, 3)
    out["gc"] = {**pauses.summary(), "threshold": args.gc_threshold}
    out["http_api"] = {"enabled": args.http, "scrape_s": args.http_scrape, "scrapes": scrapes.count}
    out["store"] = engine.store.describe()
    out["journal"] = {"enabled": engine.journal.enabled, "commits": engine.stats.journal_commits,
                      "failures": engine.stats.journal_failures}
    share = ""
    if "steady_share_of_decode" in out:
        share = f" ({out['steady_share_of_decode']:.1%} of decode alone"
        if "steady_share_of_decode_mid" in out:
            share += f", {out['steady_share_of_decode_mid']:.1%} at position {out['decode_alone_mid_position']}"
        share += ")"
    print(f"{args.clients} clients x {args.tokens} tokens: steady {out['steady']['tokens_per_s']} tokens/s{share}"
          f", frame gap p50/p99 {out['frame_gap_ms']['p50']}/{out['frame_gap_ms']['p99']} ms", flush=True)
    return out
