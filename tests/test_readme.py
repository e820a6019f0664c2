"""Every ```python block of README.md and docs/*.md runs as written.

Each block runs alone in a fresh Python process on the CPU (Triton's
interpreter, one torch thread, a temporary working directory), so a snippet
must import what it uses and build or load its own model (usually the
bundled demo model, `sg.load("demo")`). A block that cannot run here (it
needs a GPU, a running server or a real checkpoint) is preceded by an HTML
comment `<!-- norun: why -->` (or fenced as ```python-norun); it must still
compile.
"""

from __future__ import annotations

import ast
import concurrent.futures
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\s`]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
NORUN = re.compile(r"<!--\s*norun\b[^>]*-->\s*\Z")


def python_blocks() -> list[tuple[str, str, bool]]:
    """(page:line, code, runnable) of every Python block, in page order."""
    blocks = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            lang = m.group(1).lower()
            if lang not in ("python", "py", "python-norun"):
                continue
            runnable = lang != "python-norun" and not NORUN.search(text[:m.start()])
            line = text.count("\n", 0, m.start()) + 1
            blocks.append((f"{page.relative_to(ROOT)}:{line}", m.group(2), runnable))
    return blocks


BLOCKS = python_blocks()
RUNNABLE = {where: code for where, code, runnable in BLOCKS if runnable}


def run_snippet(code: str, workdir: Path) -> subprocess.CompletedProcess:
    script = workdir / "snippet.py"
    script.write_text(code, encoding="utf-8")
    # CPU only and one torch thread each: the demo model's ops are tiny, and
    # extra threads on a busy 2-core machine make them many times slower.
    env = subprocess_env(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(script)], check=False, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def snippet_runs(request, tmp_path_factory):
    """The selected snippets, started together on a few workers (most of each
    run is importing torch in a new process); tests wait for their own."""
    selected = [item.callspec.params["where"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_snippet_runs"]
    workers = max(2, min(4, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        yield {where: pool.submit(run_snippet, RUNNABLE[where], tmp_path_factory.mktemp("snippet"))
               for where in selected}


def test_the_pages_have_snippets():
    assert len(RUNNABLE) >= 10
    # Only a few blocks may be exempt, each with its reason beside it in the page.
    assert len(BLOCKS) - len(RUNNABLE) <= 6


@pytest.mark.parametrize("where,code", [pytest.param(w, c, id=w) for w, c, _ in BLOCKS])
def test_snippet_compiles(where, code):
    ast.parse(code, filename=where)


@pytest.mark.parametrize("where", [pytest.param(w, id=w) for w in RUNNABLE])
def test_snippet_runs(where, snippet_runs):
    result = snippet_runs[where].result()
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def test_readme_keeps_the_ci_commands():
    """.ci/run runs the README's two set-up commands; they must stay the same, byte for byte."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    commands = [line for line in ci if line.startswith(("python -m pip install \"torch", "python -m pytest"))]
    assert len(commands) == 2
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    bash_blocks = [m.group(2) for m in FENCE.finditer(readme) if m.group(1) == "bash"]
    assert any(block.splitlines()[:2] == commands for block in bash_blocks), commands
