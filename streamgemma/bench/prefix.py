"""Prefix reuse: time to first token of a conversation's second turn over
the HTTP API (state restored from the prefix cache) against the same turn
on a live websocket session, and against recomputing the whole history.

One server in this process (websocket + HTTP API, as `streamgemma serve
--http-port`), after `model.warm_up`. Each repetition is a new conversation
of random token ids: turn 1 is --prompt ids, answered with --reply greedy
tokens; turn 2 adds --turn ids. Times are from sending turn 2 to its first
token, client side (time.perf_counter):
- live: on a websocket session that holds the conversation (`append` of the
  turn sent, then `generate`; the state never left its slot);
- cached: /v1/completions (stream) with the whole history as token ids,
  turn 1's request having left its final state in the prefix cache; the
  reply's usage.prompt_tokens_details.cached_tokens is checked to be
  prompt + reply; tiers: "held" (turn 1's session kept open), "memory"
  (decoded states in host memory; no held sessions) and "store" (neither:
  read and decoded from a directory store);
- recompute: the same request shape with a history nobody sent before (a
  miss: the whole history is prefilled).
Reported: p50 and all samples of each (ms), cached/live and
recompute/cached. Targets (issue #20, 2B shapes on an H100, 4,000 prompt
tokens): cached <= 1.2 x live, recompute >= 10 x cached.

    streamgemma bench prefix --json prefix.json            # 2B shapes, 4000 + 32 + 32 tokens
    streamgemma bench prefix --preset tiny --device cpu --prompt 200 --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import aiohttp
import anyio


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", type=int, default=4000, help="turn 1's prompt tokens (default 4000)")
    parser.add_argument("--reply", type=int, default=32, help="turn 1's generated tokens (default 32)")
    parser.add_argument("--turn", type=int, default=32, help="turn 2's new tokens (default 32)")
    parser.add_argument("--reps", type=int, default=10, help="conversations timed per case (default 10)")
    parser.add_argument("--tiers", default="held,memory,store",
                        help="prefix-cache tiers to time (default held,memory,store)")


async def _first_token_http(http: aiohttp.ClientSession, url: str, ids: list[int], expect_cached: int | None) -> float:
    """Seconds from sending a streamed completion of `ids` to its first token chunk."""
    body = {"prompt": ids, "max_tokens": 1, "temperature": 0, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    async with http.post(f"{url}/completions", json=body) as reply:
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}: {await reply.text()}")
        async for line in reply.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[len(b"data: "):])
            if first is None and event["choices"] and event["choices"][0].get("token_ids"):
                first = time.perf_counter() - started
            if event.get("usage") and expect_cached is not None:
                cached = event["usage"]["prompt_tokens_details"]["cached_tokens"]
                if cached != expect_cached:
                    raise RuntimeError(f"cached_tokens {cached}, expected {expect_cached}")
    return first


async def _turn1_http(http: aiohttp.ClientSession, url: str, ids: list[int], reply: int) -> list[int]:
    body = {"prompt": ids, "max_tokens": reply, "temperature": 0, "return_token_ids": True}
    async with http.post(f"{url}/completions", json=body) as answer:
        return (await answer.json())["choices"][0]["token_ids"]


async def _live(client, prompt: list[int], reply: int, turn: list[int]) -> float:
    session = await client.open()
    await session.append(prompt)
    async for _ in session.generate(max_tokens=reply, temperature=0, stop_token_ids=[]):
        pass
    started = time.perf_counter()
    await session.send_append(turn)
    async for _ in session.generate(max_tokens=1, temperature=0, stop_token_ids=[]):
        elapsed = time.perf_counter() - started
    await session.close()
    return elapsed


def _summary(samples: list[float]) -> dict:
    return {"p50_ms": round(statistics.median(samples) * 1e3, 3), "samples_ms": [round(s * 1e3, 3) for s in samples]}


def run(args: argparse.Namespace) -> dict:
    import torch

    import streamgemma as sg

    from .common import build_model, describe, token_ids
    from .serve import serving

    if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
        torch.set_num_threads(1)
    model = build_model(args)
    print(model)
    vocab = model.config.vocab_size
    history = args.prompt + args.reply + args.turn
    warm_s = model.warm_up(4, prompt_tokens=history)
    tiers = [t for t in args.tiers.split(",") if t]
    out: dict = {"model": describe(model), "prompt_tokens": args.prompt, "reply_tokens": args.reply,
                 "turn_tokens": args.turn, "reps": args.reps, "warm_up_s": round(warm_s, 2)}
    limits = sg.Limits(max_tokens=max(4096, args.reply), max_message_bytes=1 << 24)
    seeds = iter(range(1, 1 << 30))

    async def measure(server, tier: str, flush) -> dict:
        """The client side, on its own event loop (the server has another, in a thread)."""
        times: dict[str, list[float]] = {"live": [], "cached": [], "recompute": []}
        async with sg.Client(server.url) as client, aiohttp.ClientSession() as http:
            for rep in range(args.reps + 1):  # the first is a warm-up, not counted
                prompt, turn = token_ids(args.prompt, vocab, next(seeds)), token_ids(args.turn, vocab, next(seeds))
                sample = {}
                if tier == tiers[0]:
                    sample["live"] = await _live(client, prompt, args.reply, turn)
                    sample["recompute"] = await _first_token_http(
                        http, server.http.url, token_ids(history, vocab, next(seeds)), 0)
                reply = await _turn1_http(http, server.http.url, prompt, args.reply)
                if flush is not None:  # the store tier: turn 1's state must be in the store first
                    await anyio.to_thread.run_sync(flush)
                sample["cached"] = await _first_token_http(http, server.http.url, prompt + reply + turn,
                                                           args.prompt + args.reply)
                if rep:
                    for name, value in sample.items():
                        times[name].append(value)
        return {name: _summary(v) for name, v in times.items() if v}

    results = {}
    for tier in tiers:
        if tier not in ("held", "memory", "store"):
            raise ValueError(f"--tiers: unknown tier {tier!r} (held, memory, store)")
        with tempfile.TemporaryDirectory(prefix="sg-bench-prefix-") as store_dir:
            store = sg.DirectorySnapshotStore(store_dir) if tier == "store" else None
            config = sg.HttpConfig(prefix_cache_memory_bytes=0 if tier == "store" else 1 << 30,
                                   held_sessions=1 if tier == "held" else 0)
            server = sg.Server(sg.Engine(model, max_active=4, store=store), port=0, limits=limits, http=config)
            with serving(server) as portal:
                flush = (lambda: portal.call(server.http.cache.flush)) if tier == "store" else None
                results[tier] = anyio.run(measure, server, tier, flush, backend="asyncio")
    first = results[tiers[0]]
    out["ttft"] = {"live": first["live"], "recompute": first["recompute"],
                   **{f"cached_{tier}": results[tier]["cached"] for tier in tiers}}
    live, recompute = first["live"]["p50_ms"], first["recompute"]["p50_ms"]
    for tier in tiers:
        cached = results[tier]["cached"]["p50_ms"]
        out[f"cached_{tier}_over_live"] = round(cached / live, 3)
        out[f"recompute_over_cached_{tier}"] = round(recompute / cached, 2)
        print(f"{tier} tier: cached {cached:.1f} ms vs live {live:.1f} ms ({cached / live:.2f}x), recompute "
              f"{recompute:.1f} ms ({recompute / cached:.1f}x cached)", flush=True)
    return out
