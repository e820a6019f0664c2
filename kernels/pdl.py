"""Programmatic dependent launch (PDL, Hopper and later), shared by the decode
kernels: a kernel launched with it may start while the previous one is still
running. Each such kernel first requests what no earlier kernel of the step
writes, then waits (`gdc_wait`) before it reads or writes anything else, and
lets the next kernel launch early (`gdc_launch_dependents`). On by default
where the GPU supports it (CUDA compute capability 9.0+); `set_enabled(False)`
turns it off.

What may be read before the wait: weights; the step's inputs (slots,
positions); and state that only earlier steps wrote (conv buffer, RG-LRU
state, ring entries other than this step's), read with `.cg` so no stale L1
line is used. This holds because the step's first kernel (the first GEMV,
or on the matmul path a plain launch) lets the next kernels launch only
after its own wait. By then, everything queued before the step (a state
reset, a restored snapshot) is done."""

from __future__ import annotations

import os

import torch

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
except ImportError:  # pragma: no cover - older Triton
    gdc_launch_dependents = gdc_wait = None

_STATE: dict = {"enabled": None}  # None: decided on first use


def supported() -> bool:
    # Triton's interpreter (CPU tests) has no grid dependency control
    return (gdc_wait is not None and torch.cuda.is_available()
            and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability()[0] >= 9)


def set_enabled(enabled: bool | None) -> None:
    """True/False: on (where supported) / off; None: back to the default."""
    _STATE["enabled"] = None if enabled is None else bool(enabled) and supported()


def enabled() -> bool:
    if _STATE["enabled"] is None:
        _STATE["enabled"] = supported()
    return _STATE["enabled"]


def launch_kwargs() -> dict:
    """Extra launch arguments: {"launch_pdl": True} when enabled."""
    return {"launch_pdl": True} if enabled() else {}
