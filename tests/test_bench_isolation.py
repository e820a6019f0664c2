"""`streamgemma bench isolation` and `streamgemma bench fuzz` run end to end
at smoke-test sizes (the figures themselves: bench/RESULTS.md, issue #23)."""

import json

from streamgemma.bench import main


def test_isolation_runs_every_attack_at_smoke_test_sizes(tmp_path):
    out = tmp_path / "isolation.json"
    record = main(["isolation", "--baseline", "0.5", "--recovery", "0.2", "--appends", "60", "--frames-seconds",
                   "0.5", "--queued-sessions", "2", "--queued-tokens", "3000", "--connections", "8",
                   "--abandoned", "8", "--hold", "0.2", "--session-ttl", "30", "--json", str(out)])
    phases = record["results"]["phases"]
    assert [p["phase"] for p in phases] == ["appends", "frames", "queued", "connections", "abandoned"]
    for p in phases:
        assert "status" not in p["attacker"], p  # every attack ran to its end
        assert p["canary_tokens_per_s"]["before"] > 0 and p["rss_peak_MB"] > 0
    assert phases[0]["attacker"]["replies"] == {"appended": 60}
    assert phases[3]["attacker"]["outcome"] == {"opened": 8}
    assert json.loads(out.read_text())["bench"] == "isolation"


def test_fuzz_command_at_smoke_test_size():
    record = main(["fuzz", "--frames", "400", "--connections", "2", "--handshakes", "20", "--preset", "tiny",
                   "--model", ""])
    assert record["results"]["failures"] == [] and record["results"]["frames"] == 400
