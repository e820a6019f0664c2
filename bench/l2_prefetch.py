"""Batch-1 decode with the GEMV kernels prefetching their weights into L2
before their PDL wait (`kernels.gemv.L2_PREFETCH_BYTES`: bytes per launch
the first programs request with cp.async.bulk.prefetch), for a few budgets.

    python bench/l2_prefetch.py [--mb 0,4,8,16,32] [--steps 128] [--repeats 3]

Prints ms/step at batch 1 per budget (best and median of --repeats runs of
--steps steps) and whether the first step's logits equal those of budget 0
(a prefetch only moves data into a cache: they must be bit-identical).
RecurrentGemma-2B shapes, random bf16 weights, state filled at position 100.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import streamgemma as sg
from decode import fill_random_state, random_model, time_decode
from streamgemma.kernels import gemv


def first_logits(model: sg.Model) -> torch.Tensor:
    s = model.session()
    fill_random_state(model, [s.slot], 100)
    out = model.decode([s.slot], [7]).clone()
    s.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", default="0,4,8,16,32")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    model = random_model(sg.GriffinConfig.preset("recurrentgemma-2b"))
    results = {"device": torch.cuda.get_device_name(), "ms_per_step": {}}
    base = None
    for mb in (float(x) for x in args.mb.split(",")):
        gemv.L2_PREFETCH_BYTES["bytes"] = int(mb * 2**20)
        if model._graphed is not None:
            model._graphed._graphs.clear()  # recapture with the new launch arguments
        logits = first_logits(model)
        same = True if base is None else torch.equal(logits, base)
        base = logits if base is None else base
        times = [time_decode(model, 1, args.steps) * 1e3 for _ in range(args.repeats)]
        results["ms_per_step"][mb] = times
        print(f"prefetch {mb:5.1f} MB per launch: best {min(times):.3f} ms, median {statistics.median(times):.3f} ms "
              f"({1e3 / min(times):.0f} tokens/s); logits equal to budget 0: {same}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
