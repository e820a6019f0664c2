"""Batch-1 decode with the persistent body (kernels/persistent_decode.py)
against the per-kernel GEMV path, RecurrentGemma-2B shapes, random bf16 weights.

For each grid configuration: the compiled kernel's registers and spills, the
grid, the logits and state against the per-kernel path on the same state
(position 3,000: the ring is full and wrapped), and ms/step two ways: graph
replays back to back (the GPU's time) and the decode.py loop (decode, argmax,
`.tolist()`, next decode).

    python bench/persistent_body.py [--configs '[{"maxnreg": 128}, ...]'] [--steps 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import streamgemma as sg
from decode import fill_random_state, random_model, time_decode

# "_nowait": the barriers arrive but never wait (racy, wrong logits): what the
# barriers cost is the difference to the same configuration with them
# "_poll_one": one thread per program polls the barrier counter
DEFAULT_CONFIGS = [
    {"maxnreg": 128},
    {"maxnreg": 128, "_nowait": True},
    {"maxnreg": 128, "_poll_one": True},
    {"programs_per_sm": 2, "num_warps": 8, "maxnreg": 128, "tile_elements": 4096, "_poll_one": True},
    {"programs_per_sm": 2, "num_warps": 8, "maxnreg": 128, "tile_elements": 4096, "_nowait": True},
]


def replay_ms(model: sg.Model, slot: int, steps: int) -> float:
    """GPU time per step: the batch-1 graph replayed back to back."""
    model.decode([slot], [1])  # capture
    g = model._graphed._graphs[1]["graph"]
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def compare(model: sg.Model, set_path, tokens: list[int], position: int) -> dict:
    """Per-kernel path on one slot, persistent body on a copy: logits and state."""
    a, b = model.session(), model.session()
    fill_random_state(model, [a.slot, b.slot], position)
    model.pool.copy_slot(a.slot, b.slot)
    errs = []
    for t in tokens:
        set_path(False)
        want = model.decode([a.slot], [t]).clone()
        set_path(True)
        got = model.decode([b.slot], [t]).clone()
        scale = want.abs().max().item()
        errs.append({"logits_max_err_rel": (got - want).abs().max().item() / scale,
                     "top1_equal": bool(got.argmax() == want.argmax())})
    state_err = 0.0
    for layer in model.pool.layers:
        for t in layer:
            ref = t[a.slot].float()
            state_err = max(state_err, ((t[b.slot].float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item())
    a.close()
    b.close()
    return {"steps": errs, "state_max_err_rel": state_err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=None, help="JSON list of DecodeBody options")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    configs = json.loads(args.configs) if args.configs else DEFAULT_CONFIGS
    cfg = sg.GriffinConfig.preset("recurrentgemma-2b")
    model = random_model(cfg)
    s = model.session()
    model.decode([s.slot], [1])  # builds the kernel decoder and its graph for batch 1
    decoder, graphed = model._kernel_decoder, model._graphed
    report = {"device": torch.cuda.get_device_name(), "results": []}

    def set_path(body_options):
        if body_options is False:
            decoder._body = None
        elif body_options is not True:
            decoder.use_persistent_body(**{k: v for k, v in body_options.items() if not k.startswith("_")})
            decoder._body.wait = not body_options.get("_nowait", False)
            decoder._body.poll_one = body_options.get("_poll_one", False)
            set_path.options = body_options
        elif decoder._body is None:
            set_path(set_path.options)
        graphed._graphs.clear()

    set_path(False)
    fill_random_state(model, [s.slot], 3000)
    base = {"path": "per-kernel", "replay_ms": replay_ms(model, s.slot, args.steps),
            "loop_ms": time_decode(model, 1, args.steps, position=3000) * 1e3}
    print(json.dumps(base), flush=True)
    report["results"].append(base)
    for options in configs:
        row = {"path": "persistent", "options": options}
        try:
            set_path(options)
            body = decoder._body
            row.update(programs=body.programs, n_regs=body.n_regs, n_spills=body.n_spills)
            if not options.get("_nowait"):
                row["check"] = compare(model, set_path, [1, 7, 300, 9000], 3000)
            set_path(True)
            fill_random_state(model, [s.slot], 3000)
            row["replay_ms"] = replay_ms(model, s.slot, args.steps)
            row["loop_ms"] = time_decode(model, 1, args.steps, position=3000) * 1e3
            row["barriers_given_up"] = body.barriers_given_up()
        except Exception as e:  # keep the other configurations' figures
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        print(json.dumps(row), flush=True)
        report["results"].append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
