"""The prefill RG-LRU kernel (`rglru_chunk`) at RecurrentGemma-2B shapes, bf16.

1. Per call at T steps x L channels: the launch of one time block (each
   program walks all T steps of its 64 channels in tiles of 32: the kernel as
   it was before time blocks) against the default launch and a sweep of block
   sizes. Microseconds per call (median over CUDA events, back-to-back calls)
   and each launch's error against a float64 sequential scan of the same
   inputs (outputs are bf16; the state is float32).
2. A whole feed (default 8,192 tokens in chunks of 2,048) of the model with
   random weights: wall time and tokens/s, and the RG-LRU kernels' GPU time in
   one profiled feed, for one time block, the default, and the sweep's fastest.

    python bench/dev/rglru_prefill.py [--steps 2048] [--width 2560] [--feed 8192] [--quick]

Smoke test without a GPU (Triton's interpreter, tiny shapes, seconds):
    TRITON_INTERPRET=1 python bench/dev/rglru_prefill.py --device cpu --dtype float32 \\
        --steps 70 --width 40 --preset tiny --feed 80 --chunk 40 --quick --reps 1
"""

import argparse
import dataclasses
import itertools
import statistics
import time

import torch
import triton
from attention_prefill import timed  # a sibling dev tool (run as python bench/dev/...)
from torch.profiler import ProfilerActivity, profile

import streamgemma as sg
from streamgemma.kernels.recurrent_prefill import ScanLaunch, default_scan_launch, rglru_chunk

HEADS = 10  # 2B: 10 heads of 256 channels


