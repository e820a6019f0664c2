"""Load on the websocket server: N concurrent clients on loopback, each on its
own connection, append a prompt, then generate; some append more input while
generating. Prints aggregate generated tokens/s and the p50/p99 time between
consecutive tokens of one stream, as seen by the clients, and how many
tokens each decode call carried on average (the batching).

    python bench/serve_load.py                          # tiny random model, in-process server
    python bench/serve_load.py --model ./recurrentgemma-2b --clients 64 --tokens 128
    python bench/serve_load.py --url ws://127.0.0.1:8765/v1/stream --token T

Without --url a server runs in this process (another thread), so the clients
and the server share the host's CPU: for GPU numbers, that is fine (the
model runs on the GPU); on a CPU both compete.

CPU reference (2-core AMD EPYC, tiny random model whose decode step alone
takes ~7 ms, 128-token prompts, 64 tokens per client):

    clients   tokens/s   gap p50   gap p99   tokens per decode call
          1       78      11.7 ms   15.3 ms     1.0
          8      325      17.0 ms   38.5 ms     7.3
         32      739      23.9 ms   40.3 ms    21.6
         64      684      35.0 ms   68.3 ms    27.3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import anyio

import streamgemma as sg


async def one_client(url: str, token: str | None, index: int, prompt: list[int], tokens: int,
                     interject: bool, gaps: list[float], counts: list[int]) -> None:
    async with sg.Client(url, token=token) as client:
        session = await client.open(seed=index)
        await session.append(prompt)
        last = None
        n = 0
        async for _ in session.generate(max_tokens=tokens, stop_token_ids=[]):
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
            n += 1
            if interject and n == tokens // 2:
                await session.send_append(prompt[:8])  # consumed before the next token
        counts.append(n)
        await session.close()


async def load(url: str, token: str | None, clients: int, prompt_len: int, tokens: int, vocab: int) -> dict:
    gaps: list[float] = []
    counts: list[int] = []
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(clients):
            prompt = [(17 * i + 31 * k) % (vocab - 10) + 10 for k in range(prompt_len)]
            tg.start_soon(one_client, url, token, i, prompt, tokens, i % 2 == 1, gaps, counts)
    elapsed = time.perf_counter() - start
    gaps.sort()
    return {
        "clients": clients, "tokens_per_client": tokens, "prompt_tokens": prompt_len,
        "generated": sum(counts), "seconds": round(elapsed, 3),
        "tokens_per_s": round(sum(counts) / elapsed, 1),
        "gap_p50_ms": round(1e3 * statistics.median(gaps), 2),
        "gap_p99_ms": round(1e3 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="tokens each client generates")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per client")
    parser.add_argument("--url", help="a running server (default: one in this process)")
    parser.add_argument("--token", help="bearer token of --url")
    parser.add_argument("--model", help="checkpoint for the in-process server (default: tiny random, CPU)")
    parser.add_argument("--device", help="device of --model")
    parser.add_argument("--max-active", type=int, default=256)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    if args.url:
        result = anyio.run(load, args.url, args.token, args.clients, args.prompt, args.tokens, 256,
                           backend="asyncio")
    else:
        if args.model:
            model = sg.load(args.model, device=args.device)
        else:
            import torch

            torch.set_num_threads(1)  # a tiny model's ops are microseconds: threads only add overhead
            model = sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0, device="cpu", dtype="float32")
        engine = sg.Engine(model, max_active=args.max_active)
        server = sg.Server(engine, port=0, limits=sg.Limits(max_tokens=max(4096, args.tokens)))
        with sg.server.serve_in_thread(server) as url:
            result = anyio.run(load, url, None, args.clients, args.prompt, args.tokens,
                               model.config.vocab_size, backend="asyncio")
        result["model"] = model.source
        result["device"] = str(model.device)
        result["decode_calls"] = engine.decode_calls
        result["tokens_per_decode_call"] = round(engine.decoded_tokens / max(1, engine.decode_calls), 2)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
