"""Decode: tokens/s by batch size, ms/token by position, Session.generate.

Per batch size B (--batches): B sessions at position 100 decode --steps
steps with `model.decode`, each step's greedy tokens read back to the host and
fed to the next (a host-synchronous loop), and on CUDA the same steps queued
back to back on tokens already on the device, as the server's tick queues
them (the GPU never waits for the host: the device-fed figure). At batch 1 also: ms/token at each
of --positions; `Session.generate` tokens/s (the application's loop: sampling
on the device, the next step queued on the sampled id before the host has
it); and on CUDA the GPU time of a step (steps queued back to back on a
token already on the device, so the GPU never waits for the host), with the
floor it is measured against: one read of the weights per token at the
measured device-to-device copy bandwidth. --hf-steps N adds transformers'
`generate` at the same batch sizes.

Sessions reach their position by a prefill of random ids (the first) and
forks (the rest): a step's cost depends on the position, not on the ids.

    streamgemma bench decode                                  # 2B shapes, random bf16 weights
    streamgemma bench decode --batches 1,64,256 --json decode.json
    streamgemma bench decode --preset tiny --device cpu --batches 1,8 --steps 8 --positions 10
"""

from __future__ import annotations

import argparse
import time

import torch

import streamgemma as sg

from .args import int_list, positive_int
from .common import build_model, describe, is_cuda, sync, token_ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", type=int_list(1), default="1,8,64,256", help="batch sizes (default 1,8,64,256)")
    parser.add_argument("--steps", type=positive_int, default=64, help="timed steps per batch size (default 64)")
    parser.add_argument("--positions", type=int_list(0, empty=True), default="100,3000,50000",
                        help="positions for batch-1 ms/token ('' to skip; default 100,3000,50000)")
    parser.add_argument("--generate-tokens", type=int, default=None,
                        help="tokens of the timed Session.generate (default: --steps; 0 to skip)")
    parser.add_argument("--hf-steps", type=int, default=0,
                        help="new tokens per transformers generate (default 0: not run)")


def sessions_at(model: sg.Model, batch: int, position: int) -> list[sg.Session]:
    first = model.session(seed=0)
    if position:
        first.feed(token_ids(position, model.config.vocab_size))
    return [first] + [first.fork() for _ in range(batch - 1)]


def time_decode(model: sg.Model, batch: int, steps: int, position: int = 100) -> float:
    """Seconds per step for `batch` sessions, greedy tokens fed back through the host."""
    sessions = sessions_at(model, batch, position)
    slots = [s.slot for s in sessions]
    tokens = [1] * batch
    try:
        for _ in range(3):  # warm-up: kernel compilation and graph capture
            tokens = model.decode(slots, tokens).argmax(-1).tolist()
        sync(model)
        start = time.perf_counter()
        for _ in range(steps):
            tokens = model.decode(slots, tokens).argmax(-1).tolist()
        return (time.perf_counter() - start) / steps
    finally:
        for s in sessions:
            s.close()


def time_generate(model: sg.Model, tokens: int) -> float:
    """Seconds per token of `Session.generate` at batch 1 (temperature 1)."""
    s = model.session(seed=0)
    try:
        s.feed([2, 3, 4, 5])
        list(s.generate(max_tokens=4, stop_token_ids=[]))  # warm-up: sampling kernel, graph
        sync(model)
        start = time.perf_counter()
        n = sum(1 for _ in s.generate(max_tokens=tokens, stop_token_ids=[]))
        return (time.perf_counter() - start) / n
    finally:
        s.close()


