import importlib.util
import os
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


def _kernels_of_this_checkout() -> None:
    """Import `streamgemma.kernels` from this checkout's kernels/. pyproject.toml
    maps that name onto kernels/ (no streamgemma/kernels directory exists), so
    when streamgemma itself comes from this checkout through PYTHONPATH while
    an editable install of ANOTHER checkout is on the path (a git worktree
    beside the main one), the install's mapping would hand these tests the
    other checkout's kernels. A no-op where the two agree (CI)."""
    root = Path(__file__).resolve().parents[1]
    if (Path(sg.__file__).resolve().parent != root / "streamgemma" or "streamgemma.kernels" in sys.modules
            or not (root / "kernels" / "__init__.py").is_file()):
        return
    found = importlib.util.find_spec("streamgemma.kernels")
    if found is not None and found.origin and Path(found.origin).resolve().parent == root / "kernels":
        return
    spec = importlib.util.spec_from_file_location("streamgemma.kernels", root / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(root / "kernels")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["streamgemma.kernels"] = module
    spec.loader.exec_module(module)
    sg.kernels = module


_kernels_of_this_checkout()


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a child Python that must import this checkout: the
    checkout first on PYTHONPATH, then whatever the parent had there (where
    the dependencies may live)."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


@pytest.fixture
def tiny_config() -> sg.GriffinConfig:
    return sg.GriffinConfig.preset("tiny")


def random_tokens(n: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
