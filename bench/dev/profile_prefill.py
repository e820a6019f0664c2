"""Where a prefill (`Session.feed`) spends its time, RecurrentGemma-2B shapes, bf16:
wall time for several prompt lengths and the profiler's top operators.

    python bench/dev/profile_prefill.py [--tokens 512] [--chunk 2048]
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import streamgemma as sg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=2048)
    args = ap.parse_args()
    model = sg.Model.random(sg.GriffinConfig.preset("recurrentgemma-2b"), device="cuda", dtype="bfloat16")
    model.prefill_chunk = args.chunk
    ids = torch.randint(3, 256_000, (max(4096, args.tokens),), generator=torch.Generator().manual_seed(0)).tolist()
    # each length twice: the first call of a new length shows any per-shape set-up cost
    for n in (16, 128, 512, 2048, 4096, 17, 33, 100, 1000):
        for rep in range(2):
            s = model.session()
            torch.cuda.synchronize()
            t = time.perf_counter()
            s.feed(ids[:n])
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t) * 1e3
            s.close()
            print(f"feed {n:5d} tokens ({'first' if rep == 0 else 'again'}): {ms:8.2f} ms "
                  f"({n / ms * 1e3:8.0f} tokens/s)", flush=True)
    s = model.session()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        s.feed(ids[: args.tokens])
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
