"""bench/dev/ab.py runs one bench command against several trees in turn, each
run with its own tree first on the path and its own commit in the record."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "dev" / "ab.py"


def _ab():
    spec = importlib.util.spec_from_file_location("ab", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_tree_runs_in_turn_and_records_its_commit(tmp_path, capsys):
    ab = _ab()
    out = tmp_path / "runs"
    values = ab.main(["--tree", f"before={ROOT}@aaaa111", "--tree", f"after={ROOT}@bbbb222", "--rounds", "1",
                      "--out", str(out), "--metric", "environment.git.commit", "--metric", "results.tok_s.1",
                      "--", "decode", "--preset", "tiny", "--device", "cpu", "--batches", "1", "--positions", "",
                      "--steps", "2", "--generate-tokens", "0"])
    assert values["before"]["environment.git.commit"] == ["aaaa111"]
    assert values["after"]["environment.git.commit"] == ["bbbb222"]
    assert all(v[0] > 0 for v in (values["before"]["results.tok_s.1"], values["after"]["results.tok_s.1"]))
    assert sorted(p.name for p in out.iterdir()) == ["after-1.json", "after-1.log", "before-1.json", "before-1.log"]
    printed = capsys.readouterr().out
    assert printed.index("before round 1") < printed.index("after round 1")


def test_a_failing_run_is_reported_and_the_others_go_on(tmp_path, capsys):
    ab = _ab()
    values = ab.main(["--tree", f"a={ROOT}", "--tree", f"b={ROOT}", "--rounds", "1", "--out", str(tmp_path),
                      "--metric", "results", "--", "decode", "--no-such-option"])
    assert values == {"a": {"results": []}, "b": {"results": []}}
    printed = capsys.readouterr().out
    assert "a round 1: failed" in printed and "b round 1: failed" in printed
    assert "--no-such-option" in (tmp_path / "a-1.log").read_text()