def device_step_ms(model: sg.Model, steps: int = 200, reps: int = 5, position: int = 100, batch: int = 1) -> float:
    """GPU time of one step of `batch` sessions (CUDA): the median over `reps`
    of the mean time of `steps` steps queued back to back on tokens on the
    device (as the engine's tick queues them). The host queues a step faster
    than the GPU runs one, so no step waits for it."""
    sessions = sessions_at(model, batch, position)
    slots = [s.slot for s in sessions]
    token = torch.ones(batch, dtype=torch.long, device=model.device)
    try:
        for _ in range(3):
            model.decode(slots, token)
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            sync(model)
            a.record()
            for _ in range(steps):
                model.decode(slots, token)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / steps)
        return sorted(times)[len(times) // 2]
    finally:
        for s in sessions:
            s.close()


def copy_bandwidth(device: torch.device, nbytes: int = 4 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    n = 10
    for _ in range(n):
        b.copy_(a)
    torch.cuda.synchronize(device)
    return n * nbytes / (time.perf_counter() - start)


def time_hf_generate(config: sg.GriffinConfig, device, batch: int, new_tokens: int, prompt: int = 16) -> float:
    """transformers' generate with the same shapes (its own random bf16
    weights), tokens/s over the new tokens."""
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    hf = RecurrentGemmaConfig(**{k: v for k, v in config.to_hf_dict().items()
                                 if not k.startswith("streamgemma_") and k not in ("architectures", "model_type")})
    with torch.device(device):
        model = RecurrentGemmaForCausalLM(hf).to(torch.bfloat16).eval()
    ids = torch.randint(3, config.vocab_size, (batch, prompt), device=device)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    del model
    torch.cuda.empty_cache()
    return batch * new_tokens / elapsed


def run(args: argparse.Namespace) -> dict:
    model = build_model(args)
    batches, positions = args.batches, args.positions
    out: dict = {"model": describe(model)}
    print(model)
    s = model.session()
    out["state_MB_per_session"] = s.state_bytes() / 1e6
    s.close()
    weight_bytes = model.weight_bytes()
    out["weight_GB"] = weight_bytes / 1e9
    floor_s = None
    if is_cuda(model):
        bw = copy_bandwidth(model.device)
        floor_s = weight_bytes / bw
        out.update(copy_bw_GBps=bw / 1e9, floor_tok_s=1 / floor_s)
        print(f"copy bandwidth {bw / 1e9:.0f} GB/s; weights {weight_bytes / 1e9:.2f} GB; "
              f"batch-1 floor {1 / floor_s:.0f} tokens/s", flush=True)

    out["tok_s"], out["ms_per_step"] = {}, {}
    if is_cuda(model):
        out["device_fed_tok_s"], out["device_fed_ms_per_step"] = {}, {}
    for b in batches:
        sec = time_decode(model, b, args.steps)
        out["tok_s"][b], out["ms_per_step"][b] = b / sec, sec * 1e3
        line = f"batch {b:4d}: {b / sec:9.0f} tokens/s, {sec * 1e3:.3f} ms/step (ids through the host)"
        if is_cuda(model):
            ms = device_step_ms(model, steps=max(16, args.steps), reps=3, batch=b)
            out["device_fed_tok_s"][b], out["device_fed_ms_per_step"][b] = b / ms * 1e3, ms
            line += f"; {b / ms * 1e3:9.0f} tokens/s, {ms:.3f} ms/step queued on the device"
        print(line, flush=True)
    out["batch1_ms_by_position"] = {}
    for p in positions:
        sec = time_decode(model, 1, args.steps, position=p)
        out["batch1_ms_by_position"][p] = sec * 1e3
        print(f"batch 1 at position {p:6d}: {sec * 1e3:.3f} ms/token", flush=True)
    n = args.steps if args.generate_tokens is None else args.generate_tokens
    if n:
        sec = time_generate(model, n)
        out["session_generate_tok_s"] = 1 / sec
        print(f"Session.generate, batch 1: {1 / sec:.0f} tokens/s, {sec * 1e3:.3f} ms/token", flush=True)
    if is_cuda(model):
        ms = device_step_ms(model)
        out.update(gpu_step_batch1_ms=ms, gpu_step_batch1_floor_share=floor_s * 1e3 / ms)
        print(f"batch 1 GPU time per step: {ms:.3f} ms, {1e3 / ms:.0f} tokens/s "
              f"({floor_s * 1e3 / ms:.0%} of the floor)", flush=True)
    device, config = model.device, model.config
    del model
    if args.hf_steps and device.type == "cuda":
        torch.cuda.empty_cache()
        out["transformers_tok_s"] = {}
        for b in batches:
            tps = time_hf_generate(config, device, b, args.hf_steps)
            out["transformers_tok_s"][b] = tps
            print(f"transformers batch {b:4d}: {tps:9.1f} tokens/s", flush=True)
    return out
