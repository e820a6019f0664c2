"""Sampling parameters, device-side sampling ops and stop-string hold-back."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from streamgemma.sampling import SamplingParams, StopStrings, apply_penalties, sample


@pytest.mark.parametrize("field,value,words", [
    ("temperature", -0.5, "temperature must be >= 0.0, got -0.5"),
    ("temperature", math.nan, "temperature must be a finite number"),
    ("top_p", 0.0, "top_p must be in (0, 1], got 0.0"),
    ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
    ("top_k", -1, "top_k must be an integer >= 0"),
    ("top_k", 2.5, "got 2.5"),
    ("min_p", 1.0, "min_p must be in [0, 1), got 1.0"),
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
    ("max_tokens", 0, "max_tokens must be a positive integer or None, got 0"),
    ("stop", [""], "stop strings must be non-empty"),
    ("stop_token_ids", [-3], "got -3"),
    ("seed", "x", "seed must be an integer"),
])
def test_invalid_values_are_named(field, value, words):
    with pytest.raises(ValueError) as e:
        SamplingParams(**{field: value})
    assert words in str(e.value)


def test_a_single_stop_string_is_not_split_into_characters():
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)


def logits_fixture():
    return torch.tensor([0.0, 3.0, 2.5, -1.0, 1.0])


def test_greedy_and_degenerate_filters_pick_the_argmax():
    logits = logits_fixture()
    g = torch.Generator().manual_seed(0)
    assert sample(logits, SamplingParams(temperature=0), None).item() == 1
    for params in (SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=0.99)):
        assert {sample(logits, params, g).item() for _ in range(50)} == {1}


def test_top_k_and_top_p_keep_only_the_likeliest():
    logits = logits_fixture()
    g = torch.Generator().manual_seed(0)
    seen = {sample(logits, SamplingParams(top_k=2), g).item() for _ in range(300)}
    assert seen == {1, 2}
    # p(1) ~ 0.53, p(2) ~ 0.32: 0.8 is reached only with both.
    seen = {sample(logits, SamplingParams(top_p=0.8), g).item() for _ in range(300)}
    assert seen == {1, 2}


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.1, 0.6, 0.3]))
    g = torch.Generator().manual_seed(1)
    counts = torch.bincount(torch.stack([sample(logits, SamplingParams(), g) for _ in range(4000)]), minlength=3)
    assert torch.allclose(counts / 4000.0, torch.tensor([0.1, 0.6, 0.3]), atol=0.03)


def test_same_generator_state_same_draws():
    logits = torch.randn(100)
    a = [sample(logits, SamplingParams(), torch.Generator().manual_seed(7)).item() for _ in range(5)]
    b = [sample(logits, SamplingParams(), torch.Generator().manual_seed(7)).item() for _ in range(5)]
    assert a == b


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0])
    recent = torch.tensor([0, 1, 0])
    out = apply_penalties(logits, recent, repetition=2.0, presence=0.5)
    assert out.tolist() == [2.0 / 2 - 0.5, -2.0 * 2 - 0.5, 1.0]


@settings(max_examples=200, deadline=None)
@given(before=st.text(alphabet="ab END\n", max_size=12), after=st.text(alphabet="ab END\n", max_size=8),
       cuts=st.lists(st.integers(0, 30), max_size=6))
def test_stop_strings_split_across_pushes_are_never_emitted(before, after, cuts):
    stops = ["END", "\n\n"]
    text = before + "END" + after
    first = min(i for i in (text.find(s) for s in stops) if i >= 0)
    bounds = sorted({0, len(text), *[c for c in cuts if c < len(text)]})
    matcher, emitted, stopped = StopStrings(stops), "", False
    for a, b in zip(bounds, bounds[1:]):
        out, stopped = matcher.push(text[a:b])
        emitted += out
        assert not any(s in emitted for s in stops)
        if stopped:
            break
    assert stopped and emitted == text[:first]


def test_text_held_back_is_released_when_no_stop_follows():
    m = StopStrings(["END"])
    assert m.push("hi EN") == ("hi ", False)
    assert m.push("x") == ("ENx", False)
    assert m.push("E") == ("", False)
    assert m.flush() == "E" and m.matched is None
