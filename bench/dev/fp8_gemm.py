"""The batched fp8 products of the decode step, alone: cuBLAS's row-wise
`F.scaled_mm` (what `fast.qlinear.fp8_linear` runs) against ways of putting
more of the GPU's SMs to work on the narrow shapes, whose 128 x 128 output
tiles fill a third of them at 256 rows (bench/NOTES.md D13, D15):

- `triton BMxBNxBK/warps/stages[/S]`: `kernels.fp8_matmul` with that
  block, S > 1 splitting K (float32 partials, summed by a second launch);
- `library`: the same with its default block.

(Session 21's first run also timed cuBLAS products over K slices on CUDA
streams, with a copy of the kernel in this script: slower everywhere,
bench/NOTES.md D15; removed since.)

Each variant is one CUDA graph of --reps products over weight copies that
together exceed the L2 (as in the step, where every weight comes from HBM);
us per product, and the error against cuBLAS's product.

    python bench/dev/fp8_gemm.py --rows 64,256 --json fp8_gemm.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
import triton

from streamgemma.kernels.fp8_matmul import fp8_matmul

# 2B products: name -> (N, K); q|k|v has no bias
SHAPES = {"qkv": (3072, 2560), "x|y": (5120, 2560), "gate|up": (15360, 2560), "out": (2560, 2560),
          "down": (2560, 7680), "head": (256000, 2560)}
TILES = ["64x64x128/4/4", "64x128x128/4/4", "128x64x128/4/4", "128x128x128/8/3", "64x64x128/4/4/2",
         "64x64x128/4/4/3", "128x64x128/4/4/2", "128x64x128/4/4/3", "64x128x128/4/4/2"]


def cublas(xq, w, xs, ws, bias):
    rw = F.ScalingType.RowWise
    return F.scaled_mm(xq, w.t(), xs, rw, ws[None, :], rw, bias=bias, output_dtype=torch.bfloat16)


def triton_mm(xq, w, xs, ws, bias, tile):
    bm, bn, bk, warps, stages, *rest = (int(v) for v in tile.replace("x", "/").split("/"))
    return fp8_matmul(xq, xs, w, ws, bias, block=(bm, bn, bk, warps, stages, rest[0] if rest else 1))


def time_graph(fn, copies, reps):
    """us per product: one graph of `reps` products over the weight copies in turn."""
    fn(copies[0])  # compile
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(copies[0])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(copies[i % len(copies)])
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / reps)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="64,256")
    p.add_argument("--shapes", default="qkv,x|y,gate|up,out,down")
    p.add_argument("--tiles", default=",".join(TILES))
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    results = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        ncopies = max(2, (160 << 20) // (n * k))  # > the L2 together
        copies = []
        for _ in range(ncopies):
            w = (torch.randn(n, k, device=dev) / 2).to(torch.float8_e4m3fn)
            copies.append((w, torch.rand(n, device=dev) / 100 + 1e-3,
                           None if name == "qkv" else torch.randn(n, device=dev).to(torch.bfloat16)))
        for m in (int(r) for r in args.rows.split(",")):
            xq = (torch.randn(m, k, device=dev) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
            xs = torch.rand(m, 1, device=dev) / 100 + 1e-3
            want = cublas(xq, *copies[0][:1], xs, *copies[0][1:]).float()
            variants = {"cublas": lambda c: cublas(xq, c[0], xs, c[1], c[2]),
                        "library": lambda c: fp8_matmul(xq, xs, c[0], c[1], c[2])}
            for tile in filter(None, args.tiles.split(",")):
                variants[f"triton {tile}"] = lambda c, tile=tile: triton_mm(xq, c[0], xs.view(-1), c[1], c[2], tile)
            for label, fn in variants.items():
                try:
                    got = fn(copies[0]).float()
                    err = ((got - want).norm() / want.norm()).item()
                    us = time_graph(fn, copies, args.reps)
                except Exception as e:  # noqa: BLE001 - a tile that does not compile is reported, not fatal
                    print(f"{name:8s} M={m:4d} {label:28s} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                tb = n * k / us / 1e6
                print(f"{name:8s} M={m:4d} {label:28s} {us:8.2f} us  {tb:5.2f} TB/s of weights  err {err:.1e}",
                      flush=True)
                results.append({"shape": name, "n": n, "k": k, "m": m, "variant": label, "us": us, "rel_err": err})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
