"""Batch-1 decode variants side by side, in one process (RecurrentGemma-2B
shapes, random bf16 weights): each variant's logits and state against the
PyTorch reference step, then its graph replay time and step-loop time, the
variants taken in turn for several rounds so drift shows.

A variant is a setting of `kernels/gemv.py`'s STREAM_OPTIONS and
CONFIG_OVERRIDE (see VARIANTS): "base" (the defaults), "noevict" (no L2
eviction hints), "depth3" (three weight tiles in flight per program), "xpipe"
(each input tile requested an iteration ahead), "xy2x512" (x|y product in
programs of 2 features x 512 columns). A checkout without STREAM_OPTIONS runs
"base" only, so an older tree can be timed by the same script.

    python bench/decode_variants.py [--variants base,depth3] [--positions 100,3000] [--rounds 2]
                                    [--batches 64,256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import streamgemma as sg
from decode import fill_random_state, random_model, time_decode

# name: (STREAM_OPTIONS changes, CONFIG_OVERRIDE entries); "+" joins variants
XY = (1, "conv", 5120, 2560)  # CONFIG_OVERRIDE keys at 2B shapes, batch 1: the x|y product
LM = (1, "softcap", 256000, 2560)  # the LM head
VARIANTS = {"base": ({}, {}), "noevict": ({"evict": False}, {}), "depth3": ({"depth": 3}, {}),
            "xpipe": ({"xpipe": True}, {}), "noxpipe": ({"xpipe": False}, {}),
            "xy2x512": ({}, {XY: (2, 512, 2)}), "xy4x256": ({}, {XY: (4, 256, 2)}), "xy8x256": ({}, {XY: (8, 256, 2)}),
            "lm4x512": ({}, {LM: (4, 512, 4)}), "lm8x256": ({}, {LM: (8, 256, 4)}), "lm2x1024": ({}, {LM: (2, 1024, 4)})}


def variant(name: str) -> tuple[dict, dict]:
    opts, configs = {}, {}
    for part in name.split("+"):
        opts.update(VARIANTS[part][0])
        configs.update(VARIANTS[part][1])
    return opts, configs


_DEFAULTS: dict = {}


def apply(model: sg.Model, name: str) -> None:
    """Set the variant's options and drop captured graphs (they hold the old kernels)."""
    from streamgemma.kernels import gemv

    opts = getattr(gemv, "STREAM_OPTIONS", None)
    if opts is None:
        if name != "base":
            raise SystemExit(f"this checkout has no STREAM_OPTIONS: variant {name!r} cannot run")
    else:
        _DEFAULTS.setdefault("opts", dict(opts))
        opts.clear()
        opts.update(_DEFAULTS["opts"], **variant(name)[0])
    gemv.CONFIG_OVERRIDE.clear()
    gemv.CONFIG_OVERRIDE.update(variant(name)[1])
    if model._graphed is not None:
        model._graphed._graphs.clear()


def check(model: sg.Model, ref: sg.Model, position: int) -> dict:
    """One step at batch 1 from the same random state: kernel path vs reference."""
    out = {}
    for m in (ref, model):
        s = m.session()
        fill_random_state(m, [s.slot], position)
        logits = m.decode([s.slot], [5]).float().clone()
        state = [t[s.slot].float().clone() for layer in m.pool.layers for t in layer]
        out[m is model] = (logits, state)
        s.close()
    (want, want_state), (got, got_state) = out[False], out[True]
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    return {"logits_rel_err": rel(got, want), "state_rel_err": max(rel(g, w) for g, w in zip(got_state, want_state)),
            "top1_equal": bool(got.argmax() == want.argmax())}


def replay_ms(model: sg.Model, position: int, replays: int = 200, reps: int = 5) -> float:
    """Median over reps of the mean graph replay time (batch 1, GPU time only)."""
    s = model.session()
    fill_random_state(model, [s.slot], position)
    model.decode([s.slot], [1])  # captures the graph
    g = model._graphed._graphs[1]
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(replays):
            g["graph"].replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / replays)
    s.close()
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="base,noevict,xpipe,xy2x512")
    ap.add_argument("--positions", default="3000")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batches", default="", help="also time these batches (step loop), first variant, first round "
                    "(the variants change only the batch-1 products)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cfg = sg.GriffinConfig.preset("recurrentgemma-2b")
    model = random_model(cfg)
    ref = sg.Model(model.network, kernels=False)
    variants = args.variants.split(",")
    positions = [int(p) for p in args.positions.split(",")]
    results = {"device": torch.cuda.get_device_name(), "checks": {}, "timings": []}
    for name in variants:
        apply(model, name)
        results["checks"][name] = check(model, ref, positions[-1])
        print(name, "check", results["checks"][name], flush=True)
    del ref
    for rnd in range(args.rounds):
        for name in variants:
            apply(model, name)
            for p in positions:
                row = {"variant": name, "round": rnd, "position": p, "replay_ms": replay_ms(model, p),
                       "loop_ms": time_decode(model, 1, args.steps, p) * 1e3}
                results["timings"].append(row)
                print(json.dumps(row), flush=True)
            if rnd == 0 and name == variants[0]:
                for b in [int(x) for x in args.batches.split(",") if x]:
                    t0 = time.perf_counter()
                    sec = time_decode(model, b, 32, 3000)
                    row = {"variant": name, "batch": b, "tokens_per_s": b / sec, "wall_s": time.perf_counter() - t0}
                    results["timings"].append(row)
                    print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
