"""Host cost of one engine tick per generating session, without the model.

The model's `decode` is replaced by a stub that advances the slots' positions
and returns a preallocated float32 logits tensor [B, vocab] (vocab 256,000 as
RecurrentGemma-2B by default), so what is timed is what the engine adds to a
decode step: sampling every row, recording each token in its session
(detokenizer, stop strings), and delivering it to the session's stream.

Two figures per batch size B (all B sessions generating):
  worker  the engine's host work of the model call (sample, decode launch,
          accept; on the CPU also the model's arithmetic)
  tick    `Engine.tick` as the scheduler runs it (worker + thread hop +
          delivering B tokens to their streams)
each as microseconds per session per tick, and the tick in milliseconds.

    python bench/dev/engine_tick.py                          # CPU, vocab 256000, B = 1, 16, 64, 256
    python bench/dev/engine_tick.py --device cuda            # the GPU: sampling runs there
    python bench/dev/engine_tick.py --vocab 512 --mix mixed --tokenizer demo
    python bench/dev/engine_tick.py --device cuda --preset 2b --batches 256 --trace --ticks 20
                      # the real model's decode (no stub): the engine's whole tick,
                      # and with --trace where the GPU's time per tick goes

On a CPU, sampling a 256,000-entry row is real arithmetic (~ms per row), so
the figure there is mostly compute; use a small --vocab to see the Python
overhead alone. On CUDA the arithmetic is the GPU's and the figure is the
host's part of the tick (the tick waits once for the sampled ids).

--mix: plain (temperature 1, the default params), greedy, or mixed (a
rotation of greedy / temperature / top-k / top-p / min-p / penalties).

--stub-sampling: the noise and filter arithmetic (a few kernel launches on
CUDA, tens of ms of PyTorch reference on the CPU) replaced by a plain
argmax of each row, so that on the CPU the figure is the host's
bookkeeping as CUDA sees it: the per-row sampling plan, the uploads,
accept, the journal's records and the streams. Tokens differ from real
sampling; the work around them does not.

    python bench/dev/engine_tick.py --vocab 512 --in-loop --stub-sampling --mix mixed --tokenizer demo

CPU reference (2-core shared VM, 1 torch thread; worker us per session per
tick, before -> after the batched tick; noisy to +-20%):

    vocab 512, plain          B=1: 89 -> ~100   16: 48 -> 25   64: 47 -> 20   256: 46 -> 19
    vocab 4096, mixed, demo   B=1: 94 -> 70     16: 224 -> 209 64: 220 -> 176 256: 231 -> 170
    vocab 256000, plain       ~6.6-9 ms per row before and after: the CPU's exponential_
                              over 256,000 entries (the same draw either way) is the cost

At vocab 512 about 13 of the ~19 us left are the CPU exponential_ call of
each row (a kernel launch on CUDA); the rest is sampling bookkeeping,
accept (recent ids, detokenizer, stop checks) and the Token.

The figures above were taken with a torch.Generator per session (one
exponential_ per sampled row). Sampling now draws its noise from each
session's Philox stream: one kernel for all rows on CUDA (no per-row
launch; sampling.py times that step alone: on an H100 its host cost
for 256 rows fell from 3.4 to 0.56 ms); on the CPU the PyTorch reference of
that noise costs about 9 ms per row at vocab 256,000 on the same VM (the
int64 Philox rounds), a little more than exponential_ did. This benchmark
has not been re-run since.
"""

from __future__ import annotations

import argparse
import time

import anyio
import torch

import streamgemma as sg
from streamgemma.sampling.params import SamplingParams
from streamgemma.serve.engine import Engine

MIXED = (
    dict(temperature=0.0),
    dict(temperature=0.8),
    dict(temperature=1.0, top_k=40),
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.9, repetition_penalty=1.2, presence_penalty=0.3),
)


def params_for(mix: str, i: int, max_tokens: int) -> SamplingParams:
    if mix == "plain":
        extra = {}
    elif mix == "greedy":
        extra = dict(temperature=0.0)
    else:
        extra = MIXED[i % len(MIXED)]
    return SamplingParams(max_tokens=max_tokens, stop_token_ids=(), seed=i, **extra)


class StubDecode:
    """Stands in for `Model.decode`: advances positions, returns rows of a
    fixed buffer (the host's work only: no copy, as the real path makes none)."""

    def __init__(self, model: sg.Model, max_batch: int):
        self.pool = model.pool
        g = torch.Generator().manual_seed(0)
        # Soft-capped-looking logits: a few likely tokens, a long tail.
        logits = torch.randn(max_batch, model.config.vocab_size, generator=g) * 3.0
        self.logits = logits.to(model.device)

    def __call__(self, slots, tokens) -> torch.Tensor:
        for s in slots:
            self.pool.positions[s] += 1
        return self.logits[:len(slots)]


def stub_sampling_arithmetic() -> None:
    """Sampled rows take their argmax instead of the Gumbel-max draw (with or
    without filters): what stays is the host's work around the launches."""
    from streamgemma.sampling import sampler

    def argmax(x, *args, **kwargs):
        return x.argmax(dim=-1)

    sampler.gumbel_argmax = argmax
    sampler.sample_filtered = argmax


def build_model(device: str, vocab: int, tokenizer: str, preset: str = "tiny") -> sg.Model:
    if preset != "tiny":  # the real shapes, random weights; bfloat16 on CUDA
        config = sg.GriffinConfig.preset({"2b": "recurrentgemma-2b"}.get(preset, preset))
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
        return sg.Model.random(config, seed=0, device=device, dtype=dtype)
    tok = sg.load("demo", device="cpu").tokenizer if tokenizer == "demo" else None
    config = sg.GriffinConfig.preset("tiny", vocab_size=max(vocab, tok.vocab_size if tok else 0))
    return sg.Model.random(config, seed=0, device=device, dtype="float32", tokenizer=tok)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


