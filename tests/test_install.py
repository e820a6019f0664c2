"""What an install pulls: a CPU-only install needs no Triton (about 1 GB);
the `cuda` extra asks for it, and the package runs without it on the CPU."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("_", "-") for r in requirements}


def test_triton_is_an_extra_not_a_dependency():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "triton" not in requirement_names(project["dependencies"])
    extras = project["optional-dependencies"]
    assert "triton" in requirement_names(extras["cuda"])
    assert "triton" in requirement_names(extras["dev"])  # the kernel tests run under Triton's interpreter
    assert "huggingface-hub" in requirement_names(extras["hub"])


def test_the_demo_model_generates_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"  # `import triton` fails, as when it is not installed
            "import streamgemma as sg\n"
            "model = sg.load('demo', device='cpu')\n"
            "with model.session(seed=0) as s:\n"
            "    s.feed('The function returns')\n"
            "    print(len([t for t in s.generate(max_tokens=5, stop_token_ids=[])]), model.kernels)\n")
    env = subprocess_env(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["5", "False"]
