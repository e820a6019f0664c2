"""Prefill: tokens/s of `Session.feed` from position 0, by prompt length and chunk.

For every chunk size (--chunks, set as `model.prefill_chunk`) and prompt
length (--lengths): one warm-up feed (compiles the kernels for that chunk),
then one timed feed of random ids into a new session. On CUDA also the peak
GPU memory above what was allocated before the feed (the model and the
state pool). --hf-max N adds transformers' forward over the prompts of at
most N tokens. --attention sdpa runs the kernel path's attention on
PyTorch's SDPA instead of the Triton kernel (`KernelConfig.prefill_attention`),
for before/after figures on one machine.

    streamgemma bench prefill                                 # 2B shapes, random bf16 weights
    streamgemma bench prefill --lengths 8192 --chunks 2048 --json prefill.json
    streamgemma bench prefill --lengths 8192 --chunks 2048 --attention sdpa
    streamgemma bench prefill --preset tiny --device cpu --lengths 64 --chunks 32
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

import streamgemma as sg

from .args import int_list
from .common import build_model, describe, is_cuda, sync, token_ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int_list(1), default="512,2048,8192,65536",
                        help="prompt lengths (default 512,2048,8192,65536)")
    parser.add_argument("--chunks", type=int_list(1), default="512,1024,2048",
                        help="chunk sizes (default 512,1024,2048)")
    parser.add_argument("--hf-max", type=int, default=0,
                        help="longest prompt for transformers' forward (default 0: not run)")
    parser.add_argument("--attention", choices=("triton", "sdpa"), default="triton",
                        help="attention of the kernel prefill (default triton; sdpa: PyTorch's, the earlier path)")


def time_feed(model: sg.Model, tokens: list[int], chunk: int) -> tuple[float, float | None]:
    """(tokens/s, peak GPU memory above the allocated before, GB) of one feed from position 0."""
    model.prefill_chunk = chunk
    s = model.session()
    s.feed(tokens[: min(len(tokens), 2 * chunk)])  # warm-up: compiles the kernels
    s.close()
    sync(model)
    if is_cuda(model):
        base = torch.cuda.memory_allocated(model.device)
        torch.cuda.reset_peak_memory_stats(model.device)
    s = model.session()
    try:
        start = time.perf_counter()
        s.feed(tokens)
        sync(model)
        elapsed = time.perf_counter() - start
    finally:
        s.close()
    peak = (torch.cuda.max_memory_allocated(model.device) - base) / 1e9 if is_cuda(model) else None
    return len(tokens) / elapsed, peak


def time_hf(config: sg.GriffinConfig, device, lengths: list[int]) -> dict:
    """transformers' forward (same shapes, its own random bf16 weights): tokens/s and peak GB."""
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    hf = RecurrentGemmaConfig(**{k: v for k, v in config.to_hf_dict().items()
                                 if not k.startswith("streamgemma_") and k not in ("architectures", "model_type")})
    with torch.device(device):
        model = RecurrentGemmaForCausalLM(hf).to(torch.bfloat16).eval()
    out = {}
    with torch.no_grad():
        model(torch.randint(3, config.vocab_size, (1, 64), device=device), use_cache=False, logits_to_keep=1)
        for n in lengths:
            ids = torch.randint(3, config.vocab_size, (1, n), device=device)
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            model(ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize(device)
            out[n] = {"tok_s": n / (time.perf_counter() - start),
                      "peak_GB": (torch.cuda.max_memory_allocated(device) - base) / 1e9}
            print(f"transformers {n:6d} tokens: {out[n]['tok_s']:9.0f} tokens/s, peak +{out[n]['peak_GB']:.2f} GB",
                  flush=True)
    del model
    torch.cuda.empty_cache()
    return out


def run(args: argparse.Namespace) -> dict:
    lengths, chunks = args.lengths, args.chunks
    model = build_model(args)
    model.kernel_config = dataclasses.replace(model.kernel_config, prefill_attention=args.attention)
    print(model)
    out: dict = {"model": describe(model), "attention": args.attention if model.kernels else "reference",
                 "tok_s": {}, "peak_GB": {}}
    prompt = token_ids(max(lengths), model.config.vocab_size)
    for chunk in chunks:
        out["tok_s"][chunk], out["peak_GB"][chunk] = {}, {}
        for n in lengths:
            tps, peak = time_feed(model, prompt[:n], chunk)
            out["tok_s"][chunk][n], out["peak_GB"][chunk][n] = tps, peak
            print(f"chunk {chunk:5d}, {n:6d} tokens: {tps:9.0f} tokens/s"
                  + (f", peak +{peak:.2f} GB" if peak is not None else ""), flush=True)
    device, config = model.device, model.config
    del model
    if args.hf_max and device.type == "cuda":
        torch.cuda.empty_cache()
        out["transformers"] = time_hf(config, device, [n for n in lengths if n <= args.hf_max])
    return out
