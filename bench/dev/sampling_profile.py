"""Per call of `PendingIds` over B rows of 256,000 logits, eager and from the
model's CUDA graphs of the filters: host issue time, wall time until the ids
are on the host, and the GPU time by kernel (PyTorch profiler). Settings
with top_k run the small-top_k path (`kernels.filter_smallk`) as the sampler
picks it, and again as "<name>_radix" with the radix pipeline it replaces.

    python bench/dev/sampling_profile.py --json profile.json      # CUDA only
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from streamgemma.sampling.filters import device_kernel
from streamgemma.sampling.graphs import FilterGraphs
from streamgemma.sampling.params import SamplingParams
from streamgemma.sampling.sampler import PendingIds, SampleRow

SETTINGS = {"plain": dict(temperature=0.8), "top_p": dict(temperature=0.8, top_p=0.95),
            "serve": dict(temperature=0.8, top_k=40, top_p=0.95), "min_p": dict(temperature=0.8, min_p=0.05)}


def measure(x: torch.Tensor, params: SamplingParams, graphs, calls: int) -> dict:
    counter = iter(range(10 ** 9))
    kw = {} if graphs is None else {"graphs": graphs}

    def call():
        rows = [SampleRow(params, (i, next(counter))) for i in range(x.shape[0])]
        start = time.perf_counter()
        pending = PendingIds(x, rows, **kw)
        issued = time.perf_counter()
        pending.ids()
        return issued - start, time.perf_counter() - start

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    times = [call() for _ in range(calls)]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    kernels = collections.Counter()
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.device_time_total > 0:
            kernels[e.key[:40]] += e.device_time_total / calls
    return {"issue_ms": round(1e3 * sorted(t[0] for t in times)[calls // 2], 3),
            "wall_ms": round(1e3 * sorted(t[1] for t in times)[calls // 2], 3),
            "gpu_us": round(sum(kernels.values()), 1),
            "kernels_us": sorted(((k, round(v, 1)) for k, v in kernels.items()), key=lambda kv: -kv[1])[:10]}


def radix_kernel(*args, small_k: int = 0, **kwargs):
    """The device kernel with the small-top_k path off: the radix pipeline."""
    return device_kernel("cuda")(*args, **kwargs)


def radix_eager(*args, staged: bool = False, **kwargs):
    """Stands in for `FilterGraphs` in `sample_filtered`: eager, radix pipeline."""
    return radix_kernel(*args, **kwargs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--vocab", type=int, default=256_000)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--json")
    args = ap.parse_args()
    out = {}
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.randn(batch, args.vocab, device="cuda")
        runs = [(name, setting, mode, False) for name, setting in SETTINGS.items() for mode in ("eager", "graphed")]
        runs += [(f"{name}_radix", setting, mode, True) for name, setting in SETTINGS.items() if "top_k" in setting
                 for mode in ("eager", "graphed")]
        for name, setting, mode, radix in runs:
            if radix:
                graphs = FilterGraphs(radix_kernel) if mode == "graphed" else radix_eager
            else:
                graphs = FilterGraphs(device_kernel("cuda")) if mode == "graphed" else None
            r = measure(x, SamplingParams(**setting), graphs, args.calls)
            out[f"B{batch}_{name}_{mode}"] = r
            print(f"B{batch:<4} {name:11} {mode:8} issue {r['issue_ms']:.3f} ms  wall {r['wall_ms']:.3f} ms  "
                  f"gpu {r['gpu_us']:.1f} us  {r['kernels_us'][:4]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
