"""Why quantized decode is (not) faster: bf16 / int8 / fp8 weights side by side.

Same random weights for the three formats (seed 0; int8 and fp8 are quantized
from the bf16 model's weights), or a checkpoint with --model DIR. Per format
and batch size (--batches):
- whether the decode step runs as a CUDA graph (the bucket's graph exists
  after `Model.decode`), ms per graph replay, ms per `Model.decode` call;
- the GPU time of one (eager) step by kernel: the top 12 kernels (PyTorch
  profiler), in microseconds per step, and the total;
- one feed of --prefill-tokens (2048) into a fresh session: ms and by kernel.
Then micro-benchmarks on the LM head (vocab x width, soft-cap epilogue) and
MLP gate|up (2 * mlp_width x width, GeGLU epilogue) shapes:
- the batch-1 GEMV per weight format and widening variant (kernels/widen.py),
  plus a small block sweep for int8 (best variant);
- the batched products at M = 64, 256 and 2048 (a prefill chunk) on those
  shapes and the out and down projections: bf16
  F.linear, int8 / fp8 `qmatmul` by block and operand order (weight_first),
  fp8 `fp8_linear`
  (row quantization + F.scaled_mm), also on the q|k|v and x|y shapes.
Each timed as one CUDA graph of back-to-back calls cycling through weight
copies that together miss L2. JSON on stdout (and --json PATH).

    python bench/dev/quant_profile.py                   # H100: about 2-3 minutes
    python bench/dev/quant_profile.py --preset tiny --device cpu   # smoke test (Triton interpreter)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

SHAPES = {"lm_head": ("vocab", "softcap"), "gate_up": ("up", "geglu")}  # GEMV micro-benchmark shapes


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: random weights)")
    ap.add_argument("--preset", default="2b", help="shapes of the random model (default 2b)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu (interpreter smoke test)")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--formats", default="bf16,int8,fp8")
    ap.add_argument("--position", type=int, default=100, help="sessions' position (default 100)")
    ap.add_argument("--reps", type=int, default=30, help="timed replays (default 30)")
    ap.add_argument("--prefill-tokens", type=int, default=2048,
                    help="also profile one feed of this many tokens per format (default 2048; 0: skip)")
    ap.add_argument("--product-rows", default="64,256,2048",
                    help="M of the batched-product micro-benchmark (default 64,256,2048)")
    ap.add_argument("--no-micro", action="store_true", help="skip the micro-benchmarks")
    ap.add_argument("--json", default=None, help="also write the JSON here")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cpu":  # must be set before Triton is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    t0 = time.perf_counter()
    out = {"device": _device_name(args.device), "formats": {}}
    for fmt, model in _models(args):
        out["formats"][fmt] = {str(b): _guarded(_decode_profile, model, b, args) for b in _ints(args.batches)}
        if args.prefill_tokens:
            out["formats"][fmt]["prefill"] = _guarded(_prefill_profile, model, args)
        out.setdefault("config", {k: getattr(model.config, k) for k in ("width", "mlp_width", "vocab_size",
                                                                        "lru_width", "num_heads", "head_dim")})
        print(f"[{time.perf_counter() - t0:.0f}s] {fmt}: " + ", ".join(
            f"b{b} {r.get('ms_per_step')} ms (graph {r.get('graphed')})" for b, r in out["formats"][fmt].items()
            if b != "prefill"),
            file=sys.stderr, flush=True)
        del model
        _empty_cache(args.device)
    if not args.no_micro:
        cfg = out["config"]
        out["gemv_batch1"] = _guarded(gemv_micro, cfg, args)
        print(f"[{time.perf_counter() - t0:.0f}s] gemv done", file=sys.stderr, flush=True)
        out["batched_products"] = _guarded(batched_products, cfg, args)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return out


def _guarded(fn, *args) -> dict:
    """fn(*args), or {"error": ...}: one failing variant (a block that does not fit,
    inline PTX that does not assemble) must not cost the rest of a GPU run."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported in the JSON, not hidden
        print(f"error in {fn.__name__}: {e!r}"[:500], file=sys.stderr, flush=True)
        return {"error": repr(e)[:500]}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu (Triton interpreter)"


