"""Instructions per weight of the batch-1 GEMV's inner loop, per weight
format and widening variant, from the SASS Triton compiles for a GPU target
(default sm_90), without a GPU: Triton's bundled ptxas and nvdisasm do the
work. A GEMV with one-byte weights is bound by instructions as much as by
bytes, so this shows what a kernel change costs before any GPU run.

    python bench/dev/gemv_sass.py [--arch 90] [--block 2,1024,2] [--json out.json]
    python bench/dev/gemv_sass.py --tc [--block 16,128,4,4,1]  # the tensor-core kernel (gemv_tc.py, batch
                                                               # padded to 16): BN,BK,warps,stages,splits
    python bench/dev/gemv_sass.py --tc --fused [--epilogue geglu]  # ... with the norm prologue, bias, PDL and
                                                                   # the conv (or GeGLU) epilogue
    python bench/dev/gemv_sass.py --batch 4 --block 4,256,2 --fused  # the CUDA-core kernel at batch 2-16

Per variant: instructions in the K loop, per weight, and the most frequent
opcodes (I2F: the quarter-rate int-to-float; STS/LDS/BAR: a tile's trip
through shared memory; HMMA/HGMMA: tensor-core MMAs); and the resources
(registers, local memory bytes: spills, shared memory) and the asynchronous
copies in the PTX (cp.async: what Triton's pipeliner makes of the loads
that feed the MMA; cp.async.bulk: TMA).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

VARIANTS = [("bf16", "bf16", 0), ("int8 convert", "i8", 0), ("int8 magic", "i8", 1), ("int8 prmt", "i8", 2),
            ("fp8 convert", "fp8e4nv", 0), ("fp8 via_f16", "fp8e4nv", 1),
            # int32 words of four weights (gemv's `words`, batch 1): widen_words' PTX (1) or bit operations (0)
            ("int8 words", "i8w", 1), ("int8 words bits", "i8w", 0), ("fp8 words", "fp8w", 1),
            ("fp8 words bits", "fp8w", 0),
            # int4: words of eight nibbles, a float32 scale per 128 columns of a row, batch 1
            ("int4 words", "i4w", 1), ("int4 words bits", "i4w", 0),
            # the same, a word's products summed in float16 pairs (gemv(half_dot=True))
            ("int4 half", "i4hw", 1), ("int4 half bits", "i4hw", 0)]


def compile_gemv(weight_type: str, widening: int, block: tuple, arch: int, tc: bool = False,
                 fused: bool = False, epilogue: str = "conv", batch: int = 1):
    """The plain-epilogue GEMV (no norm, no bias) of `batch` rows (a power of two), compiled for sm_<arch>;
    tc: the tensor-core kernel (16 rows; block (BN, BK, warps[, stages[, splits]]));
    fused: with the residual + RMSNorm prologue, bias, PDL and `epilogue`
    (conv: everything a product can carry)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from streamgemma.kernels import gemv, gemv_parts, gemv_tc

    bn, bk, warps = block[:3]
    sig = {"src_ptr": "*bf16", "tok_ptr": "*i64", "emb_scale": "fp32", "tscale_ptr": "*fp32", "delta_ptr": "*bf16",
           "res_out_ptr": "*bf16", "nscale_ptr": "*bf16", "eps": "fp32",
           "w_ptr": "*i32" if weight_type.endswith("w") else "*" + weight_type,
           "wscale_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16", "out_stride": "i32", "conv_ptr": "*bf16",
           "slots_ptr": "*i64", "pos_ptr": "*i64", "cw_ptr": "*bf16", "cb_ptr": "*bf16", "L": "i32", "cap": "fp32",
           "B": "i32", "N": "i32", "K": "i32"}
    epi = gemv_parts.EPILOGUES[epilogue] if fused else 0
    const = dict(BB=16 if tc else batch, BN=bn, BK=bk, SRC=0, SRC_SCALED=False, HAS_DELTA=fused, NORM=fused,
                 WRITE_RES=fused, QUANT=weight_type not in ("bf16", "i4w", "i4hw"), HAS_BIAS=fused, EPI=epi,
                 CONVK=4 if fused else 2, CONVR=4 if fused else 1, PDL=fused, WIDEN=widening)
    options = {"num_warps": warps}
    if tc:
        _, _, _, stages, splits = gemv_tc.launch(tuple(block[:3]) + ("tc",) + tuple(block[3:]), bn, 1 << 20)
        sig.update(KS="i32", part_ptr="*fp32", count_ptr="*i32")
        const["SPLITS"] = splits
        options["num_stages"] = stages
        kernel = gemv_tc._gemv_tc_kernel
    else:
        sig["one"] = "i32"
        const["FLAT"] = weight_type != "bf16" and batch == 1  # as gemv.gemv picks it
        int4 = weight_type in ("i4w", "i4hw")
        const["WORDS"] = 3 if int4 else {"i8w": 1, "fp8w": 2}.get(weight_type, 0)
        const["WPK"] = 8 if int4 else 4 if const["WORDS"] else 1
        const["GROUP"] = 128 if int4 else 0
        const["HALF_DOT"] = weight_type == "i4hw"
        kernel = gemv._gemv_kernel
    sig.update(dict.fromkeys(const, "constexpr"))
    names = list(sig)
    # what Triton specializes at launch on real tensors: 16-byte aligned pointers, sizes divisible by 16
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if sig[n].startswith("*") or n in ("out_stride", "L", "N", "K", "KS")}
    source = ASTSource(kernel, sig, const, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def resources(kernel) -> dict:
    """Registers and local memory (spills) per thread, shared memory per
    program, and the PTX's asynchronous copies (cp.async, and cp.async.bulk: TMA)."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    finally:
        os.unlink(f.name)
    ptx = kernel.asm["ptx"]
    return {"registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "local_bytes": int(re.search(r"LOCAL:(\d+)", usage).group(1)),
            "shared_bytes": kernel.metadata.shared,
            "cp_async": len(re.findall(r"cp\.async\.c[ag]\.shared", ptx)),
            "cp_async_bulk": ptx.count("cp.async.bulk")}


def sass(kernel) -> str:
    import triton

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        return subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def loop_opcodes(text: str) -> list[str]:
    """Opcodes of the longest backward-branch span: the K loop."""
    lines = text.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^\.(L_x_\d+):", line.strip()))}
    best = None
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?\.(L_x_\d+)", line)
        if m and labels.get(m.group(1), i) < i and (best is None or i - labels[m.group(1)] > best[1] - best[0]):
            best = (labels[m.group(1)], i)
    if best is None:
        return []
    body = "\n".join(lines[best[0]:best[1] + 1])
    return [op.split(".")[0] for op in re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", body, re.M)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100)")
    ap.add_argument("--block", default=None, help="BN,BK,num_warps (default: gemv's batch-1 'plain' block); "
                    "with --tc optionally ,num_stages,splits (default: gemv_tc.DEFAULT_BLOCK)")
    ap.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    ap.add_argument("--tc", action="store_true", help="the tensor-core variant (batch padded to 16 rows)")
    ap.add_argument("--batch", type=int, default=1, choices=(1, 2, 4, 8, 16),
                    help="rows of the CUDA-core kernel (its batch bucket; default 1)")
    ap.add_argument("--fused", action="store_true", help="norm prologue, bias, PDL and the --epilogue")
    ap.add_argument("--epilogue", default="conv", choices=("plain", "geglu", "conv", "softcap"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    from streamgemma.kernels.gemv import default_config
    from streamgemma.kernels.gemv_tc import DEFAULT_BLOCK

    out = {}
    for name, wtype, widening in VARIANTS:
        if args.only and name not in args.only.split(","):
            continue
        size = 2 if wtype == "bf16" else 1
        block = tuple(int(v) for v in args.block.split(",")) if args.block else \
            DEFAULT_BLOCK if args.tc else default_config(1, "plain", True, size)
        kernel = compile_gemv(wtype, widening, block, args.arch, args.tc, args.fused, args.epilogue, args.batch)
        ops = loop_opcodes(sass(kernel))
        # per thread per iteration; GeGLU's BN counts gate rows only (each brings an up row: half per weight read)
        weights = block[0] * block[1] / (block[2] * 32)
        out[name] = {"block": list(block), "loop_instructions": len(ops),
                     "per_weight": round(len(ops) / weights, 2), "top": dict(Counter(ops).most_common(10)),
                     "mma": sum(op in ("HMMA", "HGMMA") for op in ops), "ffma": ops.count("FFMA"),
                     **resources(kernel)}
        r = out[name]
        print(f"{name:13s} {r['per_weight']:5.2f} per weight  {r['registers']} registers, {r['local_bytes']} B local, "
              f"{r['shared_bytes']} B shared, {r['cp_async']} cp.async, {r['cp_async_bulk']} bulk  {r['top']}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
