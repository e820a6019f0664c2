"""The fused small-batch GEMV (kernels/gemv.py), CUDA-core and tensor-core
variants, against the matmul path on the RecurrentGemma-2B projection shapes
(bf16 activations; bf16 weights, or int8 / fp8 weights with per-row scales
with --quantize): correctness, then a block-size sweep per shape and batch
bucket, each variant timed as one CUDA graph of back-to-back launches cycling
through enough weight copies to miss L2.

    python bench/dev/tune_gemv.py [--batches 1,2,4,8,16] [--json best.json] [--quick] [--pdl] [--quantize int8]
                                  [--kernels cuda,tc] [--tc-stages 3,4,5] [--tc-splits 1,2,4]

The tensor-core candidates (kernels/gemv_tc.py: BN 16/32/64 (and 128 with
BK 64, or BK 128 and 8 warps), BK 64/128/256, 4 or 8 warps, num_stages, K
splits) are pruned per shape: the pipeline depth
is swept on the BK=128, 4-warp tiles only (the others at 4 stages, 3 for
BK=256), no candidate over ~200 KB of shared memory, and a split only where
the product has fewer than 264 N tiles, each split keeps at least two K
tiles and the grid stays under ~1,100 programs, and no grid of fewer than
66 programs (half an H100's SMs). A tensor-core kernel does
not depend on the batch (padded to 16 rows), so each is compiled once per
shape. At --batches 2,4,8,16 --kernels tc on an H100: ~270 candidates a
batch, about 1 minute of compiling (14 processes) and 2 of timing.

Prints per shape and batch: the matmul path (cuBLAS + its row kernels), the
best CUDA-core and the best tensor-core config, in microseconds per call and
weight-read TB/s, and which of the three wins. The JSON's "best" (or
"best_pdl") table, the fastest fused config per shape (a tensor-core one ends
in "tc"; keys end in the weight format with --quantize), becomes a
KernelConfig's gemv_blocks through `streamgemma.fast.tuning.gemv_blocks_from_json`.

Without a GPU (`--quick`, Triton's interpreter, tiny shapes, wall-clock
timings that mean nothing) it checks that the sweep runs end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor

import torch

GPU = torch.cuda.is_available()
if not GPU:  # the kernels read it when they are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEV = "cuda" if GPU else "cpu"
# float32 under the interpreter: it multiplies bfloat16 tl.dot operands as raw bits
DTYPE = torch.bfloat16 if GPU else torch.float32
# the 2B shapes; without a GPU tiny ones of the same structure
D, L, E, QKV, V = (2560, 2560, 7680, 3072, 256000) if GPU else (64, 64, 96, 96, 500)

# name: (weight rows, K, epilogue, norm, bias)
SHAPES = {
    "qkv": (QKV, D, "plain", True, False),
    "xy": (2 * L, D, "conv", True, True),
    "out": (D, D, "plain", False, True),
    "up": (2 * E, D, "geglu", True, True),
    "down": (D, E, "plain", False, True),
    "lm": (V, D, "softcap", True, False),
}


def tc_configs(name: str, quick: bool, weight_bytes: float = 2, stages: tuple[int, ...] = (3, 4, 5),
               splits: tuple[int, ...] = (1, 2, 4)) -> list[tuple]:
    """Tensor-core (BN, BK, num_warps, "tc", num_stages, splits) candidates
    for a shape, any batch (padded to 16 rows), pruned as the docstring says."""
    if quick:  # the interpreter: one unsplit, one split candidate
        return [(32, 128, 4, "tc", 4, 1), (16, 16, 4, "tc", 3, 2)]
    n_rows, k, epi = SHAPES[name][:3]
    n_out = n_rows // 2 if epi == "geglu" else n_rows
    found = []
    for bn in (16, 32, 64, 128):
        for bk in (64, 128, 256):
            for warps in (4, 8):
                if warps == 8 and bn * bk < 64 * 128:  # too small a tile for 8 warps
                    continue
                if bn == 128 and (bk == 256 or (bk, warps) == (128, 4)):  # BN 128: a few, at the default depth
                    continue
                for st in stages:
                    if ((bk, warps) != (128, 4) or bn == 128) and st != (3 if bk == 256 else 4):
                        continue
                    # a stage: the weight tile(s) and the 16 input rows (bf16)
                    if st * (bn * bk * weight_bytes * (2 if epi == "geglu" else 1) + 16 * bk * 2) > 200 * 1024:
                        continue
                    tiles, k_tiles = -(-n_out // bn), -(-k // bk)
                    for sp in splits:
                        if tiles * sp >= 66 and (sp == 1 or (tiles < 264 and k_tiles >= 2 * sp
                                                             and tiles * sp <= 1100)):
                            found.append((bn, bk, warps, "tc", st, sp))
    return found


def configs(name: str, bb: int, quick: bool, kernels: tuple[str, ...] = ("cuda", "tc"), weight_bytes: float = 2,
            tc_stages: tuple[int, ...] = (3, 4, 5), tc_splits: tuple[int, ...] = (1, 2, 4)) -> list[tuple]:
    """Candidates: CUDA-core (BN, BK, num_warps) (register use grows with
    BB * BN * BK / threads) and tensor-core (BN, BK, num_warps, "tc", num_stages, splits)."""
    cc = configs_cuda_core(bb, quick) if "cuda" in kernels else []
    if weight_bytes < 2 and bb == 1 and not quick:
        # quantized words: tile rows of 512 x warps columns give each thread twice the words a row of the
        # defaults (256 x warps), still without a trip through shared memory (offline SASS, bench/NOTES.md Q7):
        # twice the bytes in flight a thread
        wide = [(2, 1024, 2), (4, 1024, 2), (8, 1024, 2), (4, 2048, 4), (8, 2048, 4), (8, 1024, 4)]
        cc += [c for c in wide if c not in cc]
    return cc + (tc_configs(name, quick, weight_bytes, tc_stages, tc_splits) if "tc" in kernels else [])


def configs_cuda_core(bb: int, quick: bool) -> list[tuple[int, int, int]]:
    cand = {
        1: [(8, 256, 4), (8, 512, 4), (8, 512, 8), (16, 256, 4), (16, 512, 8), (4, 256, 4),
            (4, 512, 4), (4, 1024, 8), (4, 512, 2), (8, 256, 2), (2, 1024, 4), (2, 512, 2),
            (2, 2048, 4), (4, 1024, 4), (8, 1024, 8)],  # the wide ones: 1-byte weights
        # batch 2 and 4 also get batch 1's winners' kind: a few rows per program, 2 warps
        2: [(8, 256, 4), (16, 256, 8), (8, 512, 8), (2, 512, 2), (2, 256, 2), (4, 256, 2), (4, 128, 2),
            (2, 1024, 4), (4, 512, 4), (8, 128, 2), (16, 128, 4)],
        4: [(8, 128, 4), (16, 128, 8), (8, 256, 8), (2, 256, 2), (2, 128, 2), (4, 128, 2), (2, 512, 4),
            (4, 256, 4), (8, 128, 2), (16, 128, 4)],
        8: [(4, 128, 4), (4, 256, 8), (8, 64, 4), (8, 128, 4), (8, 128, 8), (8, 256, 8), (16, 64, 4), (32, 64, 4),
            (16, 128, 8)],
        16: [(4, 64, 4), (4, 128, 8), (8, 32, 4), (8, 64, 8), (16, 32, 8)],
    }[bb]
    return cand[:2] if quick else cand


class Case:
    """One shape's tensors, `copies` weight copies (to defeat L2), batch rows."""

    def __init__(self, name: str, batch: int, copies: int, seed: int = 0, quantize: str | None = None,
                 half_dot: bool = False):
        n_rows, k, self.epi, self.norm, has_bias = SHAPES[name]
        self.half_dot = half_dot  # int4: gemv(half_dot=True), as KernelConfig(int4_half_dot=True)
        g = torch.Generator(device=DEV).manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=g, device=DEV, dtype=torch.float32)  # noqa: E731
        self.name, self.batch, self.k, self.n_rows = name, batch, k, n_rows
        self.workspaces = {}  # tensor-core config -> its split-K workspace (kept zero by the kernel)
        # drawn in bf16 directly: no float32 copy of the 1.3 GB LM head
        self.weights = [torch.empty(n_rows, k, device=DEV, dtype=DTYPE).normal_(0, k ** -0.5, generator=g)
                        for _ in range(copies)]
        self.scales = [None] * copies
        if quantize:
            from streamgemma.model.quantize import quantize_rows
            for i, w in enumerate(self.weights):
                self.weights[i], self.scales[i] = quantize_rows(w, quantize)
        self.bias = (rnd(n_rows) * 0.1).to(DTYPE) if has_bias else None
        self.x = rnd(batch, k).to(DTYPE)
        self.delta = rnd(batch, k).to(DTYPE)
        self.scale = (rnd(k) * 0.1).to(DTYPE)
        n_out = n_rows // 2 if self.epi == "geglu" else n_rows
        self.out = torch.empty(batch, n_out, device=DEV,
                               dtype=torch.float32 if self.epi == "softcap" else DTYPE)
        self.res = self.x.clone()  # the matmul path adds delta into it in place: never uninitialised
        if self.epi == "conv":
            self.conv_state = (rnd(batch, 3, L) * 0.5).to(DTYPE)
            self.cw, self.cb = (rnd(4, L) * 0.5).to(DTYPE), (rnd(L) * 0.1).to(DTYPE)
            self.slots = torch.arange(batch, device=DEV)
            self.pos = torch.full((batch,), 100, device=DEV)

    def gemv(self, i: int, config, pdl: bool = False):
        from streamgemma.kernels import gemv_tc
        from streamgemma.kernels.gemv import gemv
        kw = dict(bias=self.bias, epilogue=self.epi, config=config, pdl=pdl, weight_scale=self.scales[i],
                  half_dot=self.half_dot)
        if len(config) >= 4:
            if config not in self.workspaces:
                self.workspaces[config] = gemv_tc.workspace(self.out.shape[1], self.k, config, DEV)
            kw["workspace"] = self.workspaces[config]
        if self.norm:
            kw.update(delta=self.delta, norm_scale=self.scale, residual_out=self.res)
        if self.weights[i].element_size() == 1 and self.weights[i].dtype != torch.uint8:
            kw["words"] = None  # as the decoder reads 1-byte weights (KernelConfig.one_byte_words)
        if self.epi == "conv":
            kw["conv"] = (self.conv_state, self.slots, self.pos, self.cw, self.cb)
        if self.epi == "softcap":
            kw["cap"] = 30.0
        gemv(self.x, self.weights[i], self.out, **kw)
        return self.out

    def matmul(self, i: int, fresh: bool = False):
        """What the matmul path runs for this projection. Its add_rmsnorm adds delta
        in place (into `res`); fresh=True first copies x there, as the check needs."""
        from streamgemma.fast.qlinear import linear
        from streamgemma.kernels import elementwise, recurrent_decode
        x = self.x
        if self.norm:
            if fresh:
                self.res.copy_(self.x)
            x = elementwise.add_rmsnorm(self.res, self.delta, self.scale, 1e-6, torch.empty_like(self.x))
        y = linear(x, self.weights[i], self.scales[i], self.bias)
        if self.epi == "geglu":
            return elementwise.geglu(y, self.out)
        if self.epi == "softcap":
            return elementwise.softcap(y, 30.0, self.out)
        if self.epi == "conv":
            xc = torch.empty(self.batch, L, device=DEV, dtype=DTYPE)
            recurrent_decode.conv1d_decode(y, self.conv_state, self.slots, self.pos, self.cw, self.cb, xc)
            return xc
        return y


