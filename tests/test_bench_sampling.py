"""`streamgemma bench sampling` and `bench serve` with a sampling setting, on
the CPU with the tiny preset."""

from __future__ import annotations

from test_bench import positive, run


def test_sampling(tmp_path):
    r = run("sampling", "--batches", "1,3", "--settings", "greedy,serve,top_k_top_p_rep", "--tokens", "3",
            "--steps", "2", tmp_path=tmp_path)
    assert set(r["batches"]) == {"1", "3"}
    for batch, results in r["batches"].items():
        assert set(results) == {"greedy", "serve", "top_k_top_p_rep"}
        assert all(positive(x["tokens_per_s"], x["of_greedy"]) for x in results.values())
        if batch == "3":
            assert all(positive(x["sample_alone_ms"]) for x in results.values())


def test_serve_with_a_sampling_setting(tmp_path):
    r = run("serve", "--clients", "2", "--tokens", "4", "--prompt", "8", "--procs", "1", "--decode-steps", "2",
            "--no-gc-freeze", "--temperature", "0.8", "--top-k", "40", "--top-p", "0.95", tmp_path=tmp_path)
    assert r["sampling"] == {"temperature": 0.8, "top_k": 40, "top_p": 0.95}
    assert r["generated"] == 2 * 4
