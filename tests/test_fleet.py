"""The fleet's fault test at CI size (issue #19): 3 `streamgemma serve`
workers on a real redis-server, sessions appending and generating, one
worker SIGKILLed at a random moment in each of 2 rounds. Nothing acknowledged
is lost, every session is reopened on a survivor, and every generated token
equals a local never-killed session's (CPU, float32). The full run is
`streamgemma bench fleet --workers 3 --sessions 100 --rounds 20`."""

from __future__ import annotations

import json

from redisfixture import redis_server  # noqa: F401 (fixture)

from streamgemma.bench import main


def test_a_worker_killed_each_round_loses_nothing(redis_server, tmp_path):  # noqa: F811
    out = tmp_path / "fleet.json"
    record = main(["fleet", "--workers", "3", "--sessions", "12", "--rounds", "2", "--tokens", "16",
                   "--redis", redis_server.url, "--seed", "1", "--json", str(out)])
    r = record["results"]
    assert r["passed"], r
    assert r["lost_acknowledged"] == r["history_gaps"] == r["reopen_failures"] == r["sessions_mismatched"] == 0
    assert len(r["kills"]) == 2 and r["acknowledged_inputs"] >= 24
    assert r["generated_tokens_checked"] >= r["tokens_received"] >= 12 * 2 * 16  # (+ missed ones)
    assert r["reopened"] > 0  # clients of the killed worker reopened their sessions on survivors
    assert r["moved"] > 0  # sessions were handed over between live workers too
    assert json.loads(out.read_text())["bench"] == "fleet"


def test_the_handover_bench_runs_at_smoke_test_size(redis_server):  # noqa: F811
    r = main(["handover", "--preset", "tiny", "--device", "cpu", "--tokens", "64", "--rounds", "2",
              "--redis", redis_server.url])["results"]
    assert len(r["first_token_ms"]["all"]) == 2 and r["snapshot_bytes"] > 0
    assert r["first_token_ms"]["median"] >= r["opened_ms"]["median"] > 0
