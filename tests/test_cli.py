"""The `streamgemma` command end to end on a tiny saved model, and the embed_step example.

Most runs call `main` in-process (fast); one runs the real command in a
subprocess with piped stdin."""

import io
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env
from textfixtures import saved_model_dir  # noqa: F401 (fixture)

import streamgemma as sg
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
    (["generate", "hi", "--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
    (["generate", "", "--no-bos"], "the prompt is empty and --no-bos leaves out BOS"),
    (["generate", "hi", "--threads", "0"], "--threads must be in [1, 1024], got 0"),
    (["info"], "no such file or directory"),
    (["chat", "--save", "/nonexistent-dir/x.snap"], "--save /nonexistent-dir/x.snap: no such directory"),
    (["chat", "--save", ""], "--save is empty"),  # (the chat ran without saving)
    (["chat", "--resume", " "], "--resume is empty"),  # (a new conversation started instead)
])
def test_user_errors_are_one_line_without_traceback(capsys, monkeypatch, saved_model_dir, args, message):
    model = saved_model_dir / "missing" if args == ["info"] else saved_model_dir
    rc, _, err = cli(capsys, monkeypatch, *args, "--model", model)
    assert rc == 1
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
    assert "None" not in err  # no flag can give None


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


# -- generate: stdin, an empty prompt, --version, --stats (issue #22, item 7) -----------------------
def test_a_stdin_prompt_loses_its_trailing_newline(capsys, monkeypatch, saved_model_dir):
    flags = ["--model", saved_model_dir, "--seed", "3", "--max-tokens", "12", "--temperature", "0"]
    rc, piped, err = cli(capsys, monkeypatch, "generate", "-", *flags, stdin="the quick brown fox\n")
    assert rc == 0, err
    assert piped == cli(capsys, monkeypatch, "generate", "the quick brown fox", *flags)[1]


def test_a_stdin_prompt_keeps_its_blank_lines_but_the_last_newline(capsys, monkeypatch, saved_model_dir):
    """Every trailing newline was stripped: a prompt ending in a blank line lost it."""
    flags = ["--model", saved_model_dir, "--seed", "3", "--max-tokens", "12", "--temperature", "0"]
    rc, piped, err = cli(capsys, monkeypatch, "generate", "-", *flags, stdin="the quick brown fox\n\n")
    assert rc == 0, err
    assert piped == cli(capsys, monkeypatch, "generate", "the quick brown fox\n", *flags)[1]
    assert cli(capsys, monkeypatch, "generate", "-", *flags, stdin="the quick brown fox\r\n")[1] == \
        cli(capsys, monkeypatch, "generate", "the quick brown fox", *flags)[1]


