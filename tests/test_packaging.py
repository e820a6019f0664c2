"""The checkout must never shadow an installed distribution: `python -m pytest` and a
`python` started in the repository root put the root first on sys.path."""

import subprocess
import sys
from pathlib import Path

import pytest

import streamgemma as sg

ROOT = Path(__file__).resolve().parents[1]


def test_repository_root_holds_no_importable_package_but_streamgemma():
    offenders = [p.name for p in ROOT.iterdir()
                 if p.name != "streamgemma" and not p.name.startswith(".")
                 and ((p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py")]
    assert offenders == [], f"top-level importable names that could shadow PyPI packages: {offenders}"


def test_transformers_imports_with_the_repository_root_first_on_sys_path():
    pytest.importorskip("transformers")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import transformers; "
            "from transformers import RecurrentGemmaForCausalLM; print(transformers.__version__)")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_kernels_are_importable_only_under_streamgemma():
    import streamgemma.kernels.gemv as gemv

    assert Path(gemv.__file__).resolve().parent == (ROOT / "kernels").resolve()
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_version_is_declared_once():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    from importlib.metadata import version

    assert version("streamgemma") == sg.__version__
