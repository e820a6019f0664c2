"""The bench commands at their edges: --json into a missing directory, secrets in the record, a user's Redis
left with the run's keys, nearest-rank percentiles, zero counts (each found by a review)."""

from __future__ import annotations

import json
import sys

import pytest
from redisfixture import redis_server  # noqa: F401 (fixture)

import streamgemma as sg
from streamgemma.bench import main

TINY = ["--preset", "tiny", "--device", "cpu"]


# 1. --json in a missing directory: the whole run happens, then the figures are lost
def test_json_path_in_missing_directory_fails_before_the_run(tmp_path, monkeypatch):
    import streamgemma.bench.snapshot as snapshot

    ran = []
    real = snapshot.run
    monkeypatch.setattr(snapshot, "run", lambda args: ran.append(1) or real(args))
    with pytest.raises((SystemExit, OSError)):
        main(["snapshot", "--repeats", "1", *TINY, "--json", str(tmp_path / "missing" / "out.json")])
    assert not ran, "the benchmark ran to the end, then could not write its record: the figures are lost"


def test_json_path_that_is_a_directory_fails_before_the_run(tmp_path, monkeypatch):
    import streamgemma.bench.snapshot as snapshot

    monkeypatch.setattr(snapshot, "run", lambda args: pytest.fail("the benchmark ran, then could not write"))
    with pytest.raises(SystemExit) as e:
        main(["snapshot", "--repeats", "1", *TINY, "--json", str(tmp_path)])
    assert e.value.code == 2


# 2. secrets given on the command line are written into the JSON record
def test_record_keeps_no_bearer_token(tmp_path, monkeypatch):
    from streamgemma.bench.serve import serving

    model = sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0, device="cpu", dtype="float32")
    server = sg.Server(sg.Engine(model, max_active=2), port=0, token="s3cret-token")
    path = tmp_path / "serve.json"
    argv = ["serve", "--url", None, "--token", "s3cret-token", "--clients", "1", "--tokens", "2", "--prompt", "4",
            "--procs", "1", "--json", str(path)]
    with serving(server):
        argv[2] = server.url
        monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "streamgemma.bench", *argv])
        record = main(argv)
    assert record["results"]["generated"] == 2
    assert "s3cret-token" not in path.read_text()


def test_record_keeps_no_redis_password(tmp_path, monkeypatch):
    """(What `bench handover|fleet --redis redis://:PASSWORD@...` and `bench serve --store` record, through
    the same `finish` that main() calls after the run; confirmed end to end with handover too.)"""
    from streamgemma.bench import _parser
    from streamgemma.bench.common import finish

    path = tmp_path / "handover.json"
    argv = ["handover", "--redis", "redis://:hunter2@127.0.0.1:6379/0", *TINY, "--json", str(path)]
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "streamgemma.bench", *argv])
    finish("handover", _parser().parse_args(argv), {"model": {"device": "cpu"}})
    assert "hunter2" not in path.read_text()


# 3. `bench handover --redis URL` leaves its session's snapshot, journal and index in the user's Redis
def test_handover_leaves_nothing_in_the_given_redis(redis_server):  # noqa: F811
    import redis

    main(["handover", "--tokens", "8", "--rounds", "1", *TINY, "--redis", redis_server.url])
    keys = redis.Redis.from_url(redis_server.url).keys("*")
    assert keys == [], f"left behind: {sorted(keys)}"


# 4. percentiles: one rank too high; p99 of <= 100 samples is always the max
def test_percentiles_are_nearest_rank():
    from streamgemma.bench.clients import percentiles

    p = percentiles([k / 1e3 for k in range(1, 101)])  # 1..100 ms
    assert p["max"] == 100
    assert p["p99"] == 99, p  # nearest rank: the ceil(0.99 * 100) = 99th value
    assert p["p50"] == 50, p
    assert percentiles([0.001, 0.002, 0.003, 0.004])["p50"] == 2  # ceil(0.5 * 4) = 2nd value


# 5. zero counts: tracebacks (or a bare library message after the whole run) instead of a usage error
@pytest.mark.parametrize("argv", [
    ["decode", "--batches", "1", "--steps", "0", "--positions", "", "--generate-tokens", "0"],
    ["quantize", "--positions", "0", "--formats", "int8"],
    ["quantize", "--positions", "8", "--chunk", "-5", "--formats", "int8"],
    ["sampling", "--batches", "4", "--steps", "0", "--settings", "greedy"],
    ["snapshot", "--repeats", "0"],
    ["serve", "--clients", "1", "--tokens", "0", "--prompt", "4", "--procs", "1", "--decode-steps", "0",
     "--timeout", "30"],
    # lists of counts: tracebacks from deep in the run, or a misleading message
    ["decode", "--batches", "0", "--steps", "1"],
    ["decode", "--batches", "1", "--steps", "1", "--positions", "-5"],
    ["prefill", "--lengths", "-3", "--chunks", "8"],
    ["prefill", "--lengths", "8", "--chunks", "8,x"],
    ["sampling", "--batches", "", "--steps", "1", "--settings", "greedy"],
])
def test_zero_counts_are_usage_errors(argv):
    with pytest.raises(SystemExit) as e:
        main([*argv, *TINY])
    assert e.value.code == 2


# 6. a path argument in the record: the JSON was not written, after the whole run
def test_a_path_argument_is_written_into_the_record(tmp_path):
    text = tmp_path / "sample.txt"
    text.write_text("The function returns the value of the key. " * 20)
    out = tmp_path / "q.json"
    record = main(["quantize", "--model", "demo", "--device", "cpu", "--text", str(text), "--positions", "20",
                   "--chunk", "10", "--formats", "int8", "--json", str(out)])
    assert out.exists() and record["settings"]["text"] == str(text)


# 7. --json -: the progress lines came first on stdout, so it was no JSON
def test_json_to_stdout_is_the_record_alone(capsys):
    main(["decode", "--batches", "1", "--steps", "2", "--positions", "", "--generate-tokens", "1", *TINY,
          "--json", "-"])
    out, err = capsys.readouterr()
    assert json.loads(out)["bench"] == "decode" and "batch 1" in err
