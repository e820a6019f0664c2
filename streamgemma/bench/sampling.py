"""Sampling: tokens/s of each sampling setting at batch 1, 64 and 256, against greedy.

Settings (--settings, comma-separated names): greedy; temperature (T 0.8);
top_p (T 0.8, top_p 0.95); top_k_top_p_rep (top_k 40, top_p 0.95,
repetition_penalty 1.1); serve (T 0.8, top_k 40, top_p 0.95); min_p (T 0.8,
min_p 0.05). The first four are the rows of issue #18's table; serve is its
serving target's setting.

- Batch 1: `Session.generate` tokens/s over --tokens tokens after a warm-up
  (the application's loop: the next step is queued on the sampled id while
  it is still on the device), the same session and seed for every setting.
  One run differs from the next by several percent on a GPU host, so each of
  --rounds rounds runs greedy, a setting, greedy, the next setting, ...,
  greedy (the settings' order rotating from round to round); a setting's
  share of greedy in a round is its tokens/s over the mean of the two
  greedy runs around it, and the result is the median over rounds (the raw
  figures of every run are kept too). Greedy is measured at batch 1 even
  when --settings leaves it out: it is the reference.
- Batch B > 1: B sessions at position 100 (a prefill and forks); each step
  samples every row (one `PendingIds`, as the engine's tick), queues the
  decode on the sampled ids on the device, then reads the ids: tokens/s and
  ms/step; and the sampling call alone on fixed logits (synchronised), ms.
  Penalized rows carry 512 recent ids each.

Batch 1 uses only the public API; batches > 1 also use
`streamgemma.sampling.sampler` (SampleRow, PendingIds), so they run against
trees that have it (0a8f7e4 and later).

    streamgemma bench sampling                                   # 2B shapes, batches 1,64,256
    streamgemma bench sampling --batches 1 --settings greedy,top_p --json s.json
    streamgemma bench sampling --preset tiny --device cpu --batches 1,4 --tokens 8 --steps 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import streamgemma as sg

from .args import int_list, positive_int
from .common import build_model, describe, sync, token_ids

SETTINGS = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.8),
    "top_p": dict(temperature=0.8, top_p=0.95),
    "top_k_top_p_rep": dict(top_k=40, top_p=0.95, repetition_penalty=1.1),
    "serve": dict(temperature=0.8, top_k=40, top_p=0.95),
    "min_p": dict(temperature=0.8, min_p=0.05),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", type=int_list(1), default="1,64,256", help="batch sizes (default 1,64,256)")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"settings to measure (default: all of {', '.join(SETTINGS)})")
    parser.add_argument("--tokens", type=int, default=256,
                        help="timed Session.generate tokens at batch 1 (default 256)")
    parser.add_argument("--steps", type=positive_int, default=32, help="timed steps at batches > 1 (default 32)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of interleaved batch-1 runs, each setting between two greedy runs (default 5)")


def time_generate(model: sg.Model, sampling: dict, tokens: int) -> float:
    """Seconds per token of `Session.generate` with `sampling`."""
    s = model.session(seed=0)
    try:
        s.feed(token_ids(100, model.config.vocab_size))
        list(s.generate(max_tokens=8, stop_token_ids=[], **sampling))  # warm-up: kernels, graph
        sync(model)
        start = time.perf_counter()
        n = sum(1 for _ in s.generate(max_tokens=tokens, stop_token_ids=[], **sampling))
        sync(model)
        return (time.perf_counter() - start) / n
    finally:
        s.close()


def batch1_rounds(model: sg.Model, names: list[str], tokens: int, rounds: int) -> dict:
    """Batch-1 results per setting (greedy included): the median over `rounds`
    of tokens/s and of the share of the greedy runs around it, and the raw runs."""
    others = [n for n in names if n != "greedy"]
    greedy_runs: list[float] = []
    runs: dict[str, list[float]] = {n: [] for n in others}
    shares: dict[str, list[float]] = {n: [] for n in others}
    for r in range(rounds):
        order = others[r % len(others):] + others[:r % len(others)] if others else []
        before = 1 / time_generate(model, SETTINGS["greedy"], tokens)
        greedy_runs.append(before)
        for name in order:
            rate = 1 / time_generate(model, SETTINGS[name], tokens)
            after = 1 / time_generate(model, SETTINGS["greedy"], tokens)
            greedy_runs.append(after)
            runs[name].append(rate)
            shares[name].append(rate / ((before + after) / 2))
            before = after
    out = {"greedy": {"tokens_per_s": round(statistics.median(greedy_runs), 1), "of_greedy": 1.0,
                      "runs_tokens_per_s": [round(x, 1) for x in greedy_runs]}}
    for name in others:
        out[name] = {"tokens_per_s": round(statistics.median(runs[name]), 1),
                     "of_greedy": round(statistics.median(shares[name]), 4),
                     "runs_tokens_per_s": [round(x, 1) for x in runs[name]],
                     "runs_of_greedy": [round(x, 4) for x in shares[name]]}
    for r in out.values():
        r["ms_per_token"] = round(1e3 / r["tokens_per_s"], 3)
    return out


def time_batch(model: sg.Model, sampling: dict, batch: int, steps: int) -> dict:
    """ms per step of sampling + decode for `batch` rows, and of the sampling call alone."""
    from streamgemma.sampling.params import SamplingParams
    from streamgemma.sampling.sampler import PendingIds, SampleRow

    params = SamplingParams(**sampling)
    penalized = params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
    vocab = model.config.vocab_size
    recent = [torch.tensor(token_ids(512, vocab, seed=i)) if penalized else None for i in range(batch)]
    first = model.session(seed=0)
    first.feed(token_ids(100, vocab))
    sessions = [first] + [first.fork() for _ in range(batch - 1)]
    slots = [s.slot for s in sessions]
    counter = 0
    # The model's CUDA graphs of the filters, as the engine and Session.generate use them (trees before them: none).
    graphs = getattr(model, "sampling_graphs", None)
    kw = {} if graphs is None else {"graphs": graphs}

    def rows() -> list:
        nonlocal counter
        counter += 1
        return [SampleRow(params, None if params.greedy else (i, counter), recent[i]) for i in range(batch)]

    try:
        logits = model.decode(slots, [1] * batch)[:, :vocab]
        for _ in range(3):  # warm-up: kernels, graph
            pending = PendingIds(logits, rows(), **kw)
            logits = model.decode(slots, pending.device_ids)[:, :vocab]
            pending.ids()
        sync(model)
        start = time.perf_counter()
        for _ in range(steps):
            pending = PendingIds(logits, rows(), **kw)
            logits = model.decode(slots, pending.device_ids)[:, :vocab]
            pending.ids()
        sync(model)
        step = (time.perf_counter() - start) / steps
        fixed = logits.clone()
        for _ in range(3):  # a new address: an eager call, then a capture
            PendingIds(fixed, rows(), **kw).ids()
        sync(model)
        start = time.perf_counter()
        for _ in range(steps):
            PendingIds(fixed, rows(), **kw).ids()
        sample = (time.perf_counter() - start) / steps
        return {"step_ms": round(step * 1e3, 3), "tokens_per_s": round(batch / step, 1),
                "sample_alone_ms": round(sample * 1e3, 3)}
    finally:
        for s in sessions:
            s.close()


def run(args: argparse.Namespace) -> dict:
    model = build_model(args)
    print(model)
    names = [n for n in args.settings.split(",") if n]
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    out: dict = {"model": describe(model), "settings": {n: SETTINGS[n] for n in names}, "batches": {},
                 "rounds": args.rounds}
    for batch in args.batches:
        if batch == 1:
            results = batch1_rounds(model, names, args.tokens, args.rounds)
        else:
            results = {name: time_batch(model, SETTINGS[name], batch, args.steps) for name in names}
            base = results.get("greedy", {}).get("tokens_per_s")
            for r in results.values():
                if base:
                    r["of_greedy"] = round(r["tokens_per_s"] / base, 4)
        for name, r in results.items():
            extra = f", sampling alone {r['sample_alone_ms']} ms" if "sample_alone_ms" in r else ""
            share = f" ({r['of_greedy']:.1%} of greedy)" if "of_greedy" in r else ""
            if "runs_of_greedy" in r:
                rounds = ", ".join(f"{x:.1%}" for x in r["runs_of_greedy"])
                raw = ", ".join(f"{x:.1f}" for x in r["runs_tokens_per_s"])
                share = f" ({r['of_greedy']:.1%} of greedy: median of {rounds}; runs {raw})"
            elif "runs_tokens_per_s" in r:
                share = f" (runs {', '.join(f'{x:.1f}' for x in r['runs_tokens_per_s'])})"
            label = f"median {r['tokens_per_s']:.1f}" if batch == 1 else f"{r['tokens_per_s']:.1f}"
            print(f"batch {batch:>3} {name:<16} {label:>17} tokens/s{share}{extra}", flush=True)
        out["batches"][str(batch)] = results
    return out
