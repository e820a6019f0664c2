"""What every benchmark shares: the model named by --model / --preset, the
environment record that every JSON result carries, small timing helpers.

Benchmarks use only the public API (`import streamgemma as sg`), so the same
code measures an older tree put on PYTHONPATH."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

import streamgemma as sg

PRESET_ALIASES = {"2b": "recurrentgemma-2b", "9b": "recurrentgemma-9b"}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and output")
    g.add_argument("--model", metavar="PATH", help="a checkpoint (or 'demo') instead of --preset")
    g.add_argument("--preset", default="recurrentgemma-2b",
                   help="random weights with this preset's shapes (default recurrentgemma-2b; "
                        f"also 2b, 9b, {', '.join(sg.GriffinConfig.presets())})")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="default: bfloat16 on cuda, float32 on cpu")
    g.add_argument("--quantize", choices=("int8", "fp8", "int4"),
                   help="int8, fp8 or int4 weights (quantized at load time; docs/quantization.md)")
    g.add_argument("--json", metavar="PATH", help="write the result with the environment record to PATH "
                                                  "('-': stdout)")


def build_model(args: argparse.Namespace) -> sg.Model:
    """The model of --model, or random weights (seed 0) with --preset's shapes."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if args.model:
        return sg.load(args.model, device=device, dtype=dtype, progress=False, quantize=args.quantize)
    config = sg.GriffinConfig.preset(PRESET_ALIASES.get(args.preset, args.preset))
    return sg.Model.random(config, seed=0, device=device, dtype=dtype, quantize=args.quantize)


def is_cuda(model: sg.Model) -> bool:
    return model.device.type == "cuda"


def sync(model: sg.Model) -> None:
    if is_cuda(model):
        torch.cuda.synchronize(model.device)


def token_ids(n: int, vocab_size: int, seed: int = 0) -> list[int]:
    """`n` random ids, past the special ids at the start of every vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (n,), generator=g).tolist()


def describe(model: sg.Model) -> dict:
    return {"source": model.source, "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
            "parameters": model.num_parameters(), "preset": model.config.matching_preset(),
            "quantize": model.quantization}


# -- the environment record ------------------------------------------------------------
def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> dict:
    """The commit of the streamgemma tree being measured (the one imported,
    which may not be the working directory's), whether its tracked files
    differ from it, and where the figure came from."""
    # The variable wins: a copied tree may sit in a checkout whose .git is stale.
    if os.environ.get("STREAMGEMMA_COMMIT"):
        return {"commit": os.environ["STREAMGEMMA_COMMIT"], "dirty": None, "from": "STREAMGEMMA_COMMIT"}
    package = Path(sg.__file__).resolve().parent
    # Only if that repository tracks the package: a tree copied into another
    # checkout must not report the outer checkout's commit.
    if _run(["git", "ls-files", "--error-unmatch", "__init__.py"], cwd=package) is not None:
        commit = _run(["git", "rev-parse", "HEAD"], cwd=package)
        if commit:
            status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=package)
            return {"commit": commit, "dirty": bool(status), "from": "git"}
    return {"commit": "unknown", "dirty": None, "from": None}


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _triton_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("triton")
    except Exception:  # noqa: BLE001 - not installed (CPU-only machines)
        return None


def environment(device: torch.device | str | None = None) -> dict:
    """Where and how a result was measured: GPU, driver, versions, commit, command."""
    env = {
        "command": redact(shlex.join(getattr(sys, "orig_argv", sys.argv))),
        "cwd": os.getcwd(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
        "streamgemma": {"version": sg.__version__, "path": str(Path(sg.__file__).resolve().parent)},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda_runtime": torch.version.cuda,
        "host": {"platform": platform.platform(), "cpu": _cpu_model(), "cpus": os.cpu_count()},
        "gpu": None,
        "driver": None,
    }
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = {"name": props.name, "memory_GB": round(props.total_memory / 1e9, 1),
                      "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}
        env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                              f"--id={device.index or 0}"])
    return env


# a URL's password (redis://user:PASSWORD@host) and a --token's value: never in a record
_SECRETS = re.compile(r"(://[^/@\s:]*:)[^@\s/]+(@)|(--token[= ])\S+")


def redact(text: str) -> str:
    """`text` with URL passwords and --token values replaced by ***."""
    return _SECRETS.sub(lambda m: f"{m[1]}***{m[2]}" if m[1] else f"{m[3]}***", text)


def json_path_usable(path: str | None) -> bool:
    """Whether --json can be written: '-', none, or a file in an existing directory (checked before a run)."""
    return path in (None, "", "-") or (not Path(path).is_dir() and Path(path).resolve().parent.is_dir())


def finish(command: str, args: argparse.Namespace, results: dict) -> dict:
    """The full record of a run (written to --json if given): the command's
    results, its settings, and the environment of results["model"]["device"]."""
    settings = {k: ("***" if k == "token" and v else redact(v) if isinstance(v, str)
                    else str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items() if k not in ("run", "json")}
    device = results.get("model", {}).get("device")
    record = {"bench": command, "environment": environment(device), "settings": settings, "results": results}
    if args.json == "-":
        print(json.dumps(record, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return record
