"""The batched fp8 products of the decode step, alone: cuBLAS's row-wise
`F.scaled_mm` (what `fast.qlinear.fp8_linear` runs) against ways of putting
more of the GPU's SMs to work on the narrow shapes, whose 128 x 128 output
tiles fill a third of them at 256 rows (bench/NOTES.md D13, D15):

- `streams S`: the product over S slices of K, each a cuBLAS product on its
  own CUDA stream (concurrent in the graph), float32 partials summed by one
  Triton launch with the bias;
- `triton BMxBNxBK/warps/stages[/S]`: a Triton e4m3 x e4m3 tensor-core
  product, S > 1 splitting K in one launch (float32 partials, then the sum);
- `library`: `kernels.fp8_matmul` with its default block (the same kernel).

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
import triton.language as tl

from streamgemma.kernels.fp8_matmul import fp8_matmul

# 2B products: name -> (N, K); q|k|v has no bias
SHAPES = {"qkv": (3072, 2560), "x|y": (5120, 2560), "gate|up": (15360, 2560), "out": (2560, 2560),
          "down": (2560, 7680), "head": (256000, 2560)}
TILES = ["64x64x128/4/4", "64x128x128/4/4", "128x64x128/4/4", "128x128x128/8/3", "64x64x128/4/4/2",
         "64x64x128/4/4/3", "128x64x128/4/4/2", "128x64x128/4/4/3", "64x128x128/4/4/2"]


@triton.jit
def _fp8_mm_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, K_SLICE,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
                   HAS_BIAS: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = pid_k * K_SLICE + tl.arange(0, BK)
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    acc = tl.zeros((BM, BN), tl.float32)
    for _ in range(0, K_SLICE, BK):
        a = tl.load(x_ptrs, mask=(rm < M)[:, None], other=0.0)
        b = tl.load(w_ptrs, mask=(rn < N)[:, None], other=0.0, eviction_policy="evict_first")
        acc = tl.dot(a, tl.trans(b), acc)
        x_ptrs += BK
        w_ptrs += BK
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if SPLIT:  # float32 partial of this K slice
        tl.store(y_ptr + pid_k.to(tl.int64) * M * N + rm[:, None] * N + rn[None, :], acc, mask=mask)
    else:
        acc = acc * tl.load(xs_ptr + rm, mask=rm < M, other=0.0)[:, None]
        acc = acc * tl.load(ws_ptr + rn, mask=rn < N, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16), mask=mask)


@triton.jit
def _sum_kernel(p_ptr, xs_ptr, ws_ptr, b_ptr, y_ptr, M, N, S: tl.constexpr, SCALE: tl.constexpr,
                HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < M * N
    acc = tl.load(p_ptr + i, mask=mask, other=0.0)
    for s in tl.static_range(1, S):
        acc += tl.load(p_ptr + s * M * N + i, mask=mask, other=0.0)
    n = i % N
    if SCALE:
        acc = acc * tl.load(xs_ptr + i // N, mask=mask, other=0.0) * tl.load(ws_ptr + n, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + i, acc.to(tl.bfloat16), mask=mask)


def summed(parts, xs, ws, bias, m, n, scale):
    y = torch.empty(m, n, dtype=torch.bfloat16, device=parts.device)
    block = 1024
    _sum_kernel[(triton.cdiv(m * n, block),)](parts, xs, ws, bias if bias is not None else ws, y, m, n,
                                              S=parts.shape[0], SCALE=scale, HAS_BIAS=bias is not None,
                                              BLOCK=block, num_warps=4)
    return y


def cublas(xq, w, xs, ws, bias):
    rw = F.ScalingType.RowWise
    return F.scaled_mm(xq, w.t(), xs, rw, ws[None, :], rw, bias=bias, output_dtype=torch.bfloat16)


def cublas_streams(xq, w, xs, ws, bias, splits, streams):
    m, k = xq.shape
    step = k // splits
    rw = F.ScalingType.RowWise
    parts = torch.empty(splits, m, w.shape[0], dtype=torch.float32, device=xq.device)
    here = torch.cuda.current_stream()
    for i in range(splits):
        streams[i].wait_stream(here)
        with torch.cuda.stream(streams[i]):
            sl = slice(i * step, (i + 1) * step)
            parts[i] = F.scaled_mm(xq[:, sl], w[:, sl].t(), xs, rw, ws[None, :], rw, output_dtype=torch.float32)
    for i in range(splits):
        here.wait_stream(streams[i])
    return summed(parts, xs, ws, bias, m, w.shape[0], scale=False)


def triton_mm(xq, w, xs, ws, bias, tile):
    bm, bn, bk, warps, stages, *rest = (int(v) for v in tile.replace("x", "/").split("/"))
    splits = rest[0] if rest else 1
    m, k = xq.shape
    n = w.shape[0]
    k_slice = k // splits
    assert k_slice % bk == 0, (tile, k)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), splits)
    out = (torch.empty(splits, m, n, dtype=torch.float32, device=xq.device) if splits > 1
           else torch.empty(m, n, dtype=torch.bfloat16, device=xq.device))
    _fp8_mm_kernel[grid](xq, w, xs, ws, bias if bias is not None else ws, out, m, n, k, k_slice, BM=bm, BN=bn,
                         BK=bk, SPLIT=splits > 1, HAS_BIAS=bias is not None, num_warps=warps, num_stages=stages)
    return summed(out, xs, ws, bias, m, n, scale=True) if splits > 1 else out


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
    p.add_argument("--streams", default="2,3,4", help="K slices of the cuBLAS-on-streams variant ('' to skip)")
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    streams = [torch.cuda.Stream() for _ in range(4)]
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
            for s in filter(None, args.streams.split(",")):
                variants[f"streams {s}"] = lambda c, s=int(s): cublas_streams(xq, c[0], xs, c[1], c[2], s, streams)
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
