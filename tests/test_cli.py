"""The `streamgemma` command end to end on a tiny saved model, and the embed_step example.

Most runs call `main` in-process (fast); one runs the real command in a
subprocess with piped stdin."""

import io
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env
from textfixtures import saved_model_dir  # noqa: F401 (fixture)

from streamgemma.cli import main

ROOT = Path(__file__).resolve().parent.parent


def cli(capsys, monkeypatch, *args, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse usage errors and --help
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_info(capsys, monkeypatch, saved_model_dir):
    # on the CPU the checkpoint's float32 is kept (CUDA would default to bfloat16)
    rc, out, err = cli(capsys, monkeypatch, "info", "--model", saved_model_dir, "--device", "cpu")
    assert rc == 0, err
    fields = dict(line.split(":", 1) for line in out.splitlines())
    assert fields["architecture"].strip() == "tiny"
    assert fields["dtype"].strip() == "float32"
    assert int(fields["parameters"].replace(",", "")) > 0
    assert "400 pieces" in fields["tokenizer"] and "chat turns yes" in fields["tokenizer"]


def test_generate(capsys, monkeypatch, saved_model_dir):
    flags = ["--model", saved_model_dir, "--device", "cpu", "--seed", "3", "--max-tokens", "12"]
    rc, first, err = cli(capsys, monkeypatch, "generate", "the quick brown fox", *flags)
    assert rc == 0, err
    rc, again, _ = cli(capsys, monkeypatch, "generate", "the quick brown fox", *flags)
    assert first == again and first.strip()  # same seed, same text
    rc, _, err = cli(capsys, monkeypatch, "generate", "-", "--temperature", "0", *flags, stdin="hello world")
    assert rc == 0, err


@pytest.mark.slow
def test_chat_with_piped_stdin_in_a_subprocess(saved_model_dir):
    env = subprocess_env()
    r = subprocess.run([sys.executable, "-m", "streamgemma.cli", "chat", "--model", str(saved_model_dir),
                        "--seed", "1", "--max-tokens", "8"], input="hello there\n\ncafé 😀?\n",
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) >= 2  # one reply per non-empty line
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args,message", [
    (["generate", "hi", "--temperature", "-1"], "temperature must be >= 0.0, got -1.0"),
    (["generate", "hi", "--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
    (["generate", ""], "the prompt is empty"),
    (["info"], "no such file or directory"),
])
def test_user_errors_are_one_line_without_traceback(capsys, monkeypatch, saved_model_dir, args, message):
    model = saved_model_dir / "missing" if args == ["info"] else saved_model_dir
    rc, _, err = cli(capsys, monkeypatch, *args, "--model", model)
    assert rc == 1
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err


def test_usage_and_help(capsys, monkeypatch):
    assert cli(capsys, monkeypatch, "generate")[0] == 2  # PROMPT is required (--model defaults to the demo)
    rc, out, _ = cli(capsys, monkeypatch, "--help")
    assert rc == 0 and all(c in out for c in ("generate", "chat", "info"))
    rc, out, _ = cli(capsys, monkeypatch, "generate", "--help")
    assert "--temperature" in out and "--model PATH" in out


def test_embed_step_example_runs():
    env = subprocess_env()
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "embed_step.py")], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("digits: ")


def test_chat_save_then_resume_continues_the_conversation(capsys, monkeypatch, saved_model_dir, tmp_path):
    """Two turns in one process equal one turn, --save, exit, --resume, the second turn."""
    snap = tmp_path / "chat.sgsnap"
    common = ["chat", "--model", str(saved_model_dir), "--seed", "4", "--max-tokens", "6", "--temperature", "0.8"]
    rc, both, _ = cli(capsys, monkeypatch, *common, stdin="first question\nsecond question\n")
    assert rc == 0
    rc, first, _ = cli(capsys, monkeypatch, *common, "--save", snap, stdin="first question\n")
    assert rc == 0 and snap.is_file()
    rc, second, _ = cli(capsys, monkeypatch, *common, "--resume", snap, stdin="second question\n")
    assert rc == 0
    assert first + second == both


def test_chat_resume_of_a_bad_file_is_one_line(capsys, monkeypatch, saved_model_dir, tmp_path):
    bad = tmp_path / "bad.sgsnap"
    bad.write_bytes(b"not a snapshot")
    rc, _, err = cli(capsys, monkeypatch, "chat", "--model", str(saved_model_dir), "--resume", bad)
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
