"""Prompt processing (prefill) throughput for RecurrentGemma-2B shapes, random bf16 weights.

One run prints tokens/s and peak GPU memory for streamgemma's `feed` (chunked,
from position 0) at 512, 2,048, 8,192 and 65,536 tokens, for several chunk
sizes, and for transformers' forward over the same prompt where it fits.

    python bench/prefill.py [--lengths 512,2048,8192,65536] [--chunks 512,1024,2048] [--hf-max 8192] [--json f]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import streamgemma as sg
from decode import random_model


def time_feed(model: sg.Model, tokens: list[int], chunk: int) -> tuple[float, float]:
    """(tokens/s, peak GPU memory above the model's in GB) for one feed from position 0."""
    model.prefill_chunk = chunk
    s = model.session()
    s.feed(tokens[: min(len(tokens), 2 * chunk)])  # warm-up: compiles the kernels
    s.close()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    s = model.session()
    start = time.perf_counter()
    s.feed(tokens)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base
    s.close()
    return len(tokens) / elapsed, peak / 1e9


def time_hf(cfg: sg.GriffinConfig, lengths: list[int]) -> dict:
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    hf_cfg = RecurrentGemmaConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                     if not k.startswith("streamgemma_") and k not in ("architectures", "model_type")})
    with torch.device("cuda"):
        model = RecurrentGemmaForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    out = {}
    with torch.no_grad():
        model(torch.randint(3, cfg.vocab_size, (1, 64), device="cuda"), use_cache=False, logits_to_keep=1)
        for n in lengths:
            ids = torch.randint(3, cfg.vocab_size, (1, n), device="cuda")
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            model(ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            out[n] = (n / (time.perf_counter() - start), (torch.cuda.max_memory_allocated() - base) / 1e9)
            print(f"transformers {n:6d} tokens: {out[n][0]:9.0f} tokens/s, peak +{out[n][1]:.2f} GB", flush=True)
    del model
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512,2048,8192,65536")
    ap.add_argument("--chunks", default="512,1024,2048")
    ap.add_argument("--hf-max", type=int, default=8192, help="longest prompt for transformers (0: skip)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    chunks = [int(c) for c in args.chunks.split(",")]
    cfg = sg.GriffinConfig.preset("recurrentgemma-2b")
    results: dict = {"device": torch.cuda.get_device_name(), "streamgemma": {}, "transformers": {}}
    model = random_model(cfg)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, cfg.vocab_size, (max(lengths),), generator=g).tolist()
    for chunk in chunks:
        for n in lengths:
            tps, peak = time_feed(model, prompt[:n], chunk)
            results["streamgemma"][f"{chunk}/{n}"] = {"tokens_per_s": tps, "peak_GB": peak}
            print(f"streamgemma chunk {chunk:5d}, {n:6d} tokens: {tps:9.0f} tokens/s, peak +{peak:.2f} GB",
                  flush=True)
    del model
    torch.cuda.empty_cache()
    if args.hf_max:
        results["transformers"] = time_hf(cfg, [n for n in lengths if n <= args.hf_max])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
