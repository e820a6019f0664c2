"""Decode variants side by side, in one process (RecurrentGemma-2B shapes,
random bf16 weights, or int8 / fp8 with --quantize): each variant's logits and
state against the PyTorch reference step (at batch 1 and every --batches
batch), then its graph replay time and step-loop time, the variants taken in
turn for several rounds so drift shows.

A variant is a `KernelConfig` (streamgemma/fast/tuning.py) built from parts:
GEMV block shapes (VARIANTS), RG-LRU launch shapes (RGLRU), attention key
tiles (ATTN), the fused path's reach and kernel (FUSED: "fused16" takes
batches up to 16 onto the CUDA-core GEMV, "tc" onto the tensor-core GEMV,
"tc1q" puts batch 1 of int8 / fp8 weights on the tensor cores, "tc1" batch 1
of every format; "tc+tc1q" joins them), tuned GEMV blocks from a
bench/dev/tune_gemv.py JSON (--gemv-json: "tuned" its "best" table, the
fastest fused kernel per shape and batch; "tunedtc" its "best_tensor_core"
table), "words" / "bytes" (batch-1 1-byte weights read as int32 words, the
default since session 14, or as byte tensors), "cublas8" / "headcublas8" (the batched fp8 products all
on cuBLAS, or the LM head's alone, instead of kernels/fp8_matmul.py), "bpdl" / "nobpdl" (the batched step's
norms, GeGLU, conv and fp8 launches with PDL or plain), or "nopdl" (plain launches);
"+" joins them, "base" is the defaults. An older checkout can be timed by the same script ("base"), in its
own process, for an A/B on one machine.

    python bench/dev/decode_variants.py [--variants base,up4x256+xy8x256] [--positions 100,3000]
                                    [--rounds 2] [--batches 2,4,8,16] [--quantize int8] [--json out.json]
                                    [--preset recurrentgemma-9b]

--batches times every variant's whole step at those batches (graph replay and
step loop), so e.g. `--variants base,fused16,tc --batches 2,4,8,16` compares
cuBLAS, CUDA-core and tensor-core products per batch, and
`--gemv-json tc.json --variants base,tc+tunedtc,fused16+tuned --batches 2,4,8,16`
cuBLAS against the tuned tensor-core kernel (split-K and pipeline depth per
shape) and against the per-shape best of both fused kernels. Without a GPU, --tiny
runs the same on a tiny model under Triton's interpreter (checks only: no timing).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

if not torch.cuda.is_available():  # --tiny: the kernels read it when they are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from generate_overhead import graph_replay_ms  # noqa: E402 - a sibling dev tool (run as python bench/dev/...)

import streamgemma as sg  # noqa: E402
from streamgemma.bench.common import git_commit  # noqa: E402
from streamgemma.bench.decode import time_decode  # noqa: E402
from streamgemma.fast.tuning import KernelConfig, gemv_blocks_from_json  # noqa: E402
from streamgemma.model.griffin import Griffin  # noqa: E402
from streamgemma.model.quantize import quantize_network  # noqa: E402

# name: KernelConfig.gemv_blocks entries, keyed (batch bucket, epilogue, N, K) at 2B shapes, batch 1
XY, UP, LM = (1, "conv", 5120, 2560), (1, "geglu", 15360, 2560), (1, "softcap", 256000, 2560)
DOWN, OUT, QKV = (1, "plain", 2560, 7680), (1, "plain", 2560, 2560), (1, "plain", 3072, 2560)
VARIANTS = {"base": {}, "nopdl": {},
            "xy8x256": {XY: (8, 256, 2)}, "xy4x256": {XY: (4, 256, 2)}, "xy2x512": {XY: (2, 512, 2)},
            "up2x512": {UP: (2, 512, 2)}, "up4x256": {UP: (4, 256, 2)}, "up4x128": {UP: (4, 128, 2)},
            "down2x1024": {DOWN: (2, 1024, 4)}, "out4x256": {OUT: (4, 256, 2)}, "qkv4x256": {QKV: (4, 256, 2)},
            "lm2x512": {LM: (2, 512, 2)}, "lm8x256": {LM: (8, 256, 4)}, "lm16x256": {LM: (16, 256, 4)}}
# RG-LRU programs (channels per program, warps; every batch) and attention key tiles at batch 1
RGLRU = {"rg16": (16, 4), "rg64": (64, 4), "rg32w4": (32, 4), "rg32w8": (32, 8), "rg16w2": (16, 2),
         "rg16w8": (16, 8), "rg64w8": (64, 8)}
ATTN = {"att32": 32, "att16": 16}
# the fused GEMV path beyond batch 1: KernelConfig fields
_TC_ALL = dict(gemv_max_batch=16, gemv_tensor_cores={f: (2, 4, 8, 16) for f in ("float", "int8", "fp8")})
FUSED = {"fused16": dict(gemv_max_batch=16), "fused8": dict(gemv_max_batch=8), "tc": _TC_ALL,
         "tc8": dict(_TC_ALL, gemv_max_batch=8),
         "tc1q": dict(gemv_tensor_cores={"int8": (1,), "fp8": (1,)}),
         "tc1": dict(gemv_tensor_cores={f: (1,) for f in ("float", "int8", "fp8")}),
         "words": dict(one_byte_words=True), "bytes": dict(one_byte_words=False),
         "half4": dict(int4_half_dot=True), "full4": dict(int4_half_dot=False),
         "cublas8": dict(fp8_matmul_rows=(0, 0), fp8_head_rows=(0, 0)), "headcublas8": dict(fp8_head_rows=(0, 0)),
         "bpdl": dict(batched_pdl=True), "nobpdl": dict(batched_pdl=False)}


def random_model(cfg: sg.GriffinConfig, dtype=torch.bfloat16, quantize: str | None = None) -> sg.Model:
    """Random weights drawn on the GPU (a 2B model in seconds); without one, on the CPU."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device("meta"):
        net = Griffin(cfg, dtype=dtype)
    net = net.to_empty(device=dev)
    net.init_random_(torch.Generator(device=dev).manual_seed(0))
    if quantize:
        quantize_network(net, quantize, f"random 2B shapes, {quantize}")
    return sg.Model(net, source="random 2B shapes", kernels=True)