def inputs(steps: int, width: int, p0: int, dtype: torch.dtype, dev: str):
    g = torch.Generator().manual_seed(p0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bw = width // HEADS
    # decays 0.9-0.999 at gate 1 (the official initialisation): the state carries far
    a_param = torch.log(1 / torch.empty(width).uniform_(0.9, 0.999, generator=g) - 1)
    args = dict(gates=r(2, HEADS, steps, bw), bx=r(HEADS, bw) * 0.1, ba=r(HEADS, bw) * 0.1, xc=r(steps, width),
                y=r(steps, 2 * width))
    args = {k: v.to(dev, dtype) for k, v in args.items()}
    args["y"] = args["y"][:, width:]  # a view with row stride 2L, as the prefill passes it
    args.update(neg8_softplus_a=(-8.0 * torch.nn.functional.softplus(a_param)).to(dev), p0=p0)
    return args, r(4, width).to(dev)


def reference(args, h0):
    """float64, one step after another: outputs and the final state."""
    steps, width = args["xc"].shape
    gates = args["gates"].double()
    gx = torch.sigmoid(gates[0].transpose(0, 1).reshape(steps, width) + args["bx"].double().reshape(-1))
    ga = torch.sigmoid(gates[1].transpose(0, 1).reshape(steps, width) + args["ba"].double().reshape(-1))
    log_a = args["neg8_softplus_a"].double() * ga
    a, mult = torch.exp(log_a), torch.sqrt(1 - torch.exp(2 * log_a))
    reset = (torch.arange(steps, device=h0.device) + args["p0"] == 0)[:, None]
    a, mult = torch.where(reset, 0.0, a), torch.where(reset, 1.0, mult)
    x = args["xc"].double() * gx * mult
    h, hs = h0.double(), torch.empty(steps, width, dtype=torch.float64, device=h0.device)
    for t in range(steps):
        h = a[t] * h + x[t]
        hs[t] = h
    u = args["y"].double()
    return hs * 0.5 * u * (1 + torch.tanh(0.7978845608028654 * (u + 0.044715 * u ** 3))), h


def rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def per_call(args, h_pool, launches: dict[str, ScanLaunch], reps: int, slot: int = 1):
    want_out, want_h = reference(args, h_pool[slot])
    out = torch.empty(args["xc"].shape, dtype=args["xc"].dtype, device=h_pool.device)
    rows = []
    for name, ln in launches.items():
        h = h_pool.clone()
        rglru_chunk(h_state=h, slot=slot, out=out, launch=ln, **args)
        err_out, err_h = rel(out, want_out), rel(h[slot], want_h)
        us = timed(lambda: rglru_chunk(h_state=h, slot=slot, out=out, launch=ln, **args),
                   reps if torch.cuda.is_available() else 1, "cuda" if torch.cuda.is_available() else "cpu")
        rows.append((us, name, ln, err_out, err_h))
        print(f"  {name:>44}: {us:8.1f} us/call   error: out {err_out:.1e}, state {err_h:.1e}", flush=True)
    return rows


def feed_variants(preset: str, dtype: str, dev: str, feed: int, chunk: int,
                  launches: dict[str, ScanLaunch | None], reps: int):
    model = sg.Model.random(sg.GriffinConfig.preset(preset), device=dev, dtype=dtype, kernels=True)
    model.prefill_chunk = chunk
    ids = torch.randint(3, model.config.vocab_size, (feed,), generator=torch.Generator().manual_seed(0)).tolist()
    cuda = dev == "cuda"

    def one_feed():
        s = model.session()
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        s.feed(ids)
        if cuda:
            torch.cuda.synchronize()
        s.close()
        return time.perf_counter() - t

    one_feed()  # builds the kernel prefill (a dev tool may reach into the model for it)
    prefill = model._kernel_prefill
    for name, ln in launches.items():
        prefill.rglru_launch = ln
        one_feed()  # compiles this launch's kernels
        secs = statistics.median(one_feed() for _ in range(reps))
        gpu = ""
        if cuda:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                one_feed()
            kernels = {e.key: e.self_device_time_total for e in prof.key_averages()}
            scan_ms = sum(v for k, v in kernels.items() if "rglru" in k) / 1e3
            gpu = f"; GPU: RG-LRU {scan_ms:6.1f} ms of {sum(kernels.values()) / 1e3:6.1f} ms (profiled feed)"
        print(f"  {name:>44}: {secs * 1e3:8.1f} ms median of {reps} ({feed / secs:8.0f} tokens/s){gpu}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2048)
    ap.add_argument("--width", type=int, default=2560, help="a multiple of 10 (heads)")
    ap.add_argument("--feed", type=int, default=8192, help="tokens of the whole-model feed (0: none)")
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=20, help="timed calls per launch (feeds: a quarter)")
    ap.add_argument("--preset", default="recurrentgemma-2b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quick", action="store_true", help="a smaller sweep")
    args = ap.parse_args()
    if args.width % HEADS:
        raise SystemExit(f"--width must be a multiple of the {HEADS} heads, got {args.width}")
    dev, dtype = args.device, getattr(torch, args.dtype)
    if dev == "cuda":
        print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    steps, width = args.steps, args.width
    one = ScanLaunch(block=64, tile=32, time_block=triton.next_power_of_2(steps))
    launches = {"one time block (before)": one, f"default {default_scan_launch(steps, width)}":
                default_scan_launch(steps, width)}
    sweep = ((64,), (32,), (64, 128), (4,)) if args.quick else ((32, 64, 128), (16, 32), (64, 128, 256), (4, 8))
    for b, tt, tb, w in itertools.product(*sweep):
        if tb >= tt:
            launches[f"block {b} tile {tt} time block {tb} warps {w}"] = ScanLaunch(b, tt, tb, w)
    for p0 in (4096, 0):  # continuing a session; from position 0 (the reset step)
        call_args, h_pool = inputs(steps, width, p0, dtype, dev)
        print(f"per call, T = {steps}, L = {width}, p0 = {p0}:")
        rows = per_call(call_args, h_pool, launches, args.reps)
    best = min(rows[1:], key=lambda r: r[0])
    print("the fastest with 2 and 16 warps:")
    rows += per_call(call_args, h_pool, {f"{best[1]} -> {w}": dataclasses.replace(best[2], num_warps=w)
                                         for w in (2, 16)}, args.reps)
    ranked = sorted(rows, key=lambda r: r[0])
    print("fastest five (p0 = 0):", *(f"{r[0]:8.1f} us {r[2]}" for r in ranked[:5]), sep="\n  ")
    if args.feed:
        fastest = next(r[2] for r in ranked if r[2] != one)
        print(f"feed of {args.feed} tokens in chunks of {args.chunk}:")
        feed_variants(args.preset, args.dtype, dev, args.feed, args.chunk, {
            "one time block (before)": ScanLaunch(block=64, tile=32, time_block=triton.next_power_of_2(args.chunk)),
            "default (by chunk shape)": None, f"fastest {fastest}": fastest}, max(1, args.reps // 4))


if __name__ == "__main__":
    main()
