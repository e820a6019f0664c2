"""`streamgemma bench ...`: every command runs on the CPU with the tiny preset
and records where it was measured."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest
from conftest import subprocess_env

from streamgemma.bench import main

TINY = ["--preset", "tiny", "--device", "cpu"]
ENVIRONMENT = ("command", "timestamp", "git", "streamgemma", "python", "torch", "triton", "gpu", "driver", "host")


def run(*argv: str, tmp_path) -> dict:
    path = tmp_path / "out.json"
    record = main([*argv, *TINY, "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(record))
    assert record["bench"] == argv[0]
    env = record["environment"]
    assert set(ENVIRONMENT) <= set(env)
    assert env["git"]["commit"] and env["command"]
    assert record["results"]["model"]["preset"] == "tiny"
    return record["results"]


def positive(*values) -> bool:
    return all(isinstance(v, (int, float)) and v > 0 for v in values)


def test_decode(tmp_path):
    r = run("decode", "--batches", "1,3", "--steps", "3", "--positions", "5,20", "--generate-tokens", "3",
            tmp_path=tmp_path)
    assert set(r["tok_s"]) == {1, 3} and positive(*r["tok_s"].values(), *r["ms_per_step"].values())
    assert set(r["batch1_ms_by_position"]) == {5, 20} and positive(*r["batch1_ms_by_position"].values())
    assert positive(r["session_generate_tok_s"], r["state_MB_per_session"], r["weight_GB"])


def test_prefill(tmp_path):
    r = run("prefill", "--lengths", "20,40", "--chunks", "16", tmp_path=tmp_path)
    assert set(r["tok_s"][16]) == {20, 40} and positive(*r["tok_s"][16].values())
    assert r["attention"] == "reference"  # a CPU model runs the reference path, whatever --attention says


def test_snapshot(tmp_path):
    r = run("snapshot", "--repeats", "2", tmp_path=tmp_path)
    assert r["position"] == r["window"] + 123
    assert positive(r["state_MB"], r["snapshot_MB"], r["snapshot_ms"]["median"], r["restore_ms"]["median"])
    assert r["format"] == "format v2, 1 frames" and r["threads"] is None
    r = run("snapshot", "--repeats", "1", "--threads", "2", "--level=-1", "--parts", tmp_path=tmp_path)
    assert r["threads"] == 2 and r["level"] == -1
    assert positive(*(r["parts_ms"][k] for k in ("capture", "encode", "decompress", "decode", "load",
                                                  "restore_of_a_capture")))


def test_serve(tmp_path):
    r = run("serve", "--clients", "3", "--tokens", "6", "--prompt", "8", "--procs", "1", "--decode-steps", "2",
            "--no-gc-freeze", "--interject", "--gc-threshold", "0", tmp_path=tmp_path)
    assert r["generated"] == 3 * 6
    # no automatic collection (a full one may be asked for explicitly), and the threshold restored after
    assert r["gc"]["threshold"] == 0 and r["gc"]["collections"] == r["gc"]["gen2"] and gc.get_threshold()[0] > 0
    assert positive(r["overall_tokens_per_s"], r["decode_alone_tok_s"], r["frame_gap_ms"]["max"],
                    r["decode_alone_mid_tok_s"], r["steady_share_of_decode_mid"])
    assert r["decode_alone_mid_position"] == 8 + 6 // 2  # the clients' mean position: prompt + tokens / 2


def test_resume(tmp_path):
    r = run("resume", "--sessions", "12", "--max-active", "3", "--resumes", "4", "--prompt", "8", "--wave", "5",
            tmp_path=tmp_path)
    assert r["store"]["sessions"] == 12 and r["resumes"] == 4 and r["slots_held"] == 3
    assert positive(r["store"]["bytes"], r["resume_ms"]["p50"], r["open_ms"]["p50"], r["append_ms"]["p50"])


def test_command_line(tmp_path):
    """`streamgemma bench` forwards to the same entry point; --json - prints the record."""
    out = subprocess.run([sys.executable, "-m", "streamgemma.cli", "bench", "snapshot", *TINY, "--repeats", "1",
                          "--json", "-"], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)  # (the record alone: the progress lines are on stderr)
    assert record["bench"] == "snapshot" and "streamgemma.cli bench snapshot" in record["environment"]["command"]


def test_unknown_command():
    with pytest.raises(SystemExit):
        main(["tune"])


def test_serve_counters_say_how_evenly_frames_were_written():
    """CounterSampler.window: frames written per sampling period inside the window (a burst shows as a
    median far below the most), beside the totals."""
    from types import SimpleNamespace

    from streamgemma.bench.serve import CounterSampler

    sampler = CounterSampler(SimpleNamespace(decode_calls=0, decoded_tokens=0), SimpleNamespace(), period=0.01)
    written = [0, 0, 0, 256, 256, 256, 256, 512, 512, 512, 512]  # 256 frames every fourth sample
    sampler.samples = [(0.01 * i, {"decode_calls": i, "decoded_tokens": 256 * i, "server_frames_direct": w,
                                   "server_frames_queued": 0}) for i, w in enumerate(written)]
    window = sampler.window(0.0, 0.1)
    assert window["server_frames_direct"] == 512 and window["calls"] == 10
    assert window["frames_per_10ms"] == {"p50": 0, "p90": 256, "max": 256}