def fill_random_state(model: sg.Model, slots: list[int], position: int) -> None:
    """Random state everywhere; the slots at position, position + 1, ... (mixed positions)."""
    dev = model.device
    g = torch.Generator(device=dev).manual_seed(1)
    for layer in model.pool.layers:
        for t in layer:
            t.copy_(torch.randn(t.shape, generator=g, device=dev).to(t.dtype) * 0.5)
    for i, s in enumerate(slots):
        model.pool.positions[s] = position + i


def kernel_config(name: str, tuned: dict | None = None) -> KernelConfig:
    """The KernelConfig of a variant name ("+" joins parts); the parts "tuned"
    and "tunedtc": the gemv_blocks tuned[part] (from a tune_gemv.py JSON,
    --gemv-json)."""
    parts = name.split("+")
    gemv_blocks, attention_blocks, rglru_launch, fused = {}, {}, None, {}
    for part in parts:
        if part in FUSED:  # parts join: "tc+tc1q" is batches 2-16 and quantized batch 1 on the tensor cores
            tc = dict(fused.get("gemv_tensor_cores", {}))
            for fmt, buckets in FUSED[part].get("gemv_tensor_cores", {}).items():
                tc[fmt] = tuple(sorted(set(tc.get(fmt, ())) | set(buckets)))
            fused.update(FUSED[part], gemv_tensor_cores=tc)
        elif part in RGLRU:
            rglru_launch = RGLRU[part]
        elif part in ATTN:
            attention_blocks[1] = ATTN[part]
        elif part in ("tuned", "tunedtc"):
            gemv_blocks.update((tuned or {}).get(part, {}))
        else:
            gemv_blocks.update(VARIANTS[part])
    return KernelConfig(gemv_blocks=gemv_blocks, attention_blocks=attention_blocks, rglru_launch=rglru_launch,
                        pdl=False if "nopdl" in parts else None, **fused)


def apply(model: sg.Model, name: str, tuned: dict | None = None) -> None:
    """Switch the model to the variant: its next decode builds a new decoder and captures new graphs."""
    model.kernel_config = kernel_config(name, tuned)


def check(model: sg.Model, ref: sg.Model, position: int, batch: int = 1) -> dict:
    """One step of `batch` rows (positions position, position + 1, ...) from
    the same random state: kernel path vs reference."""
    out = {}
    for m in (ref, model):
        sessions = [m.session() for _ in range(batch)]
        slots = [s.slot for s in sessions]
        fill_random_state(m, slots, position)
        logits = m.decode(slots, [5 + 7 * i for i in range(batch)]).float().clone()
        state = [t[slots].float().clone() for layer in m.pool.layers for t in layer]
        out[m is model] = (logits, state)
        for s in sessions:
            s.close()
    (want, want_state), (got, got_state) = out[False], out[True]
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    return {"logits_rel_err": rel(got, want), "state_rel_err": max(rel(g, w) for g, w in zip(got_state, want_state)),
            "top1_equal": float((got.argmax(-1) == want.argmax(-1)).float().mean())}


