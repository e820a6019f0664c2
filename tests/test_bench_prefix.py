"""`streamgemma bench prefix` and `bench serve --http` run on the CPU with the
tiny preset (the figures are the lead's to measure on a GPU)."""

from __future__ import annotations

from test_bench import positive, run


def test_prefix(tmp_path):
    r = run("prefix", "--prompt", "40", "--reply", "3", "--turn", "3", "--reps", "1", tmp_path=tmp_path)
    assert set(r["ttft"]) == {"live", "recompute", "cached_held", "cached_memory", "cached_store"}
    assert all(len(v["samples_ms"]) == 1 and positive(v["p50_ms"]) for v in r["ttft"].values())
    assert positive(r["cached_held_over_live"], r["cached_memory_over_live"], r["recompute_over_cached_store"])


def test_serve_with_the_http_api(tmp_path):
    r = run("serve", "--clients", "2", "--tokens", "6", "--prompt", "8", "--procs", "1", "--decode-steps", "0",
            "--no-gc-freeze", "--http", "--http-scrape", "0.01", tmp_path=tmp_path)
    assert r["generated"] == 2 * 6
    assert r["http_api"]["enabled"] and r["http_api"]["scrapes"] >= 1
