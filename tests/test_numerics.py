"""The model against its ground truths (the official reference and transformers),
and the parallel path against the one-token path.

These check the reference path in float32 on the CPU, also on a machine with
a GPU (where a model would default to CUDA and bfloat16); the kernel path's
GPU numerics are tests/test_gpu.py's and tests/test_kernels.py's."""

import functools

import pytest
import torch
from conftest import random_tokens
from reference import hf_logits, hf_model, official_griffin, official_logits, rel_err

import streamgemma as sg

CPU = "cpu"
TOL = 1e-4  # float32: max |ours - ref| / max |ref| over all positions


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    """The official reference network with random weights, saved as a Kaggle-style state dict."""
    cfg = sg.GriffinConfig.preset("tiny")
    net = official_griffin(cfg, seed=1)
    path = tmp_path_factory.mktemp("official") / "tiny.pt"
    torch.save(net.state_dict(), path)
    return cfg, net, path


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """transformers' model with random weights, written by save_pretrained (window 16)."""
    cfg = sg.GriffinConfig.preset("tiny", attention_window=16)
    model = hf_model(cfg, seed=2)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return cfg, model, path


def feed_all(model, tokens, chunk):
    """Logits at every position from the parallel path, chunk by chunk."""
    s = model.session()
    return model.prefill(s.slot, tokens, all_logits=True, chunk_size=chunk)


def step_all(model, tokens):
    s = model.session()
    return torch.stack([s.step(t) for t in tokens])


def test_official_reference_well_past_the_window(official_checkpoint):
    cfg, net, path = official_checkpoint
    model = sg.load(path, device=CPU, config=cfg)
    tokens = random_tokens(6 * cfg.attention_window + 5, cfg.vocab_size, seed=3)  # 6 ring wraps
    ref = official_logits(net, tokens)
    for chunk in (1, 3, cfg.attention_window, 13, len(tokens)):
        assert rel_err(feed_all(model, tokens, chunk), ref) < TOL, chunk
    assert rel_err(step_all(model, tokens), ref) < TOL


def test_transformers_up_to_the_window(hf_checkpoint):
    cfg, hf, path = hf_checkpoint
    model = sg.load(path, device=CPU)
    assert model.config == cfg
    tokens = random_tokens(cfg.attention_window, cfg.vocab_size, seed=4)
    ref = hf_logits(hf, tokens)
    assert rel_err(feed_all(model, tokens, 5), ref) < TOL
    assert rel_err(feed_all(model, tokens, len(tokens)), ref) < TOL
    assert rel_err(step_all(model, tokens), ref) < TOL


def test_transformers_reads_what_we_save(hf_checkpoint, tmp_path):
    from transformers import RecurrentGemmaForCausalLM

    cfg, hf, path = hf_checkpoint
    model = sg.load(path, device=CPU)
    model.save(tmp_path)
    again = RecurrentGemmaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = random_tokens(cfg.attention_window, cfg.vocab_size, seed=5)
    assert rel_err(hf_logits(again, tokens), hf_logits(hf, tokens)) < 1e-6


def test_feed_chunks_equal_one_feed_equal_steps():
    cfg = sg.GriffinConfig.preset("tiny")
    model = sg.Model.random(cfg, seed=0, device=CPU)
    tokens = random_tokens(5 * cfg.attention_window + 3, cfg.vocab_size, seed=6)
    whole = model.session().feed(tokens)
    stepped = step_all(model, tokens)[-1]
    # splits straddling ring wraps, with chunk sizes above and below the window
    for cuts in ([1, 2, 9, 20], [7, 8, 16, 30], [24], [3, 4, 5, 6, 7, 8]):
        s = model.session()
        bounds = [0, *cuts, len(tokens)]
        for a, b in zip(bounds, bounds[1:]):
            logits = s.feed(tokens[a:b])
        assert s.position == len(tokens)
        assert rel_err(logits, whole) < TOL
    assert rel_err(stepped, whole) < TOL


