"""Install a trained demo model into the package: copy the files that
train.py wrote into streamgemma/demo/ and write its README.md (provenance,
license, held-out loss) from metrics.json.

    python examples/train_demo/install_demo.py OUTDIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "streamgemma" / "demo"
FILES = ("config.json", "model.safetensors", "tokenizer.model", "metrics.json")

README = """# The streamgemma demo model

A small Griffin (RecurrentGemma architecture) trained from scratch, so that
`sg.load("demo")` and `streamgemma generate "..."` work without downloading
anything. It writes English in the style of the Python documentation; it is a
demonstration of the SDK (streaming, sessions, snapshots), not a useful
language model, and it is not instruction-tuned.

| | |
|---|---|
| architecture | Griffin, {layers} blocks (recurrent, recurrent, local attention) x {groups}, width {width}, MLP {mlp_width}, {heads} heads, window {window} |
| parameters | {params:,} ({mb:.1f} MB in bfloat16) |
| tokenizer | SentencePiece BPE, {vocab:,} pieces, byte fallback, Gemma's special ids (pad 0, eos 1, bos 2, unk 3) and chat-turn symbols |
| training | {steps:,} steps, {tokens:,} tokens ({epochs} epochs) in {seconds:.0f} s on {device} |
| held-out loss | **{heldout:.3f} nats/token** on the held-out 2% of pages ({heldout_tokens:,} tokens, windows of {window_eval}); **{sample:.3f}** on `tests/data/demo_heldout/sample.txt` ({sample_tokens:,} tokens, whole documents) |

Reproduce: `python examples/train_demo/prepare_data.py` (needs Debian's
`python3.11-doc`), then `python examples/train_demo/train.py --out OUTDIR`
(see the scripts' docstrings); `metrics.json` holds every hyper-parameter and
the loss curve.

## Training data and license

The model was trained on plain text extracted from the Python 3.11
documentation as packaged by Debian (`python3.11-doc` 3.11.2-6+deb12u9),
navigation removed, 98% of the pages (shuffled with seed 0; the rest is held
out). The Python documentation is Copyright © 2001-2023 Python Software
Foundation; All Rights Reserved, and is distributed under the PSF License
Agreement (`PSF-LICENSE.txt` beside this file), which permits preparing and
distributing derivative works provided the copyright notice and license are
retained and a brief summary of the changes is included: the HTML pages were
converted to plain text and used to train the weights in this directory.
The weights and tokenizer are distributed with streamgemma under its license
(Apache-2.0), subject to those terms.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", type=Path, help="the --out directory of train.py")
    args = ap.parse_args()
    missing = [f for f in FILES if not (args.outdir / f).is_file()]
    if missing:
        raise SystemExit(f"{args.outdir}: missing {', '.join(missing)}")
    m = json.loads((args.outdir / "metrics.json").read_text())
    cfg = m["config"]
    DEMO.mkdir(exist_ok=True)
    for f in FILES:
        shutil.copy(args.outdir / f, DEMO / f)
        os.chmod(DEMO / f, 0o644)  # save_hf writes its temp files 0600
    shutil.copy(REPO / "tests" / "data" / "demo_heldout" / "PSF-LICENSE.txt", DEMO / "PSF-LICENSE.txt")
    (DEMO / "README.md").write_text(README.format(
        layers=len(cfg["block_types"]), groups=len(cfg["block_types"]) // 3, width=cfg["width"],
        mlp_width=cfg["mlp_width"], heads=cfg["num_heads"], window=cfg["attention_window"],
        params=m["parameters"], mb=m["weights_bytes"] / 1e6, vocab=cfg["vocab_size"], steps=m["steps"],
        tokens=m["tokens_seen"], epochs=m["epochs"], seconds=m["train_seconds"], device=m["device"],
        heldout=m["heldout_loss_nats_per_token"], heldout_tokens=m["heldout_tokens"], window_eval=m["eval_window"],
        sample=m["sample_loss_nats_per_token"], sample_tokens=m["sample_tokens"]))
    total = sum(f.stat().st_size for f in DEMO.iterdir())
    print(f"installed {DEMO} ({total / 2**20:.1f} MiB): held-out {m['heldout_loss_nats_per_token']}, "
          f"sample {m['sample_loss_nats_per_token']} nats/token")


if __name__ == "__main__":
    main()