def graph_time_us(fn, copies: int, launches: int = 48, reps: int = 7) -> float:
    """Median time per call of fn(i) replayed from one graph, i cycling over copies
    (without a GPU: wall-clock time of one call, to exercise the sweep)."""
    if not GPU:
        t0 = time.perf_counter()
        fn(0)
        return (time.perf_counter() - t0) * 1e6
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for j in range(launches):
            fn(j % copies)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / launches)
    del g
    return sorted(times)[len(times) // 2]


def copies_for(name: str, weight_bytes: float = 2) -> int:
    n_rows, k = SHAPES[name][:2]
    return max(1, min(16, -(-200_000_000 // int(n_rows * k * weight_bytes))))


def _compile(job):
    """Worker: run each (shape, batch, config) once, so the Triton cache holds them."""
    name, batch, cfgs, with_pdl, quantize, half_dot = job
    shape_case = Case(name, batch, 1, quantize=quantize, half_dot=half_dot)
    failed = []
    for c in cfgs:
        for on in ((False, True) if with_pdl else (False,)):
            try:
                shape_case.gemv(0, c, pdl=on)
            except Exception as e:  # noqa: BLE001 - report, keep compiling the rest
                failed.append((c, repr(e)[:200]))
    if GPU:
        torch.cuda.synchronize()
    return failed


def check(shape_case: Case, config=None) -> float:
    """GEMV (`config`, default the kernel's) vs the matmul path on the same
    inputs (conv state restored before and after)."""
    if shape_case.epi == "conv":
        saved = shape_case.conv_state.clone()
    want = shape_case.matmul(0, fresh=True).float().clone()
    if shape_case.epi == "conv":
        want_state = shape_case.conv_state.clone()
        shape_case.conv_state.copy_(saved)
    shape_case.out.fill_(float("nan"))
    got = shape_case.gemv(0, config).float()
    if shape_case.epi == "conv":
        got_state = shape_case.conv_state.clone()
        shape_case.conv_state.copy_(saved)
    got = got[:, :L] if shape_case.epi == "conv" else got
    err = ((got - want).abs().max() / want.abs().max()).item()
    if shape_case.epi == "conv":
        err = max(err, ((got_state.float() - want_state.float()).abs().max()
                        / want_state.float().abs().max()).item())
    return err


def _kind(config) -> str:
    return "tc" if len(config) >= 4 else "cuda"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--kernels", default="cuda,tc", help="which fused variants to sweep: cuda (CUDA-core), tc")
    ap.add_argument("--tc-stages", default="3,4,5", help="num_stages of the tensor-core candidates")
    ap.add_argument("--tc-splits", default="1,2,4", help="K splits of the tensor-core candidates")
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pdl", action="store_true", help="also time every config with PDL launches (the best 4 printed)")
    ap.add_argument("--quantize", choices=("int8", "fp8", "int4"),
                    help="1-byte weights with per-row scales, or int4 (batch 1, CUDA-core kernel only)")
    ap.add_argument("--int4-half-dot", action=argparse.BooleanOptionalAction, default=None,
                    help="with --quantize int4: sum a word's products in float16 pairs (default: as "
                         "KernelConfig().int4_half_dot)")
    args = ap.parse_args()
    if args.int4_half_dot and args.quantize != "int4":
        ap.error("--int4-half-dot needs --quantize int4")
    if args.int4_half_dot is None:
        from streamgemma.fast.tuning import KernelConfig

        args.int4_half_dot = args.quantize == "int4" and KernelConfig().int4_half_dot
    if not GPU and not args.quick:
        ap.error("without a GPU only --quick runs (Triton's interpreter, tiny shapes)")
    if args.quantize == "int4" and (args.batches != "1" or args.kernels != "cuda"):
        ap.error("--quantize int4 sweeps the batch-1 CUDA-core kernel only: add --batches 1 --kernels cuda")
    # the sweep times plain launches; --pdl adds PDL timings
    batches = [int(b) for b in args.batches.split(",")]
    shapes = args.shapes.split(",")
    kernels = tuple(args.kernels.split(","))
    weight_bytes = 0.5 if args.quantize == "int4" else 1 if args.quantize else 2
    tc_opts = dict(weight_bytes=weight_bytes, tc_stages=tuple(int(v) for v in args.tc_stages.split(",")),
                   tc_splits=tuple(int(v) for v in args.tc_splits.split(",")))
    jobs = [(name, b, configs(name, b, args.quick, kernels, **tc_opts)) for name in shapes for b in batches]
    print(f"{sum(len(cs) for _, _, cs in jobs)} candidates over {len(jobs)} (shape, batch) pairs", flush=True)
    if GPU:  # compile every variant in parallel processes first (fills the on-disk cache)
        # a tensor-core kernel does not depend on the batch: compiled with the first batch only
        seen, compile_jobs = set(), []
        for n, b, cs in jobs:
            todo = [c for c in cs if len(c) == 3 or (n, c) not in seen]
            seen.update((n, c) for c in cs if len(c) > 3)
            compile_jobs.append((n, b, todo))
        split = [(n, b, cs[i::4], args.pdl, args.quantize, args.int4_half_dot) for n, b, cs in compile_jobs
                 for i in range(4)]
        ctx = __import__("multiprocessing").get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(14, os.cpu_count() or 4), mp_context=ctx) as ex:
            for (n, b, *_), failed in zip(split, ex.map(_compile, split)):
                for c, msg in failed:
                    print(f"compile/run failed {n} b{b} {c}: {msg}", flush=True)

    results, best, best_pdl, best_by_kind = [], {}, {}, {"cuda": {}, "tc": {}}
    print(f"{'shape':6} {'B':>2} {'matmul us':>9} {'TB/s':>5} | {'cuda-core us':>12} {'TB/s':>5} {'config':15} | "
          f"{'tensor-core us':>14} {'TB/s':>5} {'config':26} | best    err(cuda, tc)", flush=True)
    for name, b, cfgs in jobs:
        copies = copies_for(name, weight_bytes) if GPU else 1
        shape_case = Case(name, b, copies, quantize=args.quantize, half_dot=args.int4_half_dot)
        nbytes = shape_case.weights[0].numel() * shape_case.weights[0].element_size()
        t_mm = graph_time_us(lambda i, sc=shape_case: sc.matmul(i), copies)
        timed = []
        for c in cfgs:
            try:
                timed.append((graph_time_us(lambda i, sc=shape_case, c=c: sc.gemv(i, c), copies), c))
            except Exception as e:  # noqa: BLE001
                print(f"  {name} b{b} {c} failed: {e!r}"[:200], flush=True)
        timed.sort(key=lambda tc: tc[0])
        if not timed:
            continue
        t_best, c_best = timed[0]
        per_kind = {kind: next(((t, c) for t, c in timed if _kind(c) == kind), None) for kind in ("cuda", "tc")}
        errs = {kind: check(shape_case, tc[1]) if tc else None for kind, tc in per_kind.items()}
        pdl_times = []
        if args.pdl:
            pdl_times = sorted(((graph_time_us(lambda i, sc=shape_case, c=c: sc.gemv(i, c, pdl=True),
                                                 copies), c) for _, c in timed[:8]), key=lambda tc: tc[0])[:4]
            print("    with PDL: " + ", ".join(f"{c}: {t:.1f} us" for t, c in pdl_times), flush=True)
        key = f"{b},{shape_case.epi},{shape_case.n_rows},{shape_case.k}"
        key += f",{args.quantize}" if args.quantize else ""  # quantized blocks apply to their format only
        best[key] = list(c_best)
        for kind, tc in per_kind.items():
            if tc:
                best_by_kind[kind][key] = list(tc[1])
        if pdl_times:
            best_pdl[key] = list(pdl_times[0][1])
        winner = min([("matmul", t_mm)] + [(k, tc[0]) for k, tc in per_kind.items() if tc], key=lambda kv: kv[1])[0]
        results.append(dict(shape=name, batch=b, weight_bytes=nbytes, matmul_us=t_mm, gemv_us=t_best, config=c_best,
                            cuda_core=per_kind["cuda"], tensor_core=per_kind["tc"], errors=errs, winner=winner,
                            all=[(t, c) for t, c in timed], pdl=pdl_times))

        def cols(tc, width):
            if tc is None:
                return f"{'-':>{width}} {'-':>5} {'-':{15 if width == 12 else 26}}"
            return f"{tc[0]:{width}.1f} {nbytes / tc[0] / 1e6:5.2f} {str(tc[1]):{15 if width == 12 else 26}}"

        err_s = ", ".join("-" if e is None else f"{e:.1e}" for e in errs.values())
        print(f"{name:6} {b:2d} {t_mm:9.1f} {nbytes / t_mm / 1e6:5.2f} | {cols(per_kind['cuda'], 12)} | "
              f"{cols(per_kind['tc'], 14)} | {winner:6}  {err_s}", flush=True)
        del shape_case
        if GPU:
            torch.cuda.empty_cache()
    if args.json:
        from streamgemma.bench.common import git_commit

        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if GPU else "cpu (interpreter)",
                       "torch": torch.__version__, "commit": git_commit(), "quantize": args.quantize,
                       "int4_half_dot": args.int4_half_dot, "best": best,
                       "best_pdl": best_pdl,
                       "best_cuda_core": best_by_kind["cuda"], "best_tensor_core": best_by_kind["tc"],
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
