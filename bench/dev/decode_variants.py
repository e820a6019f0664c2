"""Batch-1 decode variants side by side, in one process (RecurrentGemma-2B
shapes, random bf16 weights): each variant's logits and state against the
PyTorch reference step, then its graph replay time and step-loop time, the
variants taken in turn for several rounds so drift shows.

A variant is a `KernelConfig` (streamgemma/fast/tuning.py) built from parts:
GEMV block shapes (VARIANTS), RG-LRU launch shapes (RGLRU), attention key
tiles (ATTN), or "nopdl" (plain launches); "+" joins them, "base" is the
defaults. An older checkout can be timed by the same script ("base"), in its
own process, for an A/B on one machine.

    python bench/dev/decode_variants.py [--variants base,up4x256+xy8x256] [--positions 100,3000]
                                    [--rounds 2] [--batches 64,256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from generate_overhead import graph_replay_ms  # a sibling dev tool (run as python bench/dev/...)

import streamgemma as sg
from streamgemma.bench.decode import time_decode
from streamgemma.fast.tuning import KernelConfig
from streamgemma.model.griffin import Griffin

# name: KernelConfig.gemv_blocks entries, keyed (batch bucket, epilogue, N, K) at 2B shapes, batch 1
XY, UP, LM = (1, "conv", 5120, 2560), (1, "geglu", 15360, 2560), (1, "softcap", 256000, 2560)
DOWN, OUT, QKV = (1, "plain", 2560, 7680), (1, "plain", 2560, 2560), (1, "plain", 3072, 2560)
VARIANTS = {"base": {}, "nopdl": {},
            "xy8x256": {XY: (8, 256, 2)}, "xy4x256": {XY: (4, 256, 2)}, "xy2x512": {XY: (2, 512, 2)},
            "up2x512": {UP: (2, 512, 2)}, "up4x256": {UP: (4, 256, 2)}, "up4x128": {UP: (4, 128, 2)},
            "down2x1024": {DOWN: (2, 1024, 4)}, "out4x256": {OUT: (4, 256, 2)}, "qkv4x256": {QKV: (4, 256, 2)},
            "lm2x512": {LM: (2, 512, 2)}, "lm8x256": {LM: (8, 256, 4)}, "lm16x256": {LM: (16, 256, 4)}}
# RG-LRU programs (channels per program, warps) and attention key tiles at batch 1
RGLRU = {"rg16": (16, 4), "rg64": (64, 4), "rg32w4": (32, 4), "rg32w8": (32, 8), "rg16w2": (16, 2)}
ATTN = {"att32": 32, "att16": 16}


def random_model(cfg: sg.GriffinConfig, dtype=torch.bfloat16) -> sg.Model:
    """Random weights drawn on the GPU (a 2B model in seconds)."""
    with torch.device("meta"):
        net = Griffin(cfg, dtype=dtype)
    net = net.to_empty(device="cuda")
    net.init_random_(torch.Generator(device="cuda").manual_seed(0))
    return sg.Model(net, source="random 2B shapes")


def fill_random_state(model: sg.Model, slots: list[int], position: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    for layer in model.pool.layers:
        for t in layer:
            t.copy_(torch.randn(t.shape, generator=g, device="cuda").to(t.dtype) * 0.5)
    for s in slots:
        model.pool.positions[s] = position




def kernel_config(name: str) -> KernelConfig:
    """The KernelConfig of a variant name ("+" joins parts)."""
    parts = name.split("+")
    gemv_blocks, attention_blocks, rglru_launch = {}, {}, None
    for part in parts:
        if part in RGLRU:
            rglru_launch = RGLRU[part]
        elif part in ATTN:
            attention_blocks[1] = ATTN[part]
        else:
            gemv_blocks.update(VARIANTS[part])
    return KernelConfig(gemv_blocks=gemv_blocks, attention_blocks=attention_blocks, rglru_launch=rglru_launch,
                        pdl=False if "nopdl" in parts else None)


def apply(model: sg.Model, name: str) -> None:
    """Switch the model to the variant: its next decode builds a new decoder and captures new graphs."""
    model.kernel_config = kernel_config(name)


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


def replay_ms(model: sg.Model, position: int) -> float:
    """GPU time of one batch-1 step at `position` (graph replays back to back)."""
    s = model.session()
    fill_random_state(model, [s.slot], position)
    model.decode([s.slot], [1])  # captures the graph
    ms = graph_replay_ms(model)
    s.close()
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="base,nopdl")
    ap.add_argument("--positions", default="3000")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batches", default="", help="also time these batches (step loop), first variant, first round "
                    "(the variants change only the batch-1 products)")
    ap.add_argument("--grow-before-round", type=int, default=-1,
                    help="before this round, grow the state pool to 256+ sessions (moves every slot's state)")
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
        if rnd == args.grow_before_round:
            sessions = [model.session() for _ in range(257)]
            for s in sessions:
                s.close()
            print("pool capacity now", model.pool.capacity, flush=True)
            results["timings"].append({"pool_capacity": model.pool.capacity, "before_round": rnd})
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