def test_mixed_feed_and_step_in_one_session():
    cfg = sg.GriffinConfig.preset("tiny")
    model = sg.Model.random(cfg, seed=7, device=CPU)
    tokens = random_tokens(40, cfg.vocab_size, seed=8)
    ref = step_all(model, tokens)
    s = model.session()
    s.feed(tokens[:5])
    for t in tokens[5:12]:
        s.step(t)
    logits = s.feed(tokens[12:])
    assert rel_err(logits, ref[-1]) < TOL


def test_batched_decode_rows_at_different_positions():
    """One decode call serving sessions at different positions equals each alone."""
    cfg = sg.GriffinConfig.preset("tiny")
    model = sg.Model.random(cfg, seed=9, device=CPU)
    prompts = [random_tokens(n, cfg.vocab_size, seed=n) for n in (1, 7, 8, 19)]
    sessions = [model.session() for _ in prompts]
    for s, p in zip(sessions, prompts):
        s.feed(p)
    alone = []
    for p in prompts:
        twin = model.session()
        twin.feed(p)
        alone.append(twin.step(5))
    batched = model.decode([s.slot for s in sessions], [5] * len(sessions))
    for row, ref in zip(batched, alone):
        assert rel_err(row, ref) < TOL


@pytest.mark.parametrize("dtype,bound", [("bfloat16", 5e-2), ("float16", 1e-2)])
def test_half_precision_stays_close_to_float32(dtype, bound):
    """bfloat16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3); through six
    blocks the logits drift by a few units of that. We measured up to 2.7e-2 (bf16)
    and 2.7e-3 (fp16) relative to the logits' scale on these tiny models, so the
    bounds hold with margin while still catching a wrong op (errors of order 1)."""
    cfg = sg.GriffinConfig.preset("tiny")
    for seed in range(3):
        ref = sg.Model.random(cfg, seed=seed, device=CPU)
        half = sg.Model.random(cfg, seed=seed, dtype=dtype, device=CPU)
        tokens = random_tokens(48, cfg.vocab_size, seed=seed)
        want = feed_all(ref, tokens, 16)
        got_feed = feed_all(half, tokens, 16)
        got_step = step_all(half, tokens)
        assert rel_err(got_feed, want) < bound
        assert rel_err(got_step, want) < bound
        assert (got_feed.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_reset_at_position_zero_forgets_history():
    cfg = sg.GriffinConfig.preset("tiny")
    model = sg.Model.random(cfg, seed=10, device=CPU)
    tokens = random_tokens(20, cfg.vocab_size, seed=11)
    fresh = model.session().feed(tokens)
    reused = model.session()
    reused.feed(random_tokens(30, cfg.vocab_size, seed=12))
    reused.close()
    again = model.session()  # reuses the released slot: must start clean
    assert again.slot == reused.slot
    assert torch.equal(again.feed(tokens), fresh)


def test_decode_takes_tokens_from_a_device_tensor():
    """Tokens as an int64 tensor on the model's device (how the engine feeds
    sampled ids without reading them back) give the same step as host ints;
    a tensor of the wrong shape or dtype is refused with a clear error."""
    cfg = sg.GriffinConfig.preset("tiny")
    model = sg.Model.random(cfg, seed=9, device=CPU)
    sessions = [model.session() for _ in range(3)]
    for i, s in enumerate(sessions):
        s.feed(random_tokens(2 + 5 * i, cfg.vocab_size, seed=i))
    twins = [model.restore(s.snapshot()) for s in sessions]
    tokens = [5, 17, 3]
    want = model.decode([t.slot for t in twins], tokens).clone()
    on_device = functools.partial(torch.tensor, device=model.device)
    got = model.decode([s.slot for s in sessions], on_device(tokens))
    assert torch.equal(got, want)
    assert [s.position for s in sessions] == [t.position for t in twins]
    for bad in (on_device(tokens, dtype=torch.int32), on_device(tokens[:2]), on_device([tokens]),
                torch.tensor(tokens, device="meta")):
        with pytest.raises(ValueError, match="int64"):
            model.decode([s.slot for s in sessions], bad)
    with pytest.raises(ValueError, match="3 slots but 2 tokens"):
        model.decode([s.slot for s in sessions], tokens[:2])
