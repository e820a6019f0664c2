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


def int_list(minimum: int, empty: bool = False):
    """An argparse type: comma-separated whole numbers >= `minimum` ("" is none, if `empty`)."""
    def parse(text: str) -> list[int]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if (not parts and not empty) or not all(p.isdigit() and int(p) >= minimum for p in parts):
            raise argparse.ArgumentTypeError(f"want comma-separated whole numbers >= {minimum}, got {text!r}")
        return [int(p) for p in parts]
    return parse
