"""bench/dev/quant_profile.py runs end to end on the CPU (Triton interpreter,
tiny shapes) and reports what the GPU run reads: per format and batch the
graph flag, step times and top kernels (operators here), a prefill, and the GEMV and
batched-product micro-benchmarks per widening variant and block."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "dev" / "quant_profile.py"


def test_quant_profile_smoke_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("quant_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--preset", "tiny", "--device", "cpu", "--formats", "int8", "--batches", "1,2",
                       "--position", "2", "--reps", "1",
                       "--prefill-tokens", "5", "--product-rows", "2", "--json", str(tmp_path / "q.json")])
    assert (tmp_path / "q.json").read_text().startswith("{")
    for batch in ("1", "2"):
        r = out["formats"]["int8"][batch]
        assert r["graphed"] is False  # no CUDA graphs off CUDA
        assert r["ms_per_step"] > 0 and r["cpu_us"] > 0 and r["top_kernels"]
    prefill = out["formats"]["int8"]["prefill"]
    assert prefill["tokens"] == 5 and prefill["ms"] > 0 and prefill["top_kernels"]
    lm = out["gemv_batch1"][f"lm_head {out['config']['vocab_size']}x{out['config']['width']}"]
    assert set(lm["int8"]) == {"convert", "magic"} and lm["int8"]["magic"]["GB/s"] >= 0
    products = out["batched_products"]
    assert all(k.startswith("M=2 ") for k in products)
    assert {k.split(" ")[1] for k in products} == {"lm_head", "gate_up", "down", "out", "qkv", "xy"}
    assert all(any(k.startswith("int8 qmatmul") for k in v) for v in products.values())


def test_gemv_sass_counts_the_loop_without_a_gpu(tmp_path):
    """bench/dev/gemv_sass.py compiles the GEMV for sm_90 offline (Triton's own
    ptxas / nvdisasm) and counts the K loop's instructions per weight."""
    import json
    import subprocess
    import sys

    from conftest import subprocess_env

    env = subprocess_env()
    env.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
    out = tmp_path / "sass.json"
    done = subprocess.run([sys.executable, str(SCRIPT.with_name("gemv_sass.py")), "--only", "bf16,int8 convert",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(out.read_text())
    assert set(counts) == {"bf16", "int8 convert"}
    assert counts["int8 convert"]["top"]["I2F"] > 0 and counts["bf16"]["top"]["FFMA"] > 0
    assert all(0 < c["per_weight"] < 50 for c in counts.values())


def test_tensor_core_gemv_compiles_for_sm90_without_a_gpu(tmp_path):
    """The tensor-core GEMV (16 rows, norm prologue, bias, PDL, conv epilogue)
    compiles for the H100 with bf16, int8 and fp8 weights, and its K loop runs
    on the tensor cores (HMMA / HGMMA), checked offline as above."""
    import json
    import subprocess
    import sys

    from conftest import subprocess_env

    env = subprocess_env()
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "sass.json"
    done = subprocess.run([sys.executable, str(SCRIPT.with_name("gemv_sass.py")), "--tc", "--fused", "--only",
                           "bf16,int8 convert,fp8 convert", "--json", str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(out.read_text())
    assert set(counts) == {"bf16", "int8 convert", "fp8 convert"}
    for c in counts.values():
        # FFMAs only for the input rows (sum of squares, norm scale): not one per weight (32 a thread)
        assert c["mma"] > 0 and c["ffma"] < 32


def test_the_tensor_core_gemv_streams_its_weights_through_async_copies(tmp_path):
    """Triton pipelines the tensor-core kernel's K loop (gemv_tc.py): compiled
    for sm_90 offline, the PTX carries enough cp.async copies for the weight
    tiles, num_stages deep (64 x 128 bf16 weights = 8 16-byte copies per
    thread of 4 warps per stage, 4 stages; the 16 input rows add 2 per stage),
    nothing spills; and the split-K GeGLU product with the norm prologue
    compiles with bf16 and int8 weights."""
    import json
    import subprocess
    import sys

    from conftest import subprocess_env

    env = subprocess_env()
    env.pop("TRITON_INTERPRET", None)
    runs = {"plain": ["--block", "64,128,4,4,1", "--only", "bf16"],
            "split": ["--fused", "--epilogue", "geglu", "--block", "64,128,4,3,4", "--only", "bf16,int8 convert"]}
    counts = {}
    for name, extra in runs.items():
        out = tmp_path / f"{name}.json"
        done = subprocess.run([sys.executable, str(SCRIPT.with_name("gemv_sass.py")), "--tc", *extra, "--json",
                               str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        counts[name] = json.loads(out.read_text())
    plain = counts["plain"]["bf16"]
    assert plain["cp_async"] >= 4 * 8, plain  # the weight tiles, not only the input rows, are copied ahead
    assert plain["mma"] > 0 and plain["local_bytes"] == 0
    for c in counts["split"].values():
        assert c["cp_async"] > 0 and c["mma"] > 0 and c["local_bytes"] == 0, c

