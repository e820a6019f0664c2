"""Decode throughput and latency for RecurrentGemma-2B shapes (random bf16 weights).

One run prints: the measured copy bandwidth and the batch-1 floor (one read of
the weights per token); streamgemma tokens/s at batch 1, 8, 64, 256 and
transformers' `generate` at the same batches; ms/token at batch 1 at positions
~100, ~3,000 and ~50,000; `Session.generate` tokens/s at batch 1 (the
application's loop, sampling included); the GPU time of one batch-1 step
(graph replays back to back); GPU memory per extra session. With --check it first
compares the kernel step with the PyTorch reference step on 2B shapes.

Session state is filled with random values and positions are set directly:
the cost of a step depends on the position (how much of the ring is valid),
not on what the state holds.

    python bench/decode.py [--check] [--steps 64] [--hf-steps 16] [--batches 1,8,64,256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import streamgemma as sg
from streamgemma.model.griffin import Griffin
from streamgemma.model.pool import StatePool


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start = time.perf_counter()
    n = 10
    for _ in range(n):
        b.copy_(a)
    torch.cuda.synchronize()
    return n * nbytes / (time.perf_counter() - start)


def random_model(cfg: sg.GriffinConfig, dtype=torch.bfloat16, **options) -> sg.Model:
    with torch.device("meta"):
        net = Griffin(cfg, dtype=dtype)
    net = net.to_empty(device="cuda")
    net.init_random_(torch.Generator(device="cuda").manual_seed(0))
    return sg.Model(net, source="random 2B shapes", **options)


def fill_random_state(model: sg.Model, slots: list[int], position: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    for layer in model.pool.layers:
        for t in layer:
            t.copy_(torch.randn(t.shape, generator=g, device="cuda").to(t.dtype) * 0.5)
    for s in slots:
        model.pool.positions[s] = position


def time_decode(model: sg.Model, batch: int, steps: int, position: int = 100) -> float:
    """Seconds per step for `batch` sessions, greedy tokens fed back through the host."""
    sessions = [model.session() for _ in range(batch)]
    slots = [s.slot for s in sessions]
    fill_random_state(model, slots, position)
    tokens = [1] * batch
    for _ in range(3):  # warm-up: kernel compilation and graph capture
        logits = model.decode(slots, tokens)
        tokens = logits.argmax(-1).tolist()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        logits = model.decode(slots, tokens)
        tokens = logits.argmax(-1).tolist()
    elapsed = time.perf_counter() - start
    for s in sessions:
        s.close()
    return elapsed / steps


def time_generate(model: sg.Model, tokens: int) -> float:
    """Seconds per token of `Session.generate` at batch 1: what an application
    sees (sampling at temperature 1 on the device, each token read back and
    handed to the caller; the next step is queued before the host has it)."""
    s = model.session(seed=0)
    s.feed([2, 3, 4, 5])
    list(s.generate(max_tokens=4, stop_token_ids=[]))  # warm-up: sampling kernel, graph
    torch.cuda.synchronize()
    start = time.perf_counter()
    n = sum(1 for _ in s.generate(max_tokens=tokens, stop_token_ids=[]))
    elapsed = time.perf_counter() - start
    s.close()
    return elapsed / n


def graph_replay_ms(model: sg.Model, replays: int = 200, reps: int = 5) -> float:
    """GPU time of one batch-1 step: the median over `reps` of the mean time of
    `replays` back-to-back replays of the captured batch-1 graph (no host work
    between them). The graph must have been captured (any batch-1 decode); it
    replays its last inputs."""
    g = model._graphed._graphs[1]["graph"]
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(replays):
            g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / replays)
    return sorted(times)[len(times) // 2]


def time_hf_generate(cfg: sg.GriffinConfig, batch: int, new_tokens: int, prompt: int = 16) -> float:
    """transformers' generate, tokens/s over the new tokens (prompt excluded)."""
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    hf_cfg = RecurrentGemmaConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                     if not k.startswith("streamgemma_") and k not in ("architectures", "model_type")})
    with torch.device("cuda"):
        model = RecurrentGemmaForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    ids = torch.randint(3, cfg.vocab_size, (batch, prompt), device="cuda")
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del model
    torch.cuda.empty_cache()
    return batch * new_tokens / elapsed


def check_against_reference(cfg: sg.GriffinConfig, one_by_one: bool = False) -> dict:
    """One kernel step vs the PyTorch reference step on 2B shapes, 4 sessions at
    mixed positions (0, 100, exactly the window, past many wraps): decoded
    together (batch 4: the matmul path) or one_by_one (batch 1: the GEMV path)."""
    fast = random_model(cfg, kernels=True)
    ref = sg.Model(fast.network, kernels=False)  # same weights, reference path
    positions = [0, 100, cfg.attention_window, 50_000]
    out = {}
    for m in (ref, fast):
        sessions = [m.session() for _ in positions]
        slots = [s.slot for s in sessions]
        fill_random_state(m, slots, 0)
        for s, p in zip(slots, positions):
            m.pool.positions[s] = p
        if one_by_one:
            logits = torch.cat([m.decode([s], [t]).float().clone() for s, t in zip(slots, [5, 6, 7, 8])])
        else:
            logits = m.decode(slots, [5, 6, 7, 8]).float()
        out[m is fast] = (logits,
                          [t.float().clone() for layer in m.pool.layers for t in layer])
        for s in sessions:
            s.close()
    (want, want_state), (got, got_state) = out[False], out[True]
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    result = {"logits_rel_err": rel(got, want),
              "state_rel_err": max(rel(g, w) for g, w in zip(got_state, want_state)),
              "top1_agree": (got.argmax(-1) == want.argmax(-1)).float().mean().item()}
    del fast, ref
    torch.cuda.empty_cache()
    return result


