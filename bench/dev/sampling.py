"""Sampling cost per call of `sample_rows` over B rows of vocab-sized logits:
the host time to issue the work (what the engine's tick pays per token on
CUDA) and the wall time until the ids are on the host, plus the device time
of the Philox/Gumbel-max kernel alone on CUDA.

    python bench/dev/sampling.py                      # CPU, vocab 256000, B = 1, 16, 64, 256
    python bench/dev/sampling.py --device cuda
    python bench/dev/sampling.py --mix mixed          # greedy / temperature / top-k / top-p / min-p / penalties

H100 (torch 2.11, Triton 3.6), vocab 256,000, temperature != 1 on every row:
the kernel alone takes 210-250 us for 256 rows (about 1 TB/s of logits: it is
bound by the Philox rounds and the two logs per entry, not by memory). In a
micro-benchmark of the noise + argmax step alone, issuing it cost the host
0.56 ms for 256 rows (0.18 ms for 1 row), against 3.4 ms (0.08 ms) for the
torch.Generator path it replaced (one exponential_ per row, then log and
argmin over [B, V]).
"""

from __future__ import annotations

import argparse
import time

import torch
from engine_tick import MIXED  # the same rotation of settings (a sibling script: run from bench/dev or its path)

from streamgemma.sampling.params import SamplingParams
from streamgemma.sampling.philox import RandomStream, stream_words
from streamgemma.sampling.sampler import PendingIds, SampleRow


def rows_for(batch: int, mix: str, streams: list[RandomStream]) -> list[SampleRow]:
    out = []
    for i in range(batch):
        params = SamplingParams(**(MIXED[i % len(MIXED)] if mix == "mixed" else dict(temperature=0.8)))
        recent = torch.arange(i, i + 64) if params.repetition_penalty != 1.0 else None
        out.append(SampleRow(params, None if params.greedy else streams[i].take(), recent))
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab", type=int, default=256_000)
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--calls", type=int, default=0, help="timed calls per batch size (default: by batch size)")
    ap.add_argument("--mix", choices=("plain", "mixed"), default="plain")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    logits = (torch.randn(max(batches), args.vocab, generator=g) * 3).to(args.device)
    streams = [RandomStream.seeded(i) for i in range(max(batches))]
    print(f"device {args.device}, vocab {args.vocab}, mix {args.mix}, torch threads {torch.get_num_threads()}")
    print(f"{'B':>5} {'host ms/call':>13} {'wall ms/call':>13} {'kernel us':>10}")
    for b in batches:
        calls = args.calls or max(3, min(50, 2000 // b)) if args.device == "cuda" else args.calls or 3
        x = logits[:b]
        for _ in range(2):
            PendingIds(x, rows_for(b, args.mix, streams)).ids()
        host = wall = 0.0
        for _ in range(calls):
            rows = rows_for(b, args.mix, streams)
            sync(args.device)
            start = time.perf_counter()
            pending = PendingIds(x, rows)
            host += time.perf_counter() - start
            pending.ids()
            wall += time.perf_counter() - start
        kernel = float("nan")
        if args.device == "cuda":
            import triton

            from streamgemma.kernels.gumbel_argmax import gumbel_argmax

            words = torch.tensor([stream_words(*s.take()) for s in streams[:b]], device=args.device)
            temps = torch.full((b,), 0.8, device=args.device)
            kernel = triton.testing.do_bench(lambda: gumbel_argmax(x, words, temps), warmup=5, rep=50) * 1e3
        print(f"{b:>5} {host / calls * 1e3:>13.3f} {wall / calls * 1e3:>13.3f} {kernel:>10.1f}")


if __name__ == "__main__":
    main()
