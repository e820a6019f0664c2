"""argparse types of the bench commands (no torch import: `bench serve --url`
runs its clients where only the client library is installed)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"want a whole number >= 1, got {text!r}")
    return int(text)


def at_least_zero(text: str) -> int:
    """A whole number >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"want a whole number >= 0, got {text!r}")
    return int(text)
