"""Benchmarks: `streamgemma bench COMMAND` (decode, prefill, serve, resume,
snapshot, isolation, sampling, fuzz, prefix, fleet, handover, quantize), or
`python -m streamgemma.bench ...`.

Each command prints its figures as it goes; with --json PATH it writes them
with a record of where they were measured (GPU, driver, torch, Triton and
Python versions, the git commit, the command line). The model is a
checkpoint (--model PATH) or random weights with a preset's shapes
(--preset, default recurrentgemma-2b). With --preset tiny --device cpu and
the small sizes of each command's last example, any command runs in
seconds. Benchmarks use only the public API, so the same code can measure
another tree of streamgemma put on PYTHONPATH."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Sequence

COMMANDS = ("decode", "prefill", "serve", "resume", "snapshot", "isolation", "sampling", "fuzz", "prefix",
            "fleet", "handover", "quantize")


def _parser() -> argparse.ArgumentParser:
    from . import common

    parser = argparse.ArgumentParser(prog="streamgemma bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f".{name}", __name__)
        p = commands.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        common.add_model_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Run one benchmark; returns its record (what --json writes)."""
    from .common import finish, json_path_usable

    parser = _parser()
    args = parser.parse_args(argv)
    if not json_path_usable(args.json):  # (before a run that may take hours, not after)
        parser.error(f"--json {args.json}: a directory, or in no such directory: name a file")
    if args.json == "-":  # stdout holds the record alone: what the run prints as it goes, stderr
        with contextlib.redirect_stdout(sys.stderr):
            results = args.run(args)
    else:
        results = args.run(args)
    return finish(args.command, args, results)


def failed(record: dict) -> bool:
    """Whether a benchmark's record says the run failed (fuzz failures, a
    fleet run that lost data): the command then exits with status 1."""
    results = record.get("results", {})
    return bool(results.get("failures")) or results.get("passed") is False
