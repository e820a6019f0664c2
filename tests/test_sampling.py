"""Sampling parameters, device-side sampling ops and stop-string hold-back."""

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamgemma.sampling.params import SamplingParams
from streamgemma.sampling.philox import RandomStream
from streamgemma.sampling.sampler import PendingIds, SampleRow, apply_penalties, sample, sample_rows
from streamgemma.sampling.stops import StopStrings


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
    ("temperature", 10 ** 400, "temperature must be a finite number"),  # (math.isfinite overflowed)
    ("presence_penalty", -(10 ** 400), "presence_penalty must be a finite number"),
    ("stop", 5, "stop must be a list of strings, got 5"),  # (a bare TypeError from tuple())
    ("stop", b"ab", "stop must be a list of strings"),
    ("stop_token_ids", 5, "stop_token_ids must be a list of token ids, got 5"),
])
def test_invalid_values_are_named(field, value, words):
    with pytest.raises(ValueError) as e:
        SamplingParams(**{field: value})
    assert words in str(e.value)


def test_numpy_numbers_become_plain_ones_and_no_stop_is_none():
    """numpy integers and floats pass as numbers and are stored as int / float (a numpy top_k used to
    crash the sampler mid-generation: numpy.int64 has no bit_length); stop=None is no stop strings."""
    import numpy as np

    p = SamplingParams(max_tokens=np.int64(5), top_k=np.int32(3), seed=np.uint64(7), logprobs=np.int8(2),
                       temperature=np.float32(0.5), top_p=np.float64(0.9), stop=None)
    assert (type(p.max_tokens), type(p.top_k), type(p.seed), type(p.logprobs)) == (int, int, int, int)
    assert type(p.temperature) is float and type(p.top_p) is float and p.stop == ()


def test_a_single_stop_string_is_not_split_into_characters():
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)


def logits_fixture():
    return torch.tensor([0.0, 3.0, 2.5, -1.0, 1.0])


def test_greedy_and_degenerate_filters_pick_the_argmax():
    logits = logits_fixture()
    g = RandomStream(0)
    assert sample(logits, SamplingParams(temperature=0), None).item() == 1
    for params in (SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=0.99)):
        assert {sample(logits, params, g).item() for _ in range(50)} == {1}


def test_top_k_and_top_p_keep_only_the_likeliest():
    logits = logits_fixture()
    g = RandomStream(0)
    seen = {sample(logits, SamplingParams(top_k=2), g).item() for _ in range(300)}
    assert seen == {1, 2}
    # p(1) ~ 0.53, p(2) ~ 0.32: 0.8 is reached only with both.
    seen = {sample(logits, SamplingParams(top_p=0.8), g).item() for _ in range(300)}
    assert seen == {1, 2}


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.1, 0.6, 0.3]))
    # 4000 consecutive counters of one stream, as 4000 rows of one call
    draws = sample_rows(logits.expand(4000, 3), [SampleRow(SamplingParams(), (1, c)) for c in range(4000)])
    counts = torch.bincount(torch.tensor(draws), minlength=3)
    assert torch.allclose(counts / 4000.0, torch.tensor([0.1, 0.6, 0.3]), atol=0.03)


def test_same_stream_state_same_draws_and_each_sample_advances_it_by_one():
    logits = torch.randn(100)
    a, b = RandomStream(7, 3), RandomStream(7, 3)
    first = [sample(logits, SamplingParams(), a).item() for _ in range(5)]
    assert [sample(logits, SamplingParams(), b).item() for _ in range(5)] == first
    assert a == b == RandomStream(7, 8)
    again = [sample(logits, SamplingParams(), RandomStream(7, c)).item() for c in range(3, 8)]
    assert again == first  # (seed, counter) is the whole state


def test_a_sampled_row_without_a_stream_is_refused():
    with pytest.raises(ValueError, match="row 1 samples .* no random stream"):
        sample_rows(torch.zeros(2, 5), [SampleRow(SamplingParams(temperature=0)), SampleRow(SamplingParams())])


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


class QuadraticStops:
    """The obvious stop matcher (what StopStrings replaced): the reference its matcher is tested against."""

    def __init__(self, stops):
        self.stops, self.held, self.matched = tuple(stops), "", None

    def push(self, text):
        buf = self.held + text
        # the first stop to complete (then the longest), whatever the text's split into pieces
        hits = [(i + len(s), i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            _, at, self.matched = min(hits, key=lambda hit: hit[:2])
            self.held = ""
            return buf[:at], True
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(buf)), 0, -1)
                    if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False


@settings(max_examples=300, deadline=None)
@given(stops=st.lists(st.text("abc", min_size=1, max_size=6), min_size=1, max_size=4),
       chunks=st.lists(st.text("abc", max_size=5), max_size=30))
def test_the_stop_matcher_equals_the_quadratic_reference(stops, chunks):
    fast, ref = StopStrings(stops), QuadraticStops(stops)
    for chunk in chunks:
        got, want = fast.push(chunk), ref.push(chunk)
        assert got == want and fast.held == ref.held and fast.matched == ref.matched
        if got[1]:
            break


def test_text_held_back_is_released_when_no_stop_follows():
    m = StopStrings(["END"])
    assert m.push("hi EN") == ("hi ", False)
    assert m.push("x") == ("ENx", False)
    assert m.push("E") == ("", False)
    assert m.flush() == "E" and m.matched is None


# -- batched sampling: a row in a batch is sampled exactly as alone ----------------------
KINDS = (
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=5),
    dict(temperature=1.0, top_k=1),
    dict(temperature=0.8, top_p=0.9),
    dict(temperature=1.0, top_p=0.5, top_k=20),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.9, min_p=0.05, top_p=0.95),
    dict(temperature=1.0, repetition_penalty=1.5),
    dict(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5),
    dict(temperature=0.6, presence_penalty=1.0, top_k=30),
    dict(temperature=1.0, repetition_penalty=0.8, min_p=0.02),
)


