"""What `Session.generate` costs beyond the decode step at batch 1
(RecurrentGemma-2B shapes, random bf16 weights): per token, the graph replay
alone against the whole generate loop (sampling, copies, bookkeeping), for
several rounds. With --trace, the GPU work of a few
generated tokens outside the decode graph, by name (profiler).

    python bench/dev/generate_overhead.py [--tokens 256] [--rounds 3] [--trace] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

import streamgemma as sg
from streamgemma.bench.decode import time_generate


def graph_replay_ms(model: sg.Model, replays: int = 200, reps: int = 5, bucket: int = 1) -> float:
    """GPU time of one step: the median over `reps` of the mean time of
    `replays` back-to-back replays of the captured graph of `bucket` (captured
    by an earlier decode of that batch bucket; it replays its last inputs),
    each with the soft-cap launched after it where the graph ends before it."""
    graphed = model._graphed
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(replays):
            graphed.replay(bucket)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / replays)
    return sorted(times)[len(times) // 2]


def trace(model: sg.Model, tokens: int = 16) -> dict:
    """GPU time by op name over `tokens` generated tokens, decode-graph kernels excluded."""
    from torch.profiler import ProfilerActivity, profile

    s = model.session(seed=0)
    s.feed([2, 3])
    list(s.generate(max_tokens=4, stop_token_ids=[]))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        list(s.generate(max_tokens=tokens, stop_token_ids=[]))
        torch.cuda.synchronize()
    s.close()
    graph_kernels = ("_gemv_kernel", "_rglru_decode_kernel", "_attn_partial_kernel", "_attn_combine_kernel")
    out = {}
    for e in prof.key_averages():
        if e.device_time_total > 0 and not e.key.startswith(graph_kernels):
            out[e.key[:80]] = {"count": e.count, "us_per_token": e.device_time_total / tokens}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = sg.Model.random(sg.GriffinConfig.preset("recurrentgemma-2b"), device="cuda", dtype="bfloat16")
    results = {"device": torch.cuda.get_device_name(), "rows": []}
    for rnd in range(args.rounds):
        row = {"round": rnd, "generate_ms": time_generate(model, args.tokens) * 1e3,
               "replay_ms": graph_replay_ms(model)}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.trace:
        results["trace"] = trace(model)
        for name, v in sorted(results["trace"].items(), key=lambda kv: -kv[1]["us_per_token"]):
            print(f"{v['us_per_token']:8.2f} us/token  x{v['count']:<4} {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
