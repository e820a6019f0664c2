"""Quantized weights: load a model as int8, fp8 and int4, compare what each
keeps of the unquantized model's greedy continuation, save the int4 copy and
load it back without quantizing again, and move a session between formats.

    python examples/quantized.py [--model demo] [--device cpu]

With the bundled demo model it runs in a few seconds on a CPU; with a real
checkpoint (`--model path/to/recurrentgemma-2b-it --device cuda`) the same
lines show what each format costs in bytes and in agreement.
"""

from __future__ import annotations

import argparse
import tempfile

import streamgemma as sg

PROMPT = "The socket module provides"


def greedy_ids(model: sg.Model, n: int = 24) -> list[int]:
    with model.session() as s:
        s.feed(PROMPT)
        return [t.id for t in s.generate(max_tokens=n, temperature=0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    base = sg.load(args.model, device=args.device)
    want = greedy_ids(base)
    print(f"unquantized: {base.weight_bytes() / 1e6:7.1f} MB of weights")
    for fmt in ("int8", "fp8", "int4"):
        model = sg.load(args.model, device=args.device, quantize=fmt)
        got = greedy_ids(model)
        same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
        print(f"{fmt:>11}: {model.weight_bytes() / 1e6:7.1f} MB of weights, greedy continuation equal for the "
              f"first {same} of {len(want)} tokens")

    q4 = sg.load(args.model, device=args.device, quantize="int4")
    with tempfile.TemporaryDirectory() as tmp:
        q4.save(tmp, quantized=True)  # nibbles and group scales, as stored
        again = sg.load(tmp, device=args.device)
        assert again.quantization == "int4" and again.fingerprint == q4.fingerprint
        assert greedy_ids(again) == greedy_ids(q4)
        print("int4 saved and loaded back as stored: same fingerprint, same continuation")

    # a session's state does not depend on the weight format: snapshot it unquantized, continue in int4
    with base.session() as s:
        s.feed(PROMPT)
        blob = s.snapshot()
    with q4.restore(blob) as r:
        text = "".join(t.text for t in r.generate(max_tokens=12, temperature=0))
        print(f"resumed in int4 at position {r.position}: {text!r}")


if __name__ == "__main__":
    main()
