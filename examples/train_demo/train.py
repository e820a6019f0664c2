"""Train the demo Griffin (issue 8) from scratch with streamgemma's own model code.

    python examples/train_demo/prepare_data.py --out data/demo        # once, on any machine
    python examples/train_demo/train.py --data data/demo/tokens --out OUTDIR --time-budget 260
    python examples/train_demo/install_demo.py OUTDIR                 # copy into streamgemma/demo/

On one H100 the whole command takes about 5 minutes: 260 s of training, plus
start-up, periodic held-out evaluations (not counted in the budget; about a
second each) and the final evaluation and save. `--device cpu` with a small
`--time-budget` (and a smaller --width/--batch) is the CPU smoke test.

Reads DATA/train.npy, DATA/heldout.npy (uint16 token ids) and DATA/tokenizer.model.
Trains `streamgemma.model.griffin.Griffin` through its parallel path
(`forward_chunk(tokens, pos, None, logits="all")`) on random windows of the
token stream (each window starts a fresh sequence at position 0), AdamW with
warmup and cosine decay, gradient clipping, bf16 autocast on CUDA. Training
stops after --steps or when --time-budget seconds have passed, whichever comes
first (the schedule is laid out for the time budget by measuring step time);
then the best held-out weights are evaluated and written with `Model.save`
(Hugging Face layout, bfloat16) plus `metrics.json`.

Imports only torch, numpy, sentencepiece and safetensors at run time: msgpack
and zstandard (snapshots) are not needed for training and are stubbed out when
missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# streamgemma's package __init__ imports the snapshot module, which imports
# msgpack and zstandard at module level but only uses them to write snapshots.
for _name in ("msgpack", "zstandard"):
    try:
        __import__(_name)
    except ImportError:
        sys.modules[_name] = types.ModuleType(_name)
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from streamgemma.config import GriffinConfig, griffin_pattern  # noqa: E402
from streamgemma.model.griffin import Griffin  # noqa: E402


def demo_config(vocab_size: int, width: int, layers: int, heads: int) -> GriffinConfig:
    return GriffinConfig(vocab_size=vocab_size, width=width, mlp_width=3 * width, num_heads=heads,
                         lru_width=width, block_types=griffin_pattern(layers), attention_window=2048)


@torch.no_grad()
def init_for_training(net: Griffin, seed: int) -> None:
    """The reference's initialisation: fan-in scaled weights, zero biases and
    norm scales (RMSNorm multiplies by 1 + scale), RG-LRU decay radius uniform
    in [0.9, 0.999], and output projections scaled down by the depth."""
    g = torch.Generator().manual_seed(seed)
    depth_scale = math.sqrt(2.0 / net.config.num_layers)
    for name, p in net.named_parameters():
        if name.endswith("a_param"):
            r = torch.empty(p.shape).uniform_(0.9, 0.999, generator=g)
            p.copy_(torch.log(1 / r - 1))  # softplus^-1(-log r) for the reference's a = r^(8 * gate)
        elif name.endswith(("bias", ".b", "scale")):
            p.zero_()
        else:
            fan_in = p.shape[-2] if name.endswith(".w") and p.ndim == 3 else p.shape[-1]
            if name.endswith("conv_1d.w"):
                fan_in = p.shape[0]
            std = 1 / math.sqrt(fan_in)
            if any(k in name for k in ("linear_out", "proj_final", "ffw_down")):
                std *= depth_scale
            p.copy_(torch.randn(p.shape, generator=g) * std)


def batches(data: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(data) - seq - 1, size=batch)
        idx = starts[:, None] + np.arange(seq + 1)[None]
        yield torch.from_numpy(data[idx].astype(np.int64))


def loss_on(net: Griffin, tokens: torch.Tensor, amp: bool) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of a [B, T+1] batch, each row from position 0."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(x.shape[1], device=x.device)[None].expand_as(x)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        logits, _ = net.forward_chunk(x, pos, None, logits="all")
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def heldout_loss(net: Griffin, data: np.ndarray, seq: int, device, amp: bool, batch: int = 64) -> float:
    """nats/token over the held-out stream cut into consecutive windows of seq+1 tokens
    (each window read from position 0), every token predicted once."""
    n = (len(data) - 1) // seq
    rows = np.stack([data[i * seq: i * seq + seq + 1] for i in range(n)]).astype(np.int64)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        t = torch.from_numpy(rows[i:i + batch]).to(device)
        total += float(loss_on(net, t, amp)) * t[:, 1:].numel()
        count += t[:, 1:].numel()
    return total / count


def sample_loss(model, documents: list[str]) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats/token) of BOS + document + EOS, each document
    read by its own session through streamgemma's prefill path: the same computation as
    tests/test_demo.py, whose held-out loss test compares against this value."""
    tok = model.tokenizer
    total, count = 0.0, 0
    for doc in documents:
        ids = [tok.bos_id] + tok.encode(doc) + [tok.eos_id]
        with model.session() as s:
            logits = model.prefill(s.slot, ids[:-1], all_logits=True)
        total += float(F.cross_entropy(logits.float(), torch.tensor(ids[1:]), reduction="sum"))
        count += len(ids) - 1
    return total / count, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/demo/tokens"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100, help="warmup steps")
    ap.add_argument("--steps", type=int, default=100_000, help="most optimizer steps")
    ap.add_argument("--time-budget", type=float, default=260.0,
                    help="seconds of training (evaluation and saving come after)")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample", type=Path, default=REPO / "tests" / "data" / "demo_heldout" / "sample.txt",
                    help="the committed held-out sample that tests/test_demo.py evaluates")
    args = ap.parse_args()

    t_start = time.time()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    amp = device.type == "cuda"
    if amp:
        torch.backends.cuda.matmul.allow_tf32 = True
    train = np.load(args.data / "train.npy")
    held = np.load(args.data / "heldout.npy")
    tok_file = args.data / "tokenizer.model"
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tok_file)).get_piece_size()
    cfg = demo_config(vocab, args.width, args.layers, args.heads)
    net = Griffin(cfg, dtype=torch.float32, device="cpu")
    init_for_training(net, args.seed)
    net.to(device).train()
    n_params = sum(p.numel() for p in net.parameters())
    print(f"config {cfg.to_json()}\nparameters {n_params:,}; train tokens {len(train):,}; "
          f"held-out tokens {len(held):,}; device {device}", flush=True)

    decay = [p for n, p in net.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in net.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                            eps=1e-8, **({"fused": True} if amp else {}))
    rng = np.random.default_rng(args.seed)
    stream = batches(train, args.batch, args.seq, rng)

    # The cosine schedule runs over `total` steps: --steps, or the number of steps that
    # fit in the time budget, estimated from the measured step time and refreshed as we go.
    total = args.steps
    t_train = time.time()
    step, tokens_seen, eval_time = 0, 0, 0.0
    best = (float("inf"), None, 0)
    history = []
    last_log, last_tokens = time.time(), 0
    while step < total:
        elapsed = time.time() - t_train - eval_time
        if elapsed > args.time_budget:
            break
        if step >= 20 and args.time_budget:
            per_step = elapsed / step
            total = min(args.steps, max(step + 1, int(args.time_budget / per_step)))
        lr_ratio = min(1.0, (step + 1) / args.warmup)
        progress = min(1.0, step / max(1, total))
        lr_ratio *= args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_ratio
        tokens = next(stream).to(device, non_blocking=True)
        loss = loss_on(net, tokens, amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += args.batch * args.seq
        if step % args.log_every == 0 or step == 1:
            lv, gv = loss.item(), gnorm.item()
            if not (math.isfinite(lv) and math.isfinite(gv)):
                raise SystemExit(f"step {step}: loss {lv} grad norm {gv} is not finite")
            now = time.time()
            tps = (tokens_seen - last_tokens) / max(1e-9, now - last_log)
            last_log, last_tokens = now, tokens_seen
            print(f"step {step:5d}/{total} loss {lv:.4f} gnorm {gv:.3f} lr {args.lr * lr_ratio:.2e} "
                  f"tok/s {tps:,.0f} elapsed {now - t_start:.0f}s", flush=True)
        if step % args.eval_every == 0:
            t0 = time.time()
            net.eval()
            hl = heldout_loss(net, held, args.seq, device, amp)
            net.train()
            history.append({"step": step, "tokens": tokens_seen, "heldout_loss": hl})
            if hl < best[0]:
                best = (hl, {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}, step)
            eval_time += time.time() - t0
            print(f"step {step:5d} held-out loss {hl:.4f} nats/token (best {best[0]:.4f} at {best[2]})", flush=True)
    train_seconds = time.time() - t_train

    net.eval()
    final = heldout_loss(net, held, args.seq, device, amp)
    history.append({"step": step, "tokens": tokens_seen, "heldout_loss": final})
    if best[1] is not None and best[0] < final:
        net.load_state_dict(best[1])
        chosen = best[2]
    else:
        chosen = step
    # nn.Module.to works in place: round the weights to bfloat16 (what ships), score them in float32.
    shipped = net.to(dtype=torch.bfloat16).to(dtype=torch.float32)
    shipped_loss = heldout_loss(shipped, held, args.seq, device, False)
    net_bf16 = shipped.to(device="cpu", dtype=torch.bfloat16)

    from streamgemma.session.model import Model
    from streamgemma.tokenizer import Tokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    Model(net_bf16, tokenizer=Tokenizer.from_file(tok_file), kernels=False).save(args.out)
    size = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    # Reload what was written through the package's loader and score the committed sample.
    from streamgemma.session.model import load

    torch.set_num_threads(min(8, os.cpu_count() or 1))
    reloaded = load(args.out, device="cpu", dtype="float32", progress=False, kernels=False)
    documents = [d for d in args.sample.read_text(encoding="utf-8").split("\n\n\n") if d.strip()]
    s_loss, s_tokens = sample_loss(reloaded, documents)
    metrics = {
        "sample_loss_nats_per_token": round(s_loss, 4), "sample_tokens": s_tokens,
        "sample": str(args.sample.relative_to(REPO)) if args.sample.is_relative_to(REPO) else str(args.sample),
        "heldout_loss_nats_per_token": round(shipped_loss, 4),
        "heldout_loss_at_training_dtype": round(min(final, best[0]), 4),
        "heldout_tokens": int(len(held)), "eval_window": args.seq,
        "steps": step, "weights_from_step": chosen, "tokens_seen": tokens_seen,
        "epochs": round(tokens_seen / len(train), 2),
        "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t_start, 1),
        "device": torch.cuda.get_device_name(device) if amp else str(device),
        "parameters": n_params, "weights_bytes": size, "dtype": "bfloat16",
        "hyperparameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "config": cfg.to_dict(), "history": history,
        "torch": torch.__version__,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"saved {args.out} ({size / 1e6:.1f} MB of weights); held-out loss (bf16 weights, fp32 compute) "
          f"{shipped_loss:.4f} nats/token, on the committed sample {s_loss:.4f}; {step} steps, "
          f"{tokens_seen:,} tokens in {train_seconds:.0f}s; "
          f"total {time.time() - t_start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
