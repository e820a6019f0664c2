"""Where a batch-1 decode step spends its time (RecurrentGemma-2B shapes, bf16
or --quantize int8 / fp8, a decode_variants.py --variant): kernel time by
kernel name from the PyTorch profiler (eager step), the graph replay alone,
and the full `Model.decode` call (host work included).

    python bench/dev/profile_decode.py [--batch 1] [--quantize fp8] [--variant words]
"""

import argparse
import time

import torch
from decode_variants import kernel_config, random_model  # a sibling dev tool (run as python bench/dev/...)
from torch.profiler import ProfilerActivity, profile

import streamgemma as sg
from streamgemma.bench.decode import sessions_at


def median_ms(fn, n=50):
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--quantize", choices=("int8", "fp8", "int4"))
    ap.add_argument("--variant", default="base", help="a decode_variants.py variant name")
    args = ap.parse_args()
    model = random_model(sg.GriffinConfig.preset("recurrentgemma-2b"), quantize=args.quantize)
    model.kernel_config = kernel_config(args.variant)
    sessions = sessions_at(model, args.batch, 100)  # held: a collected session frees its slot
    slots = [s.slot for s in sessions]
    tokens = [1] * args.batch
    model.decode(slots, tokens)  # builds the decoder, captures the graph
    dec = model._kernel_decoder
    dev = "cuda"
    t = torch.tensor(tokens, device=dev)
    s = torch.tensor(slots, device=dev)
    p = torch.tensor([100] * args.batch, device=dev)
    for _ in range(3):
        dec.step(t, s, p)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            dec.step(t, s, p)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    bucket = model._graphed._bucket(args.batch)
    print(f"graph replay alone (+ soft-cap after it above the GEMV batches): "
          f"{median_ms(lambda: model._graphed.replay(bucket, args.batch)):.3f} ms")
    print(f"eager kernel step:  {median_ms(lambda: dec.step(t, s, p)):.3f} ms")
    print(f"Model.decode:       {median_ms(lambda: model.decode(slots, tokens)):.3f} ms")
    print(f"decode + argmax to host: {median_ms(lambda: model.decode(slots, tokens).argmax(-1).tolist()):.3f} ms")


if __name__ == "__main__":
    main()
