"""The tensor-core fused GEMV (kernels/gemv_tc.py) against the PyTorch
reference: every epilogue x input source, batches 1, 3, 5 and 16 (the batch
padded to the MMA's 16 rows), float / int8 / fp8 weights, mixed positions
and padding slots (-1) for the conv, unsplit and split over K (the split-K
workspace left zero for the next call); and the whole decode step on the
fused path at batch 2-16. Without a GPU under Triton's interpreter
(conftest.py), float32 models: the MMA then multiplies in float32.

Outputs are views of NaN-poisoned buffers with extra rows past the batch:
every element of the batch must be written, and no padded row."""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_tokens
from reference import conv1d_step_ref, rel_err
from test_kernels import random_pool, reference_step

import streamgemma as sg
from streamgemma.fast.decode import KernelDecoder
from streamgemma.fast.fused_weights import FusedWeights
from streamgemma.model.quantize import dequantize, quantize_rows

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TC_BLOCK = (16, 16, 4, "tc")  # 37 features, 50 columns: 3 programs, 4 ragged K tiles
K, N, L, CK = 50, 37, 20, 4  # conv: the first L features are conv channels


def _case(epilogue: str, source: str, batch: int, fmt: str | None, seed: int):
    """Arguments of one GEMV call and what it must produce (float32 torch)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(DEV)  # noqa: E731
    w = rnd(2 * N if epilogue == "geglu" else N, K) / K ** 0.5
    call, wd = dict(weight=w, epilogue=epilogue), w
    if fmt:
        call["weight"], call["weight_scale"] = quantize_rows(w, fmt)
        wd = dequantize(call["weight"], call["weight_scale"], torch.float32)
    norm_scale = rnd(K) * 0.1
    if source == "x":  # the residual stream plus the previous delta, normalised
        x, delta = rnd(batch, K), rnd(batch, K)
        call.update(src=x, delta=delta, norm_scale=norm_scale)
        resid = x + delta
    elif source == "tokens":  # the embedding rows (a quantized table with quantized weights)
        table = rnd(30, K)
        tokens = torch.randint(0, 30, (batch,), generator=g).to(DEV)
        call.update(tokens=tokens, emb_scale=1.5, norm_scale=norm_scale)
        if fmt:
            table, call["src_scale"] = quantize_rows(table, fmt)
            resid = dequantize(table[tokens], call["src_scale"][tokens], torch.float32) * 1.5
        else:
            resid = table[tokens] * 1.5
        call["src"] = table
    else:  # "plain": the input rows as they are
        resid = rnd(batch, K)
        call["src"] = resid
    inp = resid if source == "plain" else \
        resid / torch.sqrt(resid.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + norm_scale)
    y = inp @ wd.T
    if epilogue != "softcap":
        call["bias"] = rnd(w.shape[0])
        y = y + call["bias"]
    want = dict(residual=resid if source != "plain" else None)
    if epilogue == "geglu":
        want["out"] = F.gelu(y[:, :N], approximate="tanh") * y[:, N:]
    elif epilogue == "softcap":
        call["cap"] = 3.0
        want["out"] = 3.0 * torch.tanh(y / 3.0)
    elif epilogue == "conv":
        state = rnd(batch + 2, CK - 1, L)
        cw, cb = rnd(CK, L), rnd(L)
        slots = torch.randperm(batch + 2, generator=g)[:batch].to(DEV)
        slots[1::3] = -1  # padding rows
        pos = torch.tensor([0, 1, 2, 3, 100, 7, 9, 11, 2, 0, 1, 50, 3, 4, 2, 1][:batch], device=DEV)
        conv, new_state, live = conv1d_step_ref(state, slots, pos, cw, cb, y[:, :L])
        call["conv"] = (state, slots, pos, cw, cb)
        want.update(out=torch.cat([conv, y[:, L:]], dim=1), state=new_state, live=live)
    else:
        want["out"] = y
    return call, want


def _run(call, want, batch, config=TC_BLOCK, **kw):
    from streamgemma.kernels.gemv import gemv

    n_out = want["out"].shape[1]
    out_buf = torch.full((batch + 3, n_out), float("nan"), device=DEV)
    res_buf = torch.full((batch + 3, K), float("nan"), device=DEV)
    if want["residual"] is not None:
        call["residual_out"] = res_buf[:batch]
    gemv(out=out_buf[:batch], config=config, **call, **kw)
    return out_buf, res_buf


@pytest.mark.parametrize("fmt", [None, "int8", "fp8"])
@pytest.mark.parametrize("epilogue", ["plain", "geglu", "conv", "softcap"])
@pytest.mark.parametrize("batch", [1, 3, 5, 16])
def test_tensor_core_gemv_matches_torch(batch, epilogue, fmt):
    """Each input source once per epilogue and format, the batches spread over them."""
    source = ("x", "tokens", "plain")[(batch + len(epilogue)) % 3]
    if epilogue == "conv" and source == "plain":
        source = "x"  # the conv product always normalises its input
    call, want = _case(epilogue, source, batch, fmt, seed=batch * 100 + len(epilogue) * 7 + len(fmt or ""))
    out_buf, res_buf = _run(call, want, batch)
    out = out_buf[:batch]
    assert out_buf[batch:].isnan().all() and res_buf[batch:].isnan().all(), "a padded row was written"
    if epilogue == "conv":  # padding rows' conv outputs are unspecified; their state is untouched
        live = want["live"]
        assert rel_err(out[live], want["out"][live]) < 1e-5
        assert rel_err(out[:, L:], want["out"][:, L:]) < 1e-5
        assert rel_err(call["conv"][0], want["state"]) < 1e-6
    else:
        assert rel_err(out, want["out"]) < 1e-5
    if want["residual"] is not None:
        assert rel_err(res_buf[:batch], want["residual"]) < 1e-6


@pytest.mark.parametrize("fmt", [None, "int8", "fp8"])
@pytest.mark.parametrize("epilogue", ["plain", "geglu", "conv", "softcap"])
def test_split_k_matches_torch_and_leaves_its_workspace_zero(epilogue, fmt):
    """K split over 2-4 programs per tile (50 columns: 4 tiles of 16, the last
    ragged; 4 stages): the last program to finish a tile sums the partials and
    runs the epilogue. The counters are zero after the call, so a second call
    (a graph replay) on the same inputs gives the same bits."""
    from streamgemma.kernels import gemv_tc

    batch = (16, 3, 5, 1)[(len(epilogue) + len(fmt or "")) % 4]
    splits = (2, 3, 4)[len(epilogue) % 3]  # 3 splits of 4 K tiles: 2 + 2, the third gets none and is dropped
    source = ("x", "tokens", "plain")[len(fmt or "") % 3]
    if epilogue == "conv" and source == "plain":
        source = "tokens"
    call, want = _case(epilogue, source, batch, fmt, seed=40 + batch + len(epilogue))
    config = (16, 16, 4, "tc", 4, splits)
    ws = gemv_tc.workspace(want["out"].shape[1], K, config, DEV)
    assert ws is not None and not ws[1].any()
    state0 = call["conv"][0].clone() if epilogue == "conv" else None
    outs = []
    for _ in range(2):
        if epilogue == "conv":
            call["conv"][0].copy_(state0)
        out_buf, res_buf = _run(call, want, batch, config=config, workspace=ws)
        assert not ws[1].any(), "a tile counter was left non-zero"
        assert out_buf[batch:].isnan().all() and res_buf[batch:].isnan().all(), "a padded row was written"
        outs.append(out_buf[:batch].clone())
    out = outs[0]
    assert torch.equal(outs[0], outs[1])
    if epilogue == "conv":
        live = want["live"]
        assert rel_err(out[live], want["out"][live]) < 1e-5 and rel_err(out[:, L:], want["out"][:, L:]) < 1e-5
        assert rel_err(call["conv"][0], want["state"]) < 1e-6
    else:
        assert rel_err(out, want["out"]) < 1e-5
    if want["residual"] is not None:
        assert rel_err(res_buf[:batch], want["residual"]) < 1e-6


def test_split_k_refuses_a_missing_or_small_workspace():
    from streamgemma.kernels import gemv_tc

    call, want = _case("plain", "x", 3, None, seed=5)
    with pytest.raises(ValueError, match="workspace"):
        _run(call, want, 3, config=(16, 16, 4, "tc", 3, 2))
    small = gemv_tc.workspace(want["out"].shape[1], K, (32, 16, 4, "tc", 3, 2), DEV)
    with pytest.raises(ValueError, match="workspace"):
        _run(call, want, 3, config=(16, 16, 4, "tc", 3, 2), workspace=small)
    assert gemv_tc.workspace(N, K, (16, 16, 4, "tc", 3, 1), DEV) is None  # unsplit: none needed
    with pytest.raises(ValueError, match="num_stages"):
        _run(call, want, 3, config=(16, 16, 4, "tc", 0))


@pytest.mark.parametrize("source", ["x", "tokens", "plain"])
def test_tensor_core_default_block_and_switch(source):
    """`tensor_cores=True` without a block takes the variant's default block
    and gives the CUDA-core kernel's result (at batch 16, MAX_BATCH, both);
    a block too small for an MMA is refused."""
    call, want = _case("plain", source, 16, "int8", seed=3)
    tc_out, _ = _run(dict(call), want, 16, config=None, tensor_cores=True)
    cc_out, _ = _run(dict(call), want, 16, config=(8, 16, 4))
    assert rel_err(tc_out[:16], want["out"]) < 1e-5 and rel_err(cc_out[:16], want["out"]) < 1e-5
    with pytest.raises(ValueError, match="tensor-core"):
        _run(dict(call), want, 16, config=(8, 16, 4, "tc"))


@pytest.mark.skipif(DEV != "cuda", reason="Triton's interpreter (3.9) multiplies bfloat16 tl.dot operands "
                    "as their raw bits: the bfloat16 MMA is checked on the GPU")
def test_tensor_core_gemv_in_bfloat16_rounds_the_input_rows():
    """A bfloat16 model: the MMA's inputs are the input rows rounded to bfloat16
    (the CUDA-core kernel keeps them float32), so the two differ by about one
    bfloat16 rounding and both stay close to the float32 product."""
    from streamgemma.kernels.gemv import gemv

    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 64, generator=g).bfloat16().to(DEV)
    w = (torch.randn(32, 64, generator=g) / 8).bfloat16().to(DEV)
    scale = (torch.randn(64, generator=g) * 0.1).bfloat16().to(DEV)
    outs = []
    for config in ((16, 32, 4, "tc"), (16, 32, 4)):
        out = torch.full((4, 32), float("nan"), device=DEV, dtype=torch.bfloat16)
        gemv(x, w, out, norm_scale=scale, config=config)
        outs.append(out.float())
    xf = x.float()
    want = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + scale.float())) @ w.float().T
    assert rel_err(outs[0], want) < 2e-2 and rel_err(outs[1], want) < 2e-2
    assert rel_err(outs[0], outs[1]) < 2e-2


def _split_blocks(fused: FusedWeights, embedding: torch.Tensor, bucket: int, block: tuple) -> dict:
    """gemv_blocks naming `block` for every product of the model at `bucket`."""
    shapes = {("plain", *fused.layers[0]["w_out"].shape), ("plain", *fused.layers[0]["w_down"].shape),
              ("geglu", *fused.layers[0]["w_up"].shape), ("softcap", *embedding.shape)}
    for entry in fused.layers:
        if "w_qkv" in entry:
            shapes.add(("plain", *entry["w_qkv"].shape))
        if "w_xy" in entry:
            shapes.add(("conv", *entry["w_xy"].shape))
    return {(bucket, *shape): block for shape in shapes}


@pytest.mark.parametrize("batch,fmt,split", [(b, f, False) for f in (None, "int8") for b in (2, 5, 16)]
                         + [(5, None, True), (16, "fp8", True)])
def test_decode_step_on_the_tensor_core_path_matches_the_reference(batch, fmt, split, monkeypatch):
    """The whole KernelDecoder step with every product on the tensor-core GEMV
    (gemv_max_batch 16; split: every product split over K, two steps in a row
    on the decoder's workspaces): logits and every slot's state against the
    reference step, mixed positions (reset, wrapped ring) and padding rows."""
    cfg = sg.GriffinConfig.preset("tiny")
    ref = sg.Model.random(cfg, seed=3, device=DEV, dtype="float32", kernels=False, quantize=fmt)
    fast = sg.Model.random(cfg, seed=3, device=DEV, dtype="float32", kernels=True, quantize=fmt)
    for m in (ref, fast):
        while m.pool.capacity < batch + 2:
            m.pool._grow()
        random_pool(m, seed=4)
    live = batch - 1 if batch > 2 else batch  # the larger batches carry a padding row
    slots = list(range(1, live + 1)) + [-1] * (batch - live)
    positions = [(0, 3, cfg.attention_window, 2 * cfg.attention_window + 5, 40)[i % 5] for i in range(batch)]
    fused = FusedWeights(fast.network)
    blocks = {}
    if split:
        bucket = 1 << (batch - 1).bit_length()
        blocks = _split_blocks(fused, fused.embedding, bucket, (32, 32, 4, "tc", 3, 2 + batch % 2))
    from streamgemma.kernels import gemv_tc

    made = []  # the split workspaces the decoder allocates: one per shape, then reused
    monkeypatch.setattr(gemv_tc, "workspace", lambda *a, f=gemv_tc.workspace: made.append(f(*a)) or made[-1])
    kc = sg.KernelConfig(gemv_max_batch=16, gemv_tensor_cores={fmt or "float": (2, 4, 8, 16)}, gemv_blocks=blocks)
    decoder = KernelDecoder(fast.network, fast.pool, fused, kc)
    t = lambda v: torch.tensor(v, device=DEV)  # noqa: E731
    for step in range(2 if split else 1):
        tokens = random_tokens(batch, cfg.vocab_size, seed=5 + step)
        want = reference_step(ref, tokens[:live], slots[:live], positions[:live])
        got = decoder.step(t(tokens), t(slots), t(positions))
        assert rel_err(got[:live], want) < 1e-4
        for rl, fl in zip(ref.pool.layers, fast.pool.layers):
            for rt, ft in zip(rl, fl):
                assert rel_err(ft, rt) < 1e-4  # every slot: padding rows touched none
        positions = [p + 1 for p in positions]
    assert len(made) == 6 and all((w is not None) == split for w in made)  # qkv, xy, out, up, down, LM head


@pytest.mark.parametrize("fmt,widening", [("int8", 1), ("fp8", 1)])  # int8 MAGIC, fp8 VIA_F16 (widen.py)
def test_tensor_core_gemv_with_the_other_widenings(fmt, widening):
    """The weights widened through widen.py's float32 variants before the MMA: the same values."""
    call, want = _case("geglu", "x", 5, fmt, seed=21)
    out_buf, _ = _run(call, want, 5, widening=widening)
    assert rel_err(out_buf[:5], want["out"]) < 1e-5 and out_buf[5:].isnan().all()


@pytest.mark.skipif(DEV == "cuda", reason="the tools' CPU modes (on a GPU they run the 2B shapes)")
def test_the_tuning_tools_run_on_the_cpu(tmp_path):
    """bench/dev/tune_gemv.py --quick and decode_variants.py --tiny end to end
    under the interpreter: both kernels swept, a JSON whose best table loads
    as gemv_blocks, the tensor-core variants checked against the reference."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from conftest import subprocess_env

    from streamgemma.fast.tuning import gemv_blocks_from_json

    dev = Path(__file__).resolve().parents[1] / "bench" / "dev"
    tuned = tmp_path / "tune.json"
    run = lambda *a: subprocess.run([sys.executable, *a], env=subprocess_env(TRITON_INTERPRET="1"),  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    done = run(str(dev / "tune_gemv.py"), "--quick", "--batches", "2", "--shapes", "out,up", "--quantize", "int8",
               "--json", str(tuned))
    assert done.returncode == 0, done.stderr[-2000:]
    table = json.loads(tuned.read_text())
    blocks = gemv_blocks_from_json(table["best"])
    assert table["commit"]["commit"]  # records say what was measured
    assert len(blocks) == 2 and all(key[0] == 2 and key[4] == "int8" for key in blocks)
    assert all(len(b) == 6 and b[3] == "tc" for b in table["best_tensor_core"].values())  # stages, splits
    assert all(max(r["errors"].values()) < 1e-5 for r in table["results"])  # float32 on the CPU
    out = tmp_path / "variants.json"
    done = run(str(dev / "decode_variants.py"), "--tiny", "--variants", "tc+tc1q+tuned,tc+tunedtc", "--batches", "3",
               "--positions", "9", "--quantize", "int8", "--gemv-json", str(tuned), "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    checks = record["checks"]
    assert record["commit"]["commit"]
    assert set(checks) == {"tc+tc1q+tuned b1", "tc+tc1q+tuned b3", "tc+tunedtc b1", "tc+tunedtc b3"}
    assert all(c["logits_rel_err"] < 1e-4 and c["state_rel_err"] < 1e-4 for c in checks.values())


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs: the split-K workspaces under graph replay")
@pytest.mark.parametrize("batch", [2, 5, 16])
def test_graphed_steps_on_split_k_products_match_and_repeat_bit_for_bit(batch):
    """Graph replays of the whole step with every product on split-K
    tensor-core GEMVs (float32 tiny model): each replay against the matmul
    path from the same state, and the same replays again from a snapshot give
    the same bits (the workspaces are zero after every replay; the split sums
    run in a fixed order)."""
    cfg = sg.GriffinConfig.preset("tiny")
    fused = FusedWeights(sg.Model.random(cfg, seed=3, device="cpu", dtype="float32", kernels=False).network)
    bucket = 1 << (batch - 1).bit_length()
    blocks = _split_blocks(fused, fused.embedding, bucket, (32, 32, 4, "tc", 3, 2))
    kc = sg.KernelConfig(gemv_max_batch=16, gemv_blocks=blocks, gemv_tensor_cores={"float": (2, 4, 8, 16)})
    fast = sg.Model.random(cfg, seed=3, device="cuda", dtype="float32", kernel_config=kc)
    ref = sg.Model.random(cfg, seed=3, device="cuda", dtype="float32", kernel_config=sg.KernelConfig(gemv_max_batch=0))
    runs = {}
    for name, m in (("fast", fast), ("ref", ref)):
        sessions = [m.session() for _ in range(batch)]
        for i, s in enumerate(sessions):
            s.feed(random_tokens(2 + 5 * i, 256, seed=i))
        blobs = [s.snapshot() for s in sessions]
        for again in range(2 if name == "fast" else 1):
            if again:
                sessions = [m.restore(b) for b in blobs]
            runs[name, again] = torch.stack([m.decode([s.slot for s in sessions], [7 + t] * batch).clone()
                                             for t in range(4)])
    assert rel_err(runs["fast", 0], runs["ref", 0]) < 1e-4
    assert torch.equal(runs["fast", 0], runs["fast", 1])