def _empty_cache(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _models(args):
    """(format, Model) for each of --formats, one at a time."""
    import torch

    import streamgemma as sg
    from streamgemma.bench.common import PRESET_ALIASES
    from streamgemma.model.quantize import quantize_network

    fmts = [f for f in args.formats.split(",") if f]
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.model:
        for fmt in fmts:
            yield fmt, sg.load(args.model, device=args.device, dtype=dtype, progress=False,
                               quantize=None if fmt == "bf16" else fmt, kernels=True)
        return
    config = sg.GriffinConfig.preset(PRESET_ALIASES.get(args.preset, args.preset))
    base = sg.Model.random(config, seed=0, device=args.device, dtype=dtype, kernels=True)
    # quantized copies first: the bf16 model's first decode re-points its parameters into fused weights
    copies = {}
    for fmt in fmts:
        if fmt != "bf16":
            net = copy.deepcopy(base.network)
            quantize_network(net, fmt, base.fingerprint, device=torch.device(args.device))
            copies[fmt] = net
    for fmt in fmts:
        if fmt == "bf16":
            yield fmt, base
        else:
            yield fmt, sg.Model(copies.pop(fmt), source=f"random(seed=0), {fmt}", kernels=True)
    del base


def _decode_profile(model, batch: int, args) -> dict:
    import torch

    from streamgemma.bench.decode import sessions_at

    cuda = model.device.type == "cuda"
    sessions = sessions_at(model, batch, args.position)  # held: a collected session frees its slot
    slots = [s.slot for s in sessions]
    tokens = [1] * batch
    for _ in range(2):  # builds the decoder, compiles, captures the bucket's graph
        model.decode(slots, tokens)
    graphed_decoder = model._graphed  # a dev tool: reads internals on purpose
    bucket = graphed_decoder._bucket(batch) if graphed_decoder is not None else None
    graph = graphed_decoder._graphs.get(bucket) if bucket is not None else None
    reps = args.reps if cuda else 2
    dec = model._kernel_decoder
    dev = model.device
    t, s, p = (torch.tensor(v, device=dev) for v in (tokens, slots, [args.position] * batch))
    # the graph and, above the GEMV batches, the soft-cap launched after it
    step = (lambda: graphed_decoder.replay(bucket, batch)) if graph is not None else (lambda: dec.step(t, s, p))
    result = {"graphed": graph is not None, "ms_per_step": _time_ms(step, reps, cuda),
              "ms_per_model_decode": _time_ms(lambda: model.decode(slots, tokens), reps, cuda)}
    result.update(_by_kernel(lambda: dec.step(t, s, p), 3 if cuda else 1, cuda))
    del sessions
    return result


def _prefill_profile(model, args) -> dict:
    """One feed of --prefill-tokens random ids into a fresh session: ms (median
    of a few) and the GPU time by kernel of one feed."""
    from streamgemma.bench.common import token_ids

    cuda = model.device.type == "cuda"
    ids = token_ids(args.prefill_tokens, model.config.vocab_size)

    def feed():
        with model.session() as s:
            s.feed(ids)

    result = {"tokens": len(ids), "ms": _time_ms(feed, 3 if cuda else 1, cuda)}
    result.update(_by_kernel(feed, 1, cuda))
    return result


def _by_kernel(fn, calls: int, cuda: bool) -> dict:
    """GPU (CPU off CUDA) time per call of fn by kernel (operator): total and top 12."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = (e.self_device_time_total if cuda else e.self_cpu_time_total) / calls
        if us > 0:
            rows.append((us, e.count // calls, e.key))
    rows.sort(reverse=True)
    return {"gpu_us" if cuda else "cpu_us": round(sum(r[0] for r in rows), 1),
            "top_kernels": [{"us": round(us, 1), "calls": n, "name": name[:90]} for us, n, name in rows[:12]]}


def _time_ms(fn, reps: int, cuda: bool) -> float:
    """Median milliseconds of fn() (CUDA events around each call on CUDA)."""
    import torch

    fn()
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return round(sorted(times)[len(times) // 2], 4)


# -- micro-benchmarks ------------------------------------------------------------------
_L2_MISS_BYTES = 256 << 20  # weight copies cycled per graph: together well past H100's 50 MB L2


def _copies(tensors: tuple, cuda: bool) -> list[tuple]:
    """Enough clones of `tensors` (weight, scale) that cycling through them misses L2."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    n = max(1, -(-_L2_MISS_BYTES // nbytes)) if cuda else 1
    return [tensors] + [tuple(t.clone() if t is not None else None for t in tensors) for _ in range(n - 1)]


def _per_call_us(calls: list, cuda: bool, rounds: int = 24) -> float:
    """Microseconds per call: on CUDA one graph of `rounds` passes over `calls`
    (back to back, no host in between), median of 5 replays; elsewhere one call."""
    import torch

    if not cuda:
        t = time.perf_counter()
        calls[0]()
        return round((time.perf_counter() - t) * 1e6, 1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    n = max(rounds, len(calls))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            calls[i % len(calls)]()
    ms = _time_ms(graph.replay, 5, True)
    del graph
    return round(ms * 1e3 / n, 2)


def _weights(n_rows: int, k: int, fmt: str, dev: str, act):
    import torch

    from streamgemma.model.quantize import quantize_rows

    g = torch.Generator(device=dev).manual_seed(0)
    w = torch.empty(n_rows, k, device=dev, dtype=act).normal_(0, k ** -0.5, generator=g)
    if fmt == "bf16":
        return w, None
    q, s = quantize_rows(w, fmt)
    return q, s


def gemv_micro(cfg: dict, args) -> dict:
    """Batch-1 GEMV on the LM head and gate|up shapes: us and weight GB/s per
    format and widening variant; for int8 a block sweep with the best variant."""
    import torch

    from streamgemma.kernels.gemv import gemv
    from streamgemma.kernels.widen import FP8_VARIANTS, INT8_VARIANTS

    cuda = args.device.startswith("cuda")
    dev, act = args.device, (torch.bfloat16 if cuda else torch.float32)
    fmts = [f for f in args.formats.split(",") if f]
    sweep = [(2, 1024, 2), (4, 512, 2), (4, 1024, 4), (8, 512, 4), (2, 2048, 4), (8, 1024, 8)] if cuda else []
    out = {}
    for shape, (rows, epi) in SHAPES.items():
        k = cfg["width"]
        n_rows = cfg["vocab_size"] if rows == "vocab" else 2 * cfg["mlp_width"]
        n_out = n_rows // 2 if epi == "geglu" else n_rows
        src = torch.randn(1, k, device=dev, dtype=act)
        nscale = torch.randn(k, device=dev, dtype=act) * 0.1
        bias = torch.randn(n_rows, device=dev, dtype=act) * 0.1 if epi == "geglu" else None
        dst = torch.empty(1, n_out, device=dev, dtype=torch.float32 if epi == "softcap" else act)
        entry = out[f"{shape} {n_rows}x{k}"] = {}
        for fmt in fmts:
            copies = _copies(_weights(n_rows, k, fmt, dev, act), cuda)
            variants = {"bf16": {"-": None}, "int8": INT8_VARIANTS, "fp8": FP8_VARIANTS}[fmt]
            if not cuda:
                variants = {n: v for n, v in variants.items() if n != "prmt"}  # inline PTX: CUDA only

            def run(variant, block=None, copies=copies):
                return _guarded(_run, variant, block, copies)

            def _run(variant, block, copies):
                calls = [lambda w=w, s=s: gemv(src, w, dst, weight_scale=s, bias=bias, norm_scale=nscale,
                                               epilogue=epi, cap=30.0, widening=variant, config=block)
                         for w, s in copies]
                us = _per_call_us(calls, cuda)
                nbytes = copies[0][0].numel() * copies[0][0].element_size()
                return {"us": us, "GB/s": round(nbytes / us / 1e3, 1)}

            results = {name: run(v) for name, v in variants.items()}
            entry[fmt] = results
            if fmt == "int8" and sweep:
                best = min(results, key=lambda name: results[name].get("us", float("inf")))
                entry["int8 sweep (" + best + ")"] = {
                    f"BN={b[0]} BK={b[1]} warps={b[2]}": run(variants[best], b) for b in sweep}
            del copies
            _empty_cache(dev)
    return out


def batched_products(cfg: dict, args) -> dict:
    """x [M, K] @ W.T at M = --product-rows: bf16 F.linear, int8 / fp8
    qmatmul (default and alternative blocks), fp8 row quantization + F.scaled_mm."""
    import torch
    import torch.nn.functional as F

    from streamgemma.fast.qlinear import fp8_linear, fp8_tensor_cores
    from streamgemma.kernels.qmatmul import default_block, qmatmul

    cuda = args.device.startswith("cuda")
    dev, act = args.device, (torch.bfloat16 if cuda else torch.float32)
    d, e, v = cfg["width"], cfg["mlp_width"], cfg["vocab_size"]
    shapes = {"lm_head": (v, d), "gate_up": (2 * e, d), "down": (d, e), "out": (d, d),
              "qkv": ((cfg["num_heads"] + 2) * cfg["head_dim"], d), "xy": (2 * cfg["lru_width"], d)}
    fmts = [f for f in args.formats.split(",") if f]
    out = {}
    for m in _ints(args.product_rows):
        small = min(64, max(16, m))
        blocks = [(default_block(m, cuda), False)]  # (block, weight_first)
        if cuda:
            blocks += [((small, 64, 128, 4, 4), False), ((small, 32, 128, 4, 4), False),
                       ((128, 128, 64, 8, 3), False), ((64, 128, 64, 4, 4), False),
                       ((small, 128, 128, 4, 4), True), ((small, 64, 128, 4, 4), True),
                       ((128, 128, 64, 8, 3), True)]
        else:
            blocks += [(default_block(m, cuda), True)]
        for shape, (n, k) in shapes.items():
            if shape == "lm_head" and m > 256:  # a prefill computes the logits of its last position only
                continue
            x = torch.randn(m, k, device=dev, dtype=act)
            entry = out[f"M={m} {shape} {n}x{k}"] = {}
            for fmt in fmts:
                copies = _copies(_weights(n, k, fmt, dev, act), cuda)
                nbytes = copies[0][0].numel() * copies[0][0].element_size()

                def timed(fn, copies=copies, nbytes=nbytes):
                    return _guarded(_timed, fn, copies, nbytes)

                def _timed(fn, copies, nbytes):
                    us = _per_call_us([lambda w=w, s=s: fn(w, s) for w, s in copies], cuda)
                    return {"us": us, "GB/s": round(nbytes / us / 1e3, 1)}

                if fmt == "bf16":
                    entry["bf16 F.linear"] = timed(lambda w, s: F.linear(x, w))
                    continue
                for b, first in dict.fromkeys(blocks):
                    name = f"{fmt} qmatmul {b}" + (" weight first" if first else "")
                    entry[name] = timed(lambda w, s, b=b, first=first: qmatmul(x, w, s, block=b, weight_first=first))
                if fmt == "fp8" and (not cuda or fp8_tensor_cores(x, copies[0][0])):
                    entry["fp8 rows + scaled_mm"] = timed(lambda w, s: fp8_linear(x, w, s))
                del copies
                _empty_cache(dev)
    return out


if __name__ == "__main__":
    main()
