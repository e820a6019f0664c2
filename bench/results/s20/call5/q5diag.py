"""Session 20's int8 prefill diagnosis (calls 5-6): the dequantize kernel and F.linear per 2B shape,
then `bench prefill`'s feed with KernelConfig.dequantize_rows 512 / 0 / 512, then a CUDA profile."""
import dataclasses

import torch
import torch.nn.functional as F

import streamgemma as sg
from streamgemma.bench.common import token_ids
from streamgemma.bench.prefill import time_feed
from streamgemma.kernels import qmatmul


def cuda_ms(fn, n=20):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n


for n, k in [(2560, 2560), (15360, 2560), (2560, 7680)]:
    w = torch.randint(-127, 127, (n, k), dtype=torch.int8, device="cuda")
    s = torch.rand(n, device="cuda")
    x = torch.randn(2048, k, device="cuda", dtype=torch.bfloat16)
    wd = qmatmul.dequantize(w, s, torch.bfloat16)
    ms = cuda_ms(lambda: qmatmul.dequantize(w, s, torch.bfloat16))
    print(f"{n}x{k}: dequantize {ms:.3f} ms ({n * k * 3 / 1e9 / (ms / 1e3):.0f} GB/s), "
          f"F.linear 2048 rows {cuda_ms(lambda: F.linear(x, wd)):.3f} ms", flush=True)

cfg = sg.GriffinConfig.preset("recurrentgemma-2b")
m = sg.Model.random(cfg, seed=0, device="cuda", dtype="bfloat16", quantize="int8")
ids = token_ids(8192, cfg.vocab_size)
for rows in (512, 0, 512):
    m.kernel_config = dataclasses.replace(m.kernel_config, dequantize_rows=rows)
    print("dequantize_rows", rows, f"tok/s {time_feed(m, ids, 2048)[0]:.0f}", flush=True)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    m.kernel_config = dataclasses.replace(m.kernel_config, dequantize_rows=512)
    time_feed(m, ids[:4096], 2048)
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
