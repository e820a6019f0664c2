"""Quantized weights against the same model unquantized: top-1 agreement and logit error.

The model of --model / --preset is loaded twice: as is (--dtype) and with
each format of --formats (int8, fp8, int4; --quantize is ignored here). Both read
the same --positions random ids (or the text of --text) with the parallel
prefill path in chunks of --chunk, so every position's logits are compared:
top-1 agreement (same argmax), the largest and the mean absolute logit
difference, and the relative error (norm of the difference over the norm of
the unquantized logits), all over float32 logits after the soft-cap.

    streamgemma bench quantize                                   # 2B shapes, random bf16 weights, 2,000 positions
    streamgemma bench quantize --model demo --device cpu --text tests/data/demo_heldout/sample.txt
    streamgemma bench quantize --preset tiny --device cpu --positions 64
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

import streamgemma as sg

from .args import positive_int
from .common import build_model, describe, token_ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--formats", default="int8,fp8,int4", help="formats to compare (default int8,fp8,int4)")
    parser.add_argument("--positions", type=positive_int, default=2000, help="positions compared (default 2000)")
    parser.add_argument("--chunk", type=positive_int, default=250, help="positions per prefill call (default 250)")
    parser.add_argument("--text", type=Path, help="compare on the tokens of this text file (needs a tokenizer) "
                                                  "instead of random ids")


def compare(reference: sg.Model, quantized: sg.Model, tokens: list[int], chunk: int) -> dict:
    """Both models read `tokens` from position 0; their logits compared position by position."""
    agree, count, max_abs, sum_abs, diff_sq, ref_sq = 0, 0, 0.0, 0.0, 0.0, 0.0
    with reference.session() as rs, quantized.session() as qs:
        for start in range(0, len(tokens), chunk):
            part = tokens[start:start + chunk]
            a = reference.prefill(rs.slot, part, all_logits=True).float()
            b = quantized.prefill(qs.slot, part, all_logits=True).float().to(a.device)
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            count += a.shape[0]
            d = (a - b).abs()
            max_abs = max(max_abs, float(d.max()))
            sum_abs += float(d.sum())
            diff_sq += float(d.pow(2).sum())
            ref_sq += float(a.pow(2).sum())
    vocab = reference.config.vocab_size
    return {"top1_agreement": agree / count, "positions": count, "max_abs_logit_error": max_abs,
            "mean_abs_logit_error": sum_abs / (count * vocab), "rel_error": (diff_sq / ref_sq) ** 0.5}


def run(args: argparse.Namespace) -> dict:
    plain = copy.copy(args)
    plain.quantize = None
    reference = build_model(plain)
    print(reference)
    if args.text is not None:
        if reference.tokenizer is None:
            raise SystemExit("--text needs a model with a tokenizer (--model)")
        tokens = [reference.tokenizer.bos_id] + reference.tokenizer.encode(args.text.read_text(encoding="utf-8"))
        tokens = tokens[:args.positions]
    else:
        tokens = token_ids(args.positions, reference.config.vocab_size)
    out: dict = {"model": describe(reference), "formats": {}}
    for fmt in [f for f in args.formats.split(",") if f]:
        args_q = copy.copy(args)
        args_q.quantize = fmt
        quantized = build_model(args_q)
        r = compare(reference, quantized, tokens, args.chunk)
        out["formats"][fmt] = r
        print(f"{fmt}: top-1 agreement {r['top1_agreement']:.2%} over {r['positions']} positions; logit error "
              f"max {r['max_abs_logit_error']:.4f}, mean {r['mean_abs_logit_error']:.5f}, "
              f"relative {r['rel_error']:.4f}", flush=True)
        del quantized
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out