def replay_ms(model: sg.Model, position: int, batch: int = 1) -> float:
    """GPU time of one step of `batch` rows at `position` (graph replays back to back)."""
    sessions = [model.session() for _ in range(batch)]
    slots = [s.slot for s in sessions]
    fill_random_state(model, slots, position)
    model.decode(slots, [1] * batch)  # captures the graph
    ms = graph_replay_ms(model, bucket=next(b for b in model._graphed.buckets if b >= batch))
    for s in sessions:
        s.close()
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="base,nopdl")
    ap.add_argument("--positions", default="3000")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batches", default="", help="also check and time every variant's whole step at these batches "
                    "(graph replay and step loop, at the last position)")
    ap.add_argument("--quantize", choices=("int8", "fp8", "int4"), help="quantized weights")
    ap.add_argument("--preset", default="recurrentgemma-2b", help="the shapes (e.g. recurrentgemma-9b; the block "
                    "shapes of VARIANTS are the 2B ones)")
    ap.add_argument("--tiny", action="store_true", help="a tiny float32 model (on the CPU under Triton's "
                    "interpreter without a GPU: checks only, no timing)")
    ap.add_argument("--grow-before-round", type=int, default=-1,
                    help="before this round, grow the state pool to 256+ sessions (moves every slot's state)")
    ap.add_argument("--gemv-json", default=None, help="a tune_gemv.py JSON: its \"best\" table is the part "
                    "\"tuned\", its \"best_tensor_core\" table the part \"tunedtc\" (e.g. --variants "
                    "base,tc+tunedtc)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tuned = None
    if args.gemv_json:
        with open(args.gemv_json) as f:
            table = json.load(f)
        tuned = {"tuned": gemv_blocks_from_json(table["best"]),
                 "tunedtc": gemv_blocks_from_json(table.get("best_tensor_core", {}))}
    gpu = torch.cuda.is_available()
    if not gpu and not args.tiny:
        ap.error("without a GPU only --tiny runs (Triton's interpreter)")
    if args.tiny:
        model = random_model(sg.GriffinConfig.preset("tiny"), torch.float32, args.quantize)
    else:
        model = random_model(sg.GriffinConfig.preset(args.preset), quantize=args.quantize)
    ref = sg.Model(model.network, kernels=False)
    variants = args.variants.split(",")
    positions = [int(p) for p in args.positions.split(",")]
    batches = [int(x) for x in args.batches.split(",") if x]
    import triton

    results = {"device": torch.cuda.get_device_name() if gpu else "cpu (interpreter)", "quantize": args.quantize,
               "preset": args.preset, "torch": torch.__version__, "triton": triton.__version__,
               "commit": git_commit(), "checks": {}, "timings": []}
    for name in variants:
        apply(model, name, tuned)
        for b in [1] + batches:
            results["checks"][f"{name} b{b}"] = check(model, ref, positions[-1], b)
            print(name, f"b{b}", "check", results["checks"][f"{name} b{b}"], flush=True)
    del ref
    if not gpu:
        return _write(args.json, results)
    for rnd in range(args.rounds):
        if rnd == args.grow_before_round:
            sessions = [model.session() for _ in range(257)]
            for s in sessions:
                s.close()
            print("pool capacity now", model.pool.capacity, flush=True)
            results["timings"].append({"pool_capacity": model.pool.capacity, "before_round": rnd})
        for name in variants:
            apply(model, name, tuned)
            for p in positions:
                row = {"variant": name, "round": rnd, "position": p, "replay_ms": replay_ms(model, p),
                       "loop_ms": time_decode(model, 1, args.steps, p) * 1e3}
                results["timings"].append(row)
                print(json.dumps(row), flush=True)
            for b in batches:
                t0 = time.perf_counter()
                ms = replay_ms(model, positions[-1], b)
                sec = time_decode(model, b, 32, positions[-1])
                row = {"variant": name, "round": rnd, "batch": b, "replay_ms": ms, "replay_tokens_per_s": b / ms * 1e3,
                       "loop_tokens_per_s": b / sec, "wall_s": time.perf_counter() - t0}
                results["timings"].append(row)
                print(json.dumps(row), flush=True)
    _write(args.json, results)


def _write(path: str | None, results: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
