"""`streamgemma bench sampling` and `bench serve` with a sampling setting, on
the CPU with the tiny preset."""

from __future__ import annotations

from test_bench import positive, run


def test_sampling(tmp_path):
    r = run("sampling", "--batches", "1,3", "--settings", "greedy,serve,top_k_top_p_rep", "--tokens", "3",
            "--steps", "2", "--rounds", "3", tmp_path=tmp_path)
    assert set(r["batches"]) == {"1", "3"}
    one = r["batches"]["1"]
    # Each round: greedy, a setting, greedy, the other setting, greedy.
    assert len(one["greedy"]["runs_tokens_per_s"]) == 3 * 3
    for name in ("serve", "top_k_top_p_rep"):
        runs, shares = one[name]["runs_tokens_per_s"], one[name]["runs_of_greedy"]
        assert len(runs) == len(shares) == 3
        assert one[name]["of_greedy"] == sorted(shares)[1]  # the median over rounds
        assert one[name]["tokens_per_s"] == sorted(runs)[1]
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


def test_sampling_measures_greedy_at_batch_1_as_the_reference(tmp_path):
    r = run("sampling", "--batches", "1", "--settings", "min_p", "--tokens", "2", "--rounds", "1",
            tmp_path=tmp_path)
    one = r["batches"]["1"]
    assert set(one) == {"greedy", "min_p"} and len(one["greedy"]["runs_tokens_per_s"]) == 2
    assert positive(one["min_p"]["of_greedy"])
