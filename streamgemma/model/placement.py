"""Where a model runs: the device and dtype asked for, or the defaults, checked
by running a tiny product there (so a failure shows at load, not mid-generation)."""

from __future__ import annotations

import torch

from ..errors import DeviceError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    """Defaults: CUDA if available else CPU; bfloat16 on CUDA, float32 on CPU.
    Raises DeviceError if the device or dtype cannot run the model."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"unknown device {device!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device} requested but CUDA is not available in this PyTorch build/machine")
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {device}: only 'cpu' and 'cuda' are supported")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise DeviceError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise DeviceError(f"dtype {dtype} is not supported; choose one of {', '.join(DTYPES)}")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"{torch.cuda.get_device_name(device)} cannot run bfloat16; use dtype='float16' or 'float32'")
    try:  # a tiny probe of what the model does, so failures surface here and not mid-generation
        a = torch.ones(4, 4, dtype=dtype, device=device)
        torch.tanh(a @ a).sum().item()
    except RuntimeError as e:
        raise DeviceError(f"device {device} cannot run dtype {dtype} ({e})") from None
    return device, dtype
