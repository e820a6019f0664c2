"""The `streamgemma` command end to end on a tiny saved model, and the embed_step example."""

import os
import subprocess
import sys
from pathlib import Path

from textfixtures import saved_model_dir  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent


def run(*args, stdin=""):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "streamgemma.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, env=env, timeout=60)


def test_info_generate_and_chat(saved_model_dir):
    info = run("info", "--model", saved_model_dir)
    assert info.returncode == 0, info.stderr
    fields = dict(line.split(":", 1) for line in info.stdout.splitlines())
    assert fields["architecture"].strip() == "tiny"
    assert fields["dtype"].strip() == "float32"
    assert int(fields["parameters"].replace(",", "")) > 0
    assert "400 pieces" in fields["tokenizer"] and "chat turns yes" in fields["tokenizer"]

    flags = ["--model", saved_model_dir, "--device", "cpu", "--seed", "3", "--max-tokens", "12"]
    gen = run("generate", "the quick brown fox", *flags)
    assert gen.returncode == 0, gen.stderr
    again = run("generate", "the quick brown fox", *flags)
    assert gen.stdout == again.stdout and gen.stdout.strip()  # same seed, same text

    greedy = run("generate", "-", "--temperature", "0", *flags, stdin="hello world")
    assert greedy.returncode == 0, greedy.stderr

    chat = run("chat", *flags, stdin="hello there\n\ncafé 😀?\n")
    assert chat.returncode == 0, chat.stderr
    assert len(chat.stdout.splitlines()) >= 2  # one reply per non-empty line
    assert "Traceback" not in chat.stderr


def test_user_errors_are_one_line_without_traceback(saved_model_dir):
    for args in (["generate", "hi", "--model", saved_model_dir, "--temperature", "-1"],
                 ["generate", "hi", "--model", saved_model_dir, "--top-p", "0"],
                 ["info", "--model", saved_model_dir / "missing"],
                 ["generate", "", "--model", saved_model_dir]):
        r = run(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "top_p must be in (0, 1], got 0.0" in run("generate", "hi", "--model", saved_model_dir,
                                                     "--top-p", "0").stderr
    assert run("generate", "hi").returncode == 2  # usage error: --model is required


def test_help_reads_well():
    r = run("--help")
    assert r.returncode == 0 and "generate" in r.stdout and "chat" in r.stdout and "info" in r.stdout
    r = run("generate", "--help")
    assert "--temperature" in r.stdout and "--model PATH" in r.stdout


def test_embed_step_example_runs():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "embed_step.py")], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("digits: ")
