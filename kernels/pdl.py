"""Programmatic dependent launch (PDL, Hopper and later) for the decode kernels:
a kernel launched with it may start while the previous one is still running.
Each such kernel first requests what no earlier kernel of the step writes,
then waits (`gdc_wait`) before it reads or writes anything else, and lets the
next kernel launch early (`gdc_launch_dependents`). Callers choose per launch
(a `pdl` argument); `supported` says where it can be used.

What may be read before the wait: weights; the step's inputs (slots,
positions); and state that only earlier steps wrote (conv buffer, RG-LRU
state, ring entries other than this step's), read with `.cg` so no stale L1
line is used. This holds because the step's first kernel (the first GEMV, or
on the matmul path a plain launch) lets the next kernels launch only after its
own wait: by then everything queued before the step (a state reset, a
restored snapshot) is done."""

from __future__ import annotations

import functools
import os

import torch
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401


def supported(device: torch.device | str | None = None) -> bool:
    """Whether kernels on `device` (default: the current CUDA device) can use PDL:
    CUDA compute capability 9.0+, compiled (Triton's interpreter has no grid
    dependency control)."""
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return False
    return _capability_major(torch.cuda.current_device() if device.index is None else device.index) >= 9


@functools.cache
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def launch_kwargs(pdl: bool) -> dict:
    """Extra launch arguments for a kernel launched with (or without) PDL."""
    return {"launch_pdl": True} if pdl else {}