def configure_gemv(args) -> None:
    """Apply --gemv-max-batch / --gemv-configs / --no-pdl (module-level settings)."""
    from streamgemma.fast.decode import KernelDecoder
    from streamgemma.kernels import gemv, pdl

    if args.gemv_max_batch is not None:
        KernelDecoder.GEMV_MAX_BATCH = min(args.gemv_max_batch, gemv.MAX_BATCH)
    if args.gemv_configs:
        with open(args.gemv_configs) as f:
            tuned = json.load(f)
        # the PDL-timed winners when PDL is on and the sweep timed them
        best = tuned["best"] if args.no_pdl else (tuned.get("best_pdl") or tuned["best"])
        for key, cfg in best.items():
            b, epi, n, k = key.split(",")
            gemv.CONFIG_OVERRIDE[(int(b), epi, int(n), int(k))] = tuple(cfg)
    if args.no_pdl:
        pdl.set_enabled(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--hf-steps", type=int, default=16, help="new tokens per transformers generate (0: skip)")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--json", default=None)
    ap.add_argument("--gemv-max-batch", type=int, default=None,
                    help="largest batch on the fused GEMV path (0: matmul path only)")
    ap.add_argument("--gemv-configs", default=None, help="JSON from bench/tune_gemv.py --json")
    ap.add_argument("--no-pdl", action="store_true", help="decode kernels without programmatic dependent launch")
    args = ap.parse_args()
    configure_gemv(args)
    batches = [int(b) for b in args.batches.split(",")]
    cfg = sg.GriffinConfig.preset("recurrentgemma-2b")
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.check:
        results["check"] = check_against_reference(cfg)
        print("check vs reference (bf16, batch 4):", results["check"], flush=True)
        results["check_batch1"] = check_against_reference(cfg, one_by_one=True)
        print("check vs reference (bf16, batch 1 x 4):", results["check_batch1"], flush=True)

    bw = copy_bandwidth()
    model = random_model(cfg)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.network.parameters())
    floor = weight_bytes / bw
    results.update(copy_bw_GBps=bw / 1e9, weight_GB=weight_bytes / 1e9, floor_tok_s=1 / floor)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; weights {weight_bytes / 1e9:.2f} GB; "
          f"batch-1 floor {1 / floor:.0f} tokens/s", flush=True)

    # memory per extra session: a pool sized for 256 more sessions
    before = torch.cuda.memory_allocated()
    pool = StatePool(cfg, torch.bfloat16, "cuda", capacity=256)
    per_session = (torch.cuda.memory_allocated() - before) / 256
    del pool
    results.update(state_MB=model.pool.slot_bytes() / 1e6, mem_per_session_MB=per_session / 1e6)
    print(f"state per session {model.pool.slot_bytes() / 1e6:.1f} MB; "
          f"GPU memory per extra session {per_session / 1e6:.1f} MB", flush=True)

    results["streamgemma_tok_s"] = {}
    for b in batches:
        sec = time_decode(model, b, args.steps)
        results["streamgemma_tok_s"][b] = b / sec
        extra_info = f" ({floor / sec:.0%} of the floor)" if b == 1 else ""
        print(f"streamgemma batch {b:4d}: {b / sec:9.0f} tokens/s, {sec * 1e3:.2f} ms/step{extra_info}", flush=True)
    results["ms_per_token_by_position"] = {}
    for pos in (100, 3_000, 50_000):
        sec = time_decode(model, 1, args.steps, position=pos)
        results["ms_per_token_by_position"][pos] = sec * 1e3
        print(f"batch 1 at position {pos:6d}: {sec * 1e3:.3f} ms/token", flush=True)
    sec = time_generate(model, args.steps)
    results["session_generate_batch1_tok_s"] = 1 / sec
    print(f"Session.generate batch 1: {1 / sec:.0f} tokens/s, {sec * 1e3:.3f} ms/token", flush=True)
    ms = graph_replay_ms(model)
    results["graph_replay_batch1_ms"] = ms
    print(f"batch 1 GPU time per step (graph replay): {ms:.3f} ms, {1e3 / ms:.0f} tokens/s "
          f"({floor * 1e3 / ms:.0%} of the floor)", flush=True)
    del model
    torch.cuda.empty_cache()

    if args.hf_steps:
        results["transformers_tok_s"] = {}
        for b in batches:
            tps = time_hf_generate(cfg, b, args.hf_steps)
            results["transformers_tok_s"][b] = tps
            ours = results["streamgemma_tok_s"][b]
            print(f"transformers batch {b:4d}: {tps:9.1f} tokens/s (streamgemma {ours / tps:.0f}x)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
