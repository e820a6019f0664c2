"""Prefill attention per call: PyTorch's memory-efficient SDPA with the mask (the
earlier path, `fast.prefill.sdpa_attention`) against the Triton sliding-window
kernel (kernels/attention_prefill.py) at several tile shapes; microseconds per
call, TFLOP/s over the keys inside the windows, error against float32 math.
`--feed N` then times whole feeds of a RecurrentGemma-2B-shaped model (random
bf16 weights) with each attention path and each `--chunks` size,
interleaved so drift shows.

"programs" is the kernel's grid, T * H / block_m: on a GPU of 132 SMs that
run one program each (block_m 128 at hd 256 takes most of an SM's shared
memory), 160 programs are two waves, the second 21% full.

    python bench/dev/attention_prefill.py                      # T 2048, H 10, hd 256, window 2048
    python bench/dev/attention_prefill.py --tokens 1664,2048,3328 --tiles 128,64,8,2 64,64,4,2
    python bench/dev/attention_prefill.py --feed 8192 --chunks 2048,3328 --json attn.json
    python bench/dev/attention_prefill.py --device cpu         # smoke test: tiny shapes, Triton's interpreter
    python bench/dev/attention_prefill.py --compile-only       # no GPU: each tile shape compiled for sm_90

--compile-only prints, per tile shape, what Triton's compiler and its bundled
cuobjdump say without a GPU: shared memory (at most 227 KB per program on an
H100), registers and stack per thread (255 is the cap; stack or local bytes
are spills), and whether the key/value loads became asynchronous copies and
the dots wgmma instructions.
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

# (block_m, block_n, num_warps, num_stages); shared memory per program about
# 2 * hd * (block_m + 2 * block_n * stages) bytes, at most 227 KB on an H100
DEFAULT_TILES = ["128,64,8,2", "128,64,8,1", "128,32,8,3", "128,32,8,4", "64,64,4,2", "64,64,4,3", "64,64,8,2",
                 "64,32,4,2", "64,32,4,3", "32,64,4,2", "32,32,4,2"]


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tokens", help="queries per call, comma-separated (default 2048; cpu: 40)")
    ap.add_argument("--window", type=int, help="attention window (default 2048; cpu: 16)")
    ap.add_argument("--heads", type=int, help="query heads (default 10; cpu: 3)")
    ap.add_argument("--head-dim", type=int, help="head dim (default 256; cpu: 16)")
    ap.add_argument("--p0", default=None, help="positions of the chunk's first token, comma-separated "
                    "(default: 0, one window, three windows: first chunk, full ring, wrapped ring)")
    ap.add_argument("--tiles", nargs="*", default=None,
                    help="block_m,block_n,num_warps,num_stages per config (default: a sweep; cpu: 16,16,4,1)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--feed", type=int, default=0, help="also time feeds of this many tokens (2B shapes, cuda)")
    ap.add_argument("--chunks", default="2048", help="prefill chunk sizes of the feeds, comma-separated")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--compile-only", action="store_true", help="compile each tile shape for --arch, no GPU needed")
    ap.add_argument("--arch", type=int, default=90, help="compute capability of --compile-only (default 90)")
    args = ap.parse_args()
    small = args.device == "cpu"
    args.tokens = [int(t) for t in (args.tokens or ("40" if small else "2048")).split(",")]
    args.chunks = [int(c) for c in args.chunks.split(",")]
    args.window = args.window or (16 if small else 2048)
    args.heads = args.heads or (3 if small else 10)
    args.head_dim = args.head_dim or (16 if small else 256)
    args.p0 = [int(p) for p in (args.p0 or f"0,{args.window},{3 * args.window}").split(",")]
    tiles = args.tiles or (["16,16,4,1"] if small else DEFAULT_TILES)
    args.tiles = [tuple(int(v) for v in t.split(",")) for t in tiles]
    if small:
        args.reps = min(args.reps, 2)
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when a kernel is defined: before the imports
    return args


def compile_only(args) -> list[dict]:
    import subprocess
    import tempfile
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from streamgemma.kernels import attention_prefill

    sig = {"q_ptr": "*bf16", "q_stride": "i32", "ring_k_ptr": "*bf16", "ring_v_ptr": "*bf16", "k_ptr": "*bf16",
           "v_ptr": "*bf16", "kv_stride": "i32", "out_ptr": "*bf16", "p0": "i32", "prev": "i32", "T": "i32",
           "W": "i32", "H": "i32", "qk_scale": "fp32", "HD": "constexpr", "BM": "constexpr", "BN": "constexpr",
           "IEEE": "constexpr"}
    names = list(sig)
    # what Triton specializes at launch on the real tensors: aligned pointers, strides and window divisible by 16
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if sig[n].startswith("*") or n in ("q_stride", "kv_stride", "W")}
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    rows = []
    for bm, bn, warps, stages in args.tiles:
        name = f"{bm},{bn},{warps},{stages}"
        const = {"HD": args.head_dim, "BM": bm, "BN": bn, "IEEE": False}
        try:
            kernel = triton.compile(ASTSource(attention_prefill._attn_prefill_kernel, sig, const, attrs),
                                    target=GPUTarget("cuda", args.arch, 32),
                                    options={"num_warps": warps, "num_stages": stages})
        except Exception as e:
            print(f"{name:>12}: failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)
            rows.append({"variant": name, "error": str(e)[:300]})
            continue
        with tempfile.TemporaryDirectory() as d:
            cubin = Path(d) / "k.cubin"
            cubin.write_bytes(kernel.asm["cubin"])
            usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                                   text=True).stdout
        res = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
        ttgir = kernel.asm["ttgir"]
        row = {"variant": name, "shared_KB": kernel.metadata.shared / 1024, **{k: int(v) for k, v in res.items()},
               "async_copies": ttgir.count("async_copy_global_to_local"), "wgmma": ttgir.count("warp_group_dot")}
        print(f"{name:>12}: shared {row['shared_KB']:6.1f} KB, registers {res.get('REG')}, stack {res.get('STACK')}, "
              f"local {res.get('LOCAL')}, async copies {row['async_copies']}, wgmma {row['wgmma']}", flush=True)
        rows.append(row)
    return rows


def timed(fn, reps: int, device: str) -> float:
    """Median microseconds of fn() over reps calls, after two warm-up calls (compilation)."""
    import torch

    fn()
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def per_call(args) -> list[dict]:
    rows = []
    for t in args.tokens:
        for p0 in args.p0:
            rows += one_shape(args, t, p0)
    return rows


def one_shape(args, t: int, p0: int) -> list[dict]:
    """SDPA and every tile shape on one chunk of t queries starting at p0."""
    import torch

    from streamgemma.fast.prefill import sdpa_attention
    from streamgemma.kernels.attention_prefill import PrefillTiles, attention_prefill

    dev, h, hd, w = args.device, args.heads, args.head_dim, args.window
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(t, (h + 2) * hd, generator=g).to(dtype).to(dev)
    q, k, v = qkv[:, :h * hd].view(t, h, hd), qkv[:, h * hd:(h + 1) * hd], qkv[:, (h + 1) * hd:]
    ring_k, ring_v = torch.randn(2, w, hd, generator=g).to(dtype).to(dev)
    out = torch.empty(t, h * hd, dtype=dtype, device=dev)
    # keys inside each query's window: min(p0 + i, w) + 1; 4 * hd FLOPs per (query head, key)
    keys = sum(min(p0 + i, w) + 1 for i in range(t))
    flops = 4 * hd * h * keys
    want = sdpa_attention(q.float(), k.float(), v.float(), ring_k.float(), ring_v.float(), p0)
    scale = want.abs().max().item()
    print(f"T {t}, p0 {p0}: {h} heads, head_dim {hd}, window {w}, prev {min(p0, w)}; "
          f"{keys / t:.0f} keys per query, {flops / 1e9:.1f} GFLOP", flush=True)
    rows = []
    for cfg in [None, *args.tiles]:
        name = "sdpa" if cfg is None else ",".join(map(str, cfg))
        row = {"tokens": t, "p0": p0, "variant": name}
        if cfg is None:
            call = lambda: sdpa_attention(q, k, v, ring_k, ring_v, p0)  # noqa: E731
            grid = ""
        else:
            tiles = PrefillTiles(*cfg)
            call = lambda: attention_prefill(q, k, v, ring_k, ring_v, p0, out, tiles)  # noqa: E731
            row["programs"] = -(-t * h // cfg[0])
            grid = f"  {row['programs']:5d} programs"
        try:
            us = timed(call, args.reps, dev)
            err = ((call().float() - want).abs().max() / scale).item()
        except Exception as e:  # a tile shape that does not fit (shared memory, registers): report, go on
            print(f"  {name:>12}: failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)
            rows.append({**row, "error": str(e)[:300]})
            continue
        print(f"  {name:>12}: {us:9.1f} us  {flops / us / 1e6:7.1f} TFLOP/s  rel err {err:.2e}{grid}", flush=True)
        rows.append({**row, "us": us, "tflops": flops / us / 1e6, "rel_err": err})
    return rows


def feeds(args, rows: list[dict]) -> list[dict]:
    """Whole feeds of args.feed tokens, 2B shapes: SDPA, the default tiles, the
    fastest tiles of the per-call table at the last p0 (a full ring)."""
    import torch

    import streamgemma as sg

    model = sg.Model.random(sg.GriffinConfig.preset("recurrentgemma-2b"), device="cuda", dtype="bfloat16")
    ok = [r for r in rows if "us" in r and r["variant"] != "sdpa" and r["p0"] == args.p0[-1]
          and r["tokens"] == args.tokens[0]]
    configs = {"sdpa": sg.KernelConfig(prefill_attention="sdpa"), "triton default": sg.KernelConfig()}
    if ok:
        best = min(ok, key=lambda r: r["us"])["variant"]
        configs[f"triton {best}"] = sg.KernelConfig(prefill_attention_tiles=tuple(int(v) for v in best.split(",")))
    ids = torch.randint(3, 256_000, (args.feed,), generator=torch.Generator().manual_seed(0)).tolist()
    times = {(name, chunk): [] for chunk in args.chunks for name in configs}
    for rep in range(4):  # round 0 compiles and warms up; rounds interleave the paths
        for name, chunk in times:
            model.kernel_config, model.prefill_chunk = configs[name], chunk
            s = model.session()
            torch.cuda.synchronize()
            t = time.perf_counter()
            s.feed(ids)
            torch.cuda.synchronize()
            if rep:
                times[name, chunk].append(time.perf_counter() - t)
            s.close()
    out = []
    for (name, chunk), ts in times.items():
        rate = args.feed / statistics.median(ts)
        print(f"feed {args.feed} tokens, chunk {chunk:5d}, {name:>22}: {rate:9.0f} tokens/s (median of {len(ts)}, "
              f"{min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f} ms)", flush=True)
        out.append({"feed": args.feed, "chunk": chunk, "variant": name, "tokens_per_s": rate, "seconds": ts})
    return out


def main():
    args = parse()
    import torch

    import streamgemma as sg

    if args.device == "cuda" and not args.compile_only:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, streamgemma {sg.__version__}", flush=True)
    if args.compile_only:
        rows = compile_only(args)
    else:
        rows = per_call(args)
    if args.feed:
        if args.device != "cuda":
            sys.exit("--feed needs --device cuda")
        rows += feeds(args, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