def make_rows(batch: int, vocab: int, seed: int):
    """Params, seeds and recent ids for `batch` rows, a random mix of KINDS."""
    rng = random.Random(seed)
    specs = []
    for i in range(batch):
        kind = rng.choice(KINDS)
        recent = torch.tensor([rng.randrange(vocab + 40) for _ in range(rng.randrange(0, 60))], dtype=torch.int64)
        specs.append((SamplingParams(**kind), 1000 * seed + i, recent))
    return specs


def rows_of(specs, streams):
    """SampleRows as `Generation.sample_row` makes them: a sampled row takes
    (seed, counter) from its stream and advances it."""
    out = []
    for (params, _, recent), g in zip(specs, streams):
        penalized = params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
        out.append(SampleRow(params, None if params.greedy else g.take(), recent if penalized else None))
    return out


# CUDA joins where there is one (the GPU run of this file); CI has none, so nothing is skipped there.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 2, 5, 16, 33])
@pytest.mark.parametrize("vocab", [97, 512, 1001])
def test_batched_rows_equal_single_rows(batch, vocab, device):
    specs = make_rows(batch, vocab, seed=batch * 7 + vocab)
    logits = torch.randn(batch, vocab + 9, generator=torch.Generator().manual_seed(vocab)).to(device) * 4
    logits = logits[:, :vocab]  # a column-sliced view, as the engine passes with spare vocabulary rows
    together = [RandomStream.seeded(s) for _, s, _ in specs]
    alone = [RandomStream.seeded(s) for _, s, _ in specs]
    for step in range(3):  # the streams continue identically
        batched = sample_rows(logits, rows_of(specs, together))
        single = [sample_rows(logits[i:i + 1].contiguous(), rows_of(specs[i:i + 1], alone[i:i + 1]))[0]
                  for i in range(batch)]
        assert batched == single, f"step {step}"
        assert together == alone, f"stream states, step {step}"
        logits = logits.roll(1, dims=1)


def test_batched_rows_equal_single_rows_with_threads():
    """Several CPU threads split elementwise ops at places that depend on the
    batch: the tokens must not."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        test_batched_rows_equal_single_rows(24, 4099, "cpu")
    finally:
        torch.set_num_threads(before)


def test_sample_is_one_row_of_sample_rows():
    logits = torch.randn(300, generator=torch.Generator().manual_seed(3))
    for kind in KINDS:
        params = SamplingParams(**kind)
        a = RandomStream(5, 2)
        want = sample_rows(logits[None], [SampleRow(params, None if params.greedy else (5, 2))])[0]
        assert sample(logits, params, a).item() == want
        assert a == RandomStream(5, 2 if params.greedy else 3)


def test_greedy_rows_draw_nothing_from_their_stream():
    g = RandomStream(1, 4)
    logits = torch.randn(4, 50)
    greedy = SamplingParams(temperature=0)
    assert [sample(row, greedy, g).item() for row in logits] == logits.argmax(-1).tolist()
    assert g == RandomStream(1, 4)


def test_penalties_in_a_batch_touch_only_their_row():
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0]])
    greedy = SamplingParams(temperature=0)
    penalized = SamplingParams(temperature=0, repetition_penalty=2.0)
    rows = [SampleRow(penalized, None, torch.tensor([0, 0, 7])), SampleRow(greedy)]  # 7: outside V, ignored
    assert sample_rows(logits, rows) == [1, 0]


def test_min_p_keeps_tokens_at_least_min_p_times_the_top_one():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    rows = [SampleRow(SamplingParams(min_p=0.2), (0, c)) for c in range(800)]
    seen = set(sample_rows(logits.expand(800, 4), rows))
    assert seen == {0, 1, 2}  # 0.05 < 0.2 x 0.5


def test_a_scaled_row_gets_the_same_token_beside_filtered_rows():
    """Unfiltered rows with temperature != 1 take a shorter path when no row of
    the batch has a filter: the token must not depend on that."""
    logits = torch.randn(3, 700, generator=torch.Generator().manual_seed(9)) * 5
    plain = SamplingParams(temperature=0.7)
    for neighbour in (SamplingParams(temperature=0.7, top_k=3), SamplingParams(min_p=0.3), SamplingParams()):
        for seed in range(20):
            alone = sample_rows(logits[:1], [SampleRow(plain, (seed, 0))])
            rows = [SampleRow(plain, (seed, 0)), SampleRow(neighbour, (1, 0)),
                    SampleRow(SamplingParams(temperature=0), None)]
            assert sample_rows(logits, rows)[0] == alone[0]


@pytest.mark.parametrize("device", DEVICES)
def test_pending_ids_on_the_device_are_in_row_order(device):
    """Greedy and sampled rows are computed in two groups; `device_ids` (what
    the engine's decode reads) and `ids()` are both in the rows' order."""
    specs = make_rows(17, 300, seed=5)
    assert {p.greedy for p, _, _ in specs} == {True, False}  # both groups present
    logits = torch.randn(17, 300, generator=torch.Generator().manual_seed(1)).to(device) * 4
    streams = [RandomStream.seeded(s) for _, s, _ in specs]
    pending = PendingIds(logits, rows_of(specs, streams))
    assert pending.device_ids.device.type == device
    assert pending.device_ids.tolist() == pending.ids()
    alone = [RandomStream.seeded(s) for _, s, _ in specs]
    assert pending.ids() == [sample_rows(logits[i:i + 1], rows_of(specs[i:i + 1], alone[i:i + 1]))[0]
                             for i in range(17)]
