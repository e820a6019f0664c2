import dataclasses, time, torch, streamgemma as sg
from streamgemma.bench.prefill import time_feed
from streamgemma.bench.common import token_ids
from streamgemma.kernels import qmatmul
import torch.nn.functional as F

def cuda_ms(fn, n=20):
    fn(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n): fn()
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) / n

for n, k in [(2560, 2560), (15360, 2560), (2560, 7680)]:
    w = torch.randint(-127, 127, (n, k), dtype=torch.int8, device="cuda")
    s = torch.rand(n, device="cuda")
    x = torch.randn(2048, k, device="cuda", dtype=torch.bfloat16)
    wd = qmatmul.dequantize(w, s, torch.bfloat16)
    print(f"{n}x{k}: dequantize {cuda_ms(lambda: qmatmul.dequantize(w, s, torch.bfloat16)):.3f} ms "
          f"({n*k*3/1e9/(cuda_ms(lambda: qmatmul.dequantize(w, s, torch.bfloat16))/1e3):.0f} GB/s), "
          f"F.linear 2048 rows {cuda_ms(lambda: F.linear(x, wd)):.3f} ms", flush=True)

cfg = sg.GriffinConfig.preset("recurrentgemma-2b")
m = sg.Model.random(cfg, seed=0, device="cuda", dtype="bfloat16", quantize="int8")
ids = token_ids(8192, cfg.vocab_size)
for rows in (512, 0, 512):
    m.kernel_config = dataclasses.replace(m.kernel_config, dequantize_rows=rows)
    print("dequantize_rows", rows, "tok/s %.0f" % time_feed(m, ids, 2048)[0], flush=True)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    m.kernel_config = dataclasses.replace(m.kernel_config, dequantize_rows=512)
    time_feed(m, ids[:4096], 2048)
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