def test_python_dash_m_streamgemma_is_the_command():
    r = subprocess.run([sys.executable, "-m", "streamgemma", "--version"], capture_output=True, text=True,
                       env=subprocess_env(), timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"streamgemma {sg.__version__}", r.stderr


def test_an_empty_prompt_generates_from_bos_alone(capsys, monkeypatch, saved_model_dir):
    flags = ["--model", saved_model_dir, "--seed", "3", "--max-tokens", "8", "--stop", "x"]
    rc, out, err = cli(capsys, monkeypatch, "generate", "", *flags)
    assert rc == 0 and err == "", err
    assert cli(capsys, monkeypatch, "generate", "-", *flags, stdin="\n")[1] == out


def test_version(capsys, monkeypatch):
    rc, out, _ = cli(capsys, monkeypatch, "--version")
    assert rc == 0 and out.strip() == f"streamgemma {sg.__version__}"


def test_stats_prints_a_timing_summary_to_stderr(capsys, monkeypatch, saved_model_dir):
    rc, out, err = cli(capsys, monkeypatch, "generate", "the quick brown fox", "--model", saved_model_dir,
                       "--max-tokens", "6", "--seed", "1", "--stats")
    assert rc == 0, err
    fields = dict(line.split(":", 1) for line in err.splitlines())
    prompt_tokens = len(sg.load(saved_model_dir).tokenizer.encode("the quick brown fox", add_bos=True))
    assert fields["prompt"].strip().startswith(f"{prompt_tokens} tokens in ")
    assert fields["time to first token"].strip().endswith(" ms")
    assert " tokens in " in fields["generated"] and "tokens/s" in fields["generated"]


def test_threads_sets_torchs_threads(capsys, monkeypatch, saved_model_dir):
    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    calls = []
    rc, _, err = cli(capsys, monkeypatch, "info", "--model", saved_model_dir, "--threads", "3")
    assert rc == 0 and calls == [3], err
    calls.clear()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    rc, _, err = cli(capsys, monkeypatch, "info", "--model", saved_model_dir)
    assert rc == 0 and calls == [1], err  # a tiny model: one thread (sg.load's default)


# -- chat: Ctrl-C, commands, multi-line input, --system (issue #22, items 5 and 6) -------------------
def chat_prefix_ids(model_dir, turn: str) -> list[int]:
    """The ids a conversation starts with when its first user turn is `turn`."""
    from streamgemma.tokenizer import gemma_model_prefix, gemma_turn

    tok = sg.load(model_dir).tokenizer
    return tok.encode(gemma_turn("user", turn) + gemma_model_prefix(), add_bos=True)


def test_ctrl_c_writes_the_text_a_stop_string_held_back(monkeypatch, capsys, saved_model_dir):
    """The reply's tokens were consumed, but text held back as a possible stop string's start was never
    written when Ctrl-C stopped the reply."""
    from types import SimpleNamespace

    from streamgemma.session.session import Tokens

    held = SimpleNamespace(finish_reason=None, flush=lambda: " Pyth")  # (what the generation holds back)
    steps = (t for t in [sg.Token(7, "Hello"), sg.Token(8, "!")])
    monkeypatch.setattr(sg.Chat, "reply", lambda self, **kw: Tokens(steps, held))
    out = CtrlCAtFirstWrite()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stdin", io.StringIO("a question\n"))
    rc = main(["chat", "--model", str(saved_model_dir), "--stop", "Python"])
    assert out.sent and rc == 0 and "Hello Pyth\n" in out.getvalue(), capsys.readouterr().err


def saved_ids(model_dir, snapshot) -> list[int]:
    return sg.load(model_dir).restore_file(snapshot).recent_ids


class CtrlCAtFirstWrite(io.StringIO):
    """stdout that sends this process SIGINT when the first reply text arrives,
    as a user pressing Ctrl-C while a reply streams."""

    def __init__(self):
        super().__init__()
        self.sent = False

    def write(self, text):
        if text.strip() and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return super().write(text)


def test_ctrl_c_stops_only_the_reply_and_the_chat_goes_on(monkeypatch, capsys, saved_model_dir, tmp_path):
    out = CtrlCAtFirstWrite()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first question\nsecond question\n"))
    snap = tmp_path / "chat.sgsnap"
    before = signal.getsignal(signal.SIGINT)  # (a pytest-xdist worker may start with it ignored)
    rc = main(["chat", "--model", str(saved_model_dir), "--seed", "1", "--max-tokens", "40", "--save", str(snap)])
    err = capsys.readouterr().err
    assert out.sent and rc == 0, err  # before: KeyboardInterrupt ended the chat with 130
    assert err.count("(reply stopped)") == 1
    # The second turn is in the saved conversation: the chat went on after the stopped reply.
    tok = sg.load(saved_model_dir).tokenizer
    assert "second question" in tok.decode(saved_ids(saved_model_dir, snap))
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_chat_commands_multiline_input_and_system_prompt(capsys, monkeypatch, saved_model_dir, tmp_path):
    snaps = [tmp_path / f"{k}.sgsnap" for k in range(3)]
    script = (f'/help\n"""\nline one\nline two\n"""\n/save {snaps[0]}\n/reset\n'
              f"first \\\nsecond\n/save {snaps[1]}\n/reset\n//slash\n/save {snaps[2]}\n/nonsense\n")
    rc, out, err = cli(capsys, monkeypatch, "chat", "--model", saved_model_dir, "--system", "Be brief.",
                       "--max-tokens", "3", "--seed", "0", stdin=script)
    assert rc == 0, err
    assert "/reset" in err and "/save PATH" in err  # /help
    assert "unknown command /nonsense" in err
    for snap, turn in zip(snaps, ("line one\nline two", "first \nsecond", "/slash")):
        expected = chat_prefix_ids(saved_model_dir, f"Be brief.\n\n{turn}")
        assert saved_ids(saved_model_dir, snap)[:len(expected)] == expected, turn


def test_chat_help_says_it_defaults_to_the_demo_model(capsys, monkeypatch):
    rc, out, _ = cli(capsys, monkeypatch, "chat", "--help")
    assert rc == 0 and "bundled demo model" in out and "not\ninstruction-tuned" in out
    assert "Ctrl-C" in out and "/reset" in out and "--system" in out and "--threads" in out


def test_bench_errors_are_one_line_and_a_failed_run_exits_1(capsys, monkeypatch, tmp_path):
    rc = main(["bench", "decode", "--model", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and err.startswith("streamgemma bench: error: ")
    # A fuzz run that found internal errors (here made to) exits 1, as a fleet run that lost data does.
    import streamgemma.bench.fuzz as fuzz

    # Clients that cannot reach --url: a BrokenBarrierError traceback from the main process.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{closed.getsockname()[1]}/v1/stream"
    rc = main(["bench", "serve", "--url", url, "--clients", "2", "--procs", "1", "--timeout", "30"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert err.startswith(f"streamgemma bench: error: a client process failed against {url}: Connection"), err
    monkeypatch.setattr(fuzz, "failures", lambda result: ["simulated: 3 internal errors"])
    rc = main(["bench", "fuzz", "--preset", "tiny", "--device", "cpu", "--frames", "20", "--handshakes", "2",
               "--connections", "1"])
    assert rc == 1 and "the run failed" in capsys.readouterr().err


# -- found by a review ---------------------------------------------------------------------------
def _main_with_stdin(monkeypatch, capsys, args, stdin):
    monkeypatch.setattr(sys, "stdin", stdin)
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_chat_save_to_a_directory_is_refused_before_the_model_loads(monkeypatch, capsys, tmp_path):
    """It passed the check (only the parent was), and the chat died after its first reply."""
    rc, out, err = _main_with_stdin(monkeypatch, capsys, ["chat", "--save", str(tmp_path), "--max-tokens", "3"],
                                    io.StringIO("first turn\nsecond turn\n"))
    assert rc == 1 and out == "" and "is a directory" in err


def test_a_failing_autosave_does_not_end_the_chat(monkeypatch, capsys, tmp_path):
    """/save reported an OSError and went on; the --save autosave ended the whole chat."""
    import streamgemma.session.session as session_module

    save, calls = session_module.Session.save, []

    def full_disk_once(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return save(self, path, *args, **kwargs)

    monkeypatch.setattr(session_module.Session, "save", full_disk_once)
    rc, out, err = _main_with_stdin(monkeypatch, capsys, ["chat", "--save", str(tmp_path / "chat.sgsnap"),
                                                          "--max-tokens", "3", "--seed", "0"],
                                    io.StringIO("first turn\nsecond turn\n"))
    assert rc == 0 and len(calls) == 2 and "not saved" in err and (tmp_path / "chat.sgsnap").exists()


def test_text_that_is_not_utf8_is_one_line_and_a_chat_goes_on():
    """argv and stdin decode a bad byte to a lone surrogate, which SentencePiece met with a traceback."""
    run = lambda *args, data: subprocess.run([sys.executable, "-m", "streamgemma.cli", *args],  # noqa: E731
                                             input=data, capture_output=True, timeout=120, env=subprocess_env())
    bad = run("generate", "-", "--max-tokens", "2", data=b"\xff caf\xe9")
    err = bad.stderr.decode()
    assert bad.returncode == 1 and "not valid UTF-8" in err and len(err.strip().splitlines()) == 1
    chat = run("chat", "--max-tokens", "3", "--seed", "0", data=b"hello\n\xff caf\xe9\nthird turn\n")
    assert chat.returncode == 0 and "not sent" in chat.stderr.decode()
    system = run("chat", "--system", b"\xff".decode("utf-8", "surrogateescape"), data=b"hi\n")
    err = system.stderr.decode()  # (before: accepted, then dropped with the first turn)
    assert system.returncode == 1 and "--system is not valid UTF-8" in err and len(err.strip().splitlines()) == 1


def test_absurd_threads_are_refused(capsys):
    """torch segfaults with 100,000 threads."""
    assert main(["generate", "x", "--threads", "100000"]) == 1
    assert "--threads must be in [1, 1024]" in capsys.readouterr().err

