"""Suspend a conversation to a file, resume it in another process, and check
that the continuation is exactly the one the never-suspended session produces.

    python examples/snapshot_resume.py

The first half saves a small random model (the layout of `sg.load`), feeds a
session some tokens, writes its snapshot with `session.save`, and continues
the original session greedily. It then runs this script again as a new
process (`--resume DIR`), which loads the model, `restore_file`s the snapshot
and continues greedily from there. Both continuations are printed and compared.
Runs in a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Bit-identical float32 CPU results across processes need MKL to pick its kernels
# the same way in both (docs/snapshots.md); it reads this when torch loads it.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
import torch  # noqa: E402

import streamgemma as sg  # noqa: E402

CONTINUATION = 24  # greedy tokens after the snapshot


def greedy(session: sg.Session, first_token: int, n: int) -> dict:
    """Feed `first_token`, then the argmax of each step's logits, n steps.
    Returns the tokens fed and a digest of every float32 logit produced, so
    equal digests mean bit-identical logits."""
    tokens, digest = [first_token], hashlib.sha256()
    for _ in range(n):
        logits = session.step(tokens[-1])
        digest.update(logits.numpy().tobytes())
        tokens.append(int(torch.argmax(logits)))
    return {"tokens": tokens[:n], "logits_sha256": digest.hexdigest()[:16]}


def suspend(workdir: Path) -> dict:
    """Save a model and a snapshot into `workdir`; return the uninterrupted continuation."""
    config = sg.GriffinConfig.preset("tiny")
    model = sg.Model.random(config, seed=0, device="cpu", dtype="float32")
    model.save(workdir / "model")
    session = model.session()
    prompt = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    logits = session.feed(prompt)  # 40 tokens: the window-8 attention ring has wrapped
    next_token = int(torch.argmax(logits))
    # The resuming process needs the token to continue with; metadata carries it.
    session.save(workdir / "conversation.sgsnap", metadata={"next_token": next_token, "note": "demo"})
    print(f"suspended at position {session.position}: "
          f"{(workdir / 'conversation.sgsnap').stat().st_size} bytes on disk")
    return greedy(session, next_token, CONTINUATION)


def resume(workdir: Path) -> dict:
    """Load the model and the snapshot from `workdir`; return the continuation."""
    model = sg.load(workdir / "model", device="cpu", dtype="float32")
    session = model.restore_file(workdir / "conversation.sgsnap")
    return greedy(session, session.snapshot_metadata["next_token"], CONTINUATION)


def main() -> int:
    parser = argparse.ArgumentParser(description="snapshot -> new process -> exact resume")
    parser.add_argument("--resume", type=Path, help=argparse.SUPPRESS)  # the second process
    args = parser.parse_args()
    if args.resume is not None:
        print(json.dumps(resume(args.resume)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        expected = suspend(workdir)
        # The child must import this same streamgemma, installed or not.
        env = dict(os.environ)
        package_root = str(Path(sg.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        child = subprocess.run([sys.executable, __file__, "--resume", str(workdir)], env=env,
                               capture_output=True, text=True)
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            return 1
        resumed = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"never suspended  : {expected['tokens']} logits {expected['logits_sha256']}")
    print(f"resumed elsewhere: {resumed['tokens']} logits {resumed['logits_sha256']}")
    same = resumed == expected
    print("identical continuation, bit for bit" if same else "continuations DIFFER")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
