import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors. It is
# read when a kernel is defined, so it is set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny models: per-op work is microseconds, and OpenMP threads spinning on a busy
# 2-core CI machine make each op ~20x slower than one thread.
torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))

import streamgemma as sg  # noqa: E402


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a child Python that must import this checkout: the
    checkout first on PYTHONPATH, then whatever the parent had there (where
    the dependencies may live)."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


_SM90_PRELUDE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def compiled(kernel, signature, constants, num_warps):
    sig = {**signature, **dict.fromkeys(constants, "constexpr")}
    k = triton.compile(ASTSource(kernel, sig, constants), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps})
    assert k.asm["cubin"]
"""


def compile_for_sm90(script: str) -> None:
    """Run `script` in a child Python without Triton's interpreter, after a
    `compiled(kernel, signature, constants, num_warps)` that compiles a kernel
    for sm_90 with Triton's own ptxas (no GPU needed): the interpreter accepts
    programs the compiler refuses. Skips where this Triton has no CUDA backend."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton has no CUDA backend to compile with")
    env = {k: v for k, v in subprocess_env().items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _SM90_PRELUDE + script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture
def tiny_config() -> sg.GriffinConfig:
    return sg.GriffinConfig.preset("tiny")


def free_port() -> int:
    """A port for a server a test starts in another process (named before it starts): random, below the
    ephemeral range that servers on port 0 draw from, and from a range of its own per pytest-xdist worker,
    so tests running at once in two workers never both pick it (port 0, closed, then reused, could be)."""
    import random
    import socket

    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    base = 10000 + (int(worker) % 4 if worker.isdigit() else 0) * 5000
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(base, base + 5000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {base}-{base + 4999}")


def random_tokens(n: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
