"""Where a prefix-cache hit's time to first token goes, in the engine alone
(no HTTP): restoring the cached state into a slot (`Engine.open(contents=)`),
consuming the new turn, the first token; against the same turn on the live
session. `streamgemma bench prefix` measures the whole request.

    python bench/dev/prefix_parts.py --model DIR          # CUDA, 2B shapes
"""

from __future__ import annotations

import argparse
import statistics
import time

import anyio

import streamgemma as sg
from streamgemma.sampling.params import SamplingParams


async def first_token(engine: sg.Engine, es, turn: list[int]) -> dict:
    t0 = time.perf_counter()
    await engine.consumed(engine.append(es, turn))
    t1 = time.perf_counter()
    stream = await engine.generate(es, SamplingParams(max_tokens=1, temperature=0, stop_token_ids=()))
    async for _ in stream:
        pass
    t2 = time.perf_counter()
    return {"append_ms": 1e3 * (t1 - t0), "first_token_ms": 1e3 * (t2 - t1)}


async def main(args) -> None:
    model = sg.load(args.model) if args.model else sg.Model.random(sg.GriffinConfig.preset(args.preset))
    model.warm_up()
    engine = sg.Engine(model)
    vocab = model.config.vocab_size
    rows = {"live": [], "cached": []}
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        for rep in range(args.reps):
            history = [(rep * 7919 + 13 * i) % (vocab - 1) + 1 for i in range(args.prompt)]
            turn = [(rep * 31 + 17 * i) % (vocab - 1) + 1 for i in range(args.turn)]
            live = await engine.open(seed=0)
            await engine.consumed(engine.append(live, history))
            contents = await engine.capture(live)
            t0 = time.perf_counter()
            cached = await engine.open(seed=0, contents=contents)
            opened = 1e3 * (time.perf_counter() - t0)
            rows["cached"].append({"open_ms": opened, **await first_token(engine, cached, turn)})
            rows["live"].append({"open_ms": 0.0, **await first_token(engine, live, turn)})
            await engine.close(cached)
            await engine.close(live)
        tg.cancel_scope.cancel()
    for name, samples in rows.items():
        med = {k: round(statistics.median(s[k] for s in samples[1:]), 2) for k in samples[0]}
        print(name, med, "total", round(sum(med.values()), 2), "ms", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--preset", default="recurrentgemma-2b")
    ap.add_argument("--prompt", type=int, default=4000)
    ap.add_argument("--turn", type=int, default=32)
    ap.add_argument("--reps", type=int, default=6)
    anyio.run(main, ap.parse_args())