async def measure(model: sg.Model, batch: int, ticks: int, warmup: int, mix: str, device: str,
                  in_loop: bool = False, profile=None, stub: bool = True, trace=None) -> tuple[float, float]:
    # in_loop: the CUDA arrangement, host work on the loop's thread
    engine = Engine(model, max_active=batch, host_work="loop" if in_loop else None)
    sessions = []
    prompt = [2] + [10 + k % 50 for k in range(2 if stub else 126)] + [20]
    for _ in range(batch):
        es = await engine.open()
        await anyio.to_thread.run_sync(es.live.feed, prompt)
        sessions.append(es)
    if stub:
        model.decode = StubDecode(model, batch)
    streams = [await engine.generate(es, params_for(mix, i, warmup + ticks + 2)) for i, es in enumerate(sessions)]

    for _ in range(warmup):
        await engine.tick()
    sync(device)
    phases = dict(engine.stats.phase_seconds)
    if profile is not None:
        profile.enable()
    if trace is not None:
        trace.start()
    start = time.perf_counter()
    for _ in range(ticks):
        await engine.tick()
    sync(device)
    tick_time = time.perf_counter() - start
    if profile is not None:
        profile.disable()
    if trace is not None:
        trace.stop()
    assert engine.stats.decoded_tokens == (warmup + ticks) * batch, "every session generated on every tick"
    for stream in streams:
        await stream.aclose()
    for es in sessions:
        await engine.close(es)
    if stub:
        del model.decode
    # the host's model work: everything but the wait for the device's ids
    worker_time = sum(engine.stats.phase_seconds[k] - phases[k] for k in ("sample", "decode"))
    return worker_time / ticks, tick_time / ticks


def gpu_summary(trace, ticks: int) -> str:
    """Where the device's time per tick went: kernels and copies by name
    (the top ones) and the time it sat idle, from a torch.profiler run."""
    events = [e for e in trace.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not events:
        return "no device activity recorded"
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    busy, end = 0.0, spans[0][0]
    for a, b in spans:  # union of the intervals (graph replays may overlap with copies)
        if b > end:
            busy += b - max(a, end)
            end = b
    wall = spans[-1][1] - spans[0][0]
    by_name: dict[str, float] = {}
    for e in events:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us()
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    lines = [f"device per tick: busy {busy / ticks / 1e3:.3f} ms, idle {(wall - busy) / ticks / 1e3:.3f} ms"]
    lines += [f"  {us / ticks / 1e3:8.3f} ms  {name[:100]}" for name, us in top]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab", type=int, default=256_000)
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--ticks", type=int, default=0, help="timed ticks per batch size (default: by batch size)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--mix", choices=("plain", "greedy", "mixed"), default="plain")
    ap.add_argument("--tokenizer", choices=("none", "demo"), default="none",
                    help="demo: the bundled model's tokenizer (4,096 pieces: only those ids are sampled)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a small shared CPU, OpenMP threads spinning "
                         "against other work make per-op times erratic; 0: torch's default)")
    ap.add_argument("--in-loop", action="store_true",
                    help="on the CPU too, run the tick's host work on the event loop's thread (as on CUDA)")
    ap.add_argument("--profile", help="cProfile the timed ticks (the loop's thread) into this file")
    ap.add_argument("--preset", default="tiny",
                    help="tiny (default, --vocab applies), 2b or a preset name: that model's shapes, random weights")
    ap.add_argument("--real-decode", action="store_true",
                    help="the model's real decode instead of the stub (always with a preset other than tiny)")
    ap.add_argument("--stub-sampling", action="store_true",
                    help="replace the noise and filter arithmetic by an argmax (host bookkeeping only; see above)")
    ap.add_argument("--trace", action="store_true",
                    help="torch.profiler over the timed ticks: the device's busy and idle time per tick")
    args = ap.parse_args()
    prof = None
    if args.profile:
        import cProfile
        prof = cProfile.Profile()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stub_sampling:
        stub_sampling_arithmetic()
    model = build_model(args.device, args.vocab, args.tokenizer, args.preset)
    stub = args.preset == "tiny" and not args.real_decode
    if not stub and args.device.startswith("cuda"):
        model.warm_up(max(int(x) for x in args.batches.split(",")), prompt_tokens=128)
    allowed = model.tokenizer.vocab_size if model.tokenizer else model.config.vocab_size
    print(f"device {args.device}, vocab {model.config.vocab_size} (sampled over {allowed}), mix {args.mix}, "
          f"tokenizer {args.tokenizer}, torch threads {torch.get_num_threads()}")
    print(f"{'B':>5} {'worker us/session':>18} {'tick us/session':>16} {'tick ms':>9}")
    batches = [int(x) for x in args.batches.split(",")]
    # The first engine of a process pays for lazy set-up (its first ticks ran ~1 ms slower): a
    # throwaway round at the first batch size, not printed.
    anyio.run(measure, model, batches[0], 5, args.warmup, args.mix, args.device, args.in_loop, None, stub, None)
    for b in batches:
        ticks = args.ticks or max(5, min(200, 2000 // b))
        trace = None
        if args.trace:
            from torch.profiler import ProfilerActivity, profile
            trace = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        worker, tick = anyio.run(measure, model, b, ticks, args.warmup, args.mix, args.device, args.in_loop, prof,
                                 stub, trace)
        print(f"{b:>5} {worker / b * 1e6:>18.1f} {tick / b * 1e6:>16.1f} {tick * 1e3:>9.2f}")
        if trace is not None:
            print(gpu_summary(trace, ticks))
    if prof is not None:
        prof.dump_stats(args.profile)


if __name__ == "__main__":
    main()
