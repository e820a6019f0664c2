"""One `streamgemma bench` command against two (or more) trees, alternately,
in one machine session: the before/after of a change, each run in its own
process with the same bench code.

    python bench/dev/ab.py --tree before=OLD_TREE@COMMIT --tree after=. --rounds 2 --out DIR \\
        --metric results.device_fed_tok_s.256 -- decode --model rg2b --batches 256 --positions ''

Each tree is a checkout or an unpacked archive (`git archive REV | tar -x -C
DIR`); `@COMMIT` names its commit in the records (STREAMGEMMA_COMMIT) where
the tree is not a git checkout. Rounds run every tree in turn (before,
after, before, after, ...) so drift shows in both. `--copy-bench` first
copies this checkout's `streamgemma/bench/` into the other trees, so every
tree is measured by the same bench code (that overwrites their copy). Each
run writes DIR/NAME-ROUND.json (the bench's own record) and DIR/NAME-ROUND.log;
`--metric` (a dotted path into the JSON, repeatable) prints those values per
run and a summary line per tree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def parse_tree(spec: str) -> tuple[str, Path, str | None]:
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"--tree {spec!r}: want NAME=PATH[@COMMIT]")
    path, _, commit = rest.partition("@")
    tree = Path(path).resolve()
    if not (tree / "streamgemma" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"--tree {spec!r}: {tree} holds no streamgemma package")
    return name, tree, commit or None


def lookup(record: dict, dotted: str):
    """The value at a dotted path of a bench record (keys, or list indices), None if absent."""
    value = record
    for key in dotted.split("."):
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return None
    return value


def run(name: str, tree: Path, commit: str | None, round_: int, bench_args: list[str], out: Path,
        timeout: float) -> dict | None:
    """One bench run in `tree`'s root (python -m puts it first on sys.path): its record, or None."""
    record, log = out / f"{name}-{round_}.json", out / f"{name}-{round_}.log"
    env = dict(os.environ)
    if commit:
        env["STREAMGEMMA_COMMIT"] = commit
    cmd = [sys.executable, "-m", "streamgemma.bench", *bench_args, "--json", str(record)]
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, cwd=tree, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0 or not record.is_file():
        print(f"{name} round {round_}: failed ({rc}), see {log}", flush=True)
        return None
    return json.loads(record.read_text())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", type=parse_tree, required=True, help="NAME=PATH[@COMMIT], 2 or more")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", required=True, help="folder for the records and logs")
    ap.add_argument("--metric", action="append", default=[], help="dotted path into the record, e.g. "
                    "results.tok_s.256 (repeatable)")
    ap.add_argument("--copy-bench", action="store_true", help="copy this checkout's streamgemma/bench/ into the "
                    "other trees first")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run (default 900)")
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- then the bench command and its options")
    args = ap.parse_args(argv)
    bench_args = args.bench[1:] if args.bench[:1] == ["--"] else args.bench
    if len(args.tree) < 2 or not bench_args:
        ap.error("want at least two --tree and a bench command after --")
    if "--json" in bench_args:
        ap.error("the records are written by ab.py (DIR/NAME-ROUND.json): leave --json out")
    if len({name for name, _, _ in args.tree}) != len(args.tree):
        ap.error("tree names must differ")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.copy_bench:
        for _, tree, _ in args.tree:
            if tree != ROOT:
                shutil.copytree(ROOT / "streamgemma" / "bench", tree / "streamgemma" / "bench", dirs_exist_ok=True)
    values: dict[str, dict[str, list]] = {name: {m: [] for m in args.metric} for name, _, _ in args.tree}
    for r in range(1, args.rounds + 1):
        for name, tree, commit in args.tree:
            record = run(name, tree, commit, r, bench_args, out, args.timeout)
            if record is None:
                continue
            got = {m: lookup(record, m) for m in args.metric}
            for m, v in got.items():
                values[name][m].append(v)
            print(f"{name} round {r}: " + ", ".join(f"{m} = {v}" for m, v in got.items()), flush=True)
    for name, per_metric in values.items():
        print(f"{name}: " + "; ".join(f"{m}: {per_metric[m]}" for m in args.metric), flush=True)
    return values


if __name__ == "__main__":
    main()
