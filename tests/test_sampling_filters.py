"""Top-k / top-p / min-p without a sort: the definition (`filters.keep_mask`)
against the sort-based sampler it replaced (`sampler_ref`), the kernels
against the definition (under the interpreter on CPU), penalties, and the
sampled frequencies against the truncated distribution."""

import math
import random

import pytest
import torch
from conftest import compile_for_sm90

import streamgemma as sg
from streamgemma.sampling import filters
from streamgemma.sampling.params import SamplingParams
from streamgemma.sampling.philox import gumbel_argmax_reference
from streamgemma.sampling.sampler import SampleRow, apply_penalties, sample_rows
from streamgemma.sampling.sampler_ref import filter_reference, penalize_reference, sample_rows_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
INF = math.inf


def random_row(rng: random.Random, g: torch.Generator, vocab: int) -> torch.Tensor:
    """Logits with the cases that matter: ties (rounded values, equal rows),
    -inf entries, all -inf, a peaked or a flat distribution."""
    x = torch.randn(vocab, generator=g) * rng.choice([0.3, 1.0, 3.0, 8.0])
    shape = rng.random()
    if shape < 0.25:
        x = (x * 2).round() / 2  # many ties
    elif shape < 0.3:
        x[:] = rng.choice([0.0, -0.0, 1.5])  # every token tied (0.0 and -0.0 are one value)
    if rng.random() < 0.15:
        x[torch.rand(vocab, generator=g) < 0.6] = -INF
    if rng.random() < 0.03:
        x[:] = -INF
    return x


def random_filters(rng: random.Random, vocab: int) -> tuple[int, float, float]:
    top_k = rng.choice([0, 0, 1, 2, 5, 40, vocab - 1, vocab, vocab + 7])
    top_p = rng.choice([1.0, 1.0, 0.95, 0.9, 0.5, 0.999, 1e-6, 0.3])
    min_p = rng.choice([0.0, 0.0, 0.05, 0.3, 1e-9, 0.999])
    return top_k, top_p, min_p


def filter_tensors(specs, vocab, device="cpu"):
    k = torch.tensor([t if 0 < t < vocab else 0 for t, _, _ in specs], dtype=torch.int64, device=device)
    p = torch.tensor([q for _, q, _ in specs], dtype=torch.float32, device=device)
    lmp = torch.tensor([math.log(m) if m > 0 else -INF for _, _, m in specs], dtype=torch.float32, device=device)
    return k, p, lmp


def exact_mass_before(x: torch.Tensor, top_k: int) -> torch.Tensor:
    """Each token's probability mass before it (order of x descending, ties by
    id), in float64, over the top_k-kept tokens: the quantity top_p compares."""
    vocab = x.shape[0]
    if 0 < top_k < vocab:
        x = x.masked_fill(x < torch.topk(x, top_k).values[-1], -INF)
    probs = torch.softmax(x.double(), dim=0)
    order = torch.sort(filters.sortable_keys(x), descending=True, stable=True).indices
    before = torch.empty_like(probs)
    before[order] = probs[order].cumsum(0) - probs[order]
    return before


def test_keep_mask_is_the_sort_based_kept_set():
    """The exact (integer-mass) definition keeps the same tokens as the float32
    sort-based filters over many random rows and settings, ties and -inf rows
    included (a row of only -inf keeps everything in both; its token is 0).
    They may differ only on a token whose exact mass-before is top_p up to
    float32 rounding (e.g. 50 tied tokens and top_p 0.5: the reference's
    float32 0.02 is 0.0199999996, so it keeps a 26th token whose exact
    mass-before is 0.5, not below it); such rows are rare."""
    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    boundary_rows = 0
    for vocab in (3, 50, 257, 1001):
        rows = [random_row(rng, g, vocab) for _ in range(150)]
        specs = [random_filters(rng, vocab) for _ in rows]
        got = filters.keep_mask(torch.stack(rows), *filter_tensors(specs, vocab))
        for i, (x, (k, p, m)) in enumerate(zip(rows, specs)):
            want = filter_reference(x, k, p, m) > -INF
            finite = x > -INF
            if not finite.any():
                assert got[i].all()
                continue
            differ = (got[i] & finite) != want
            if differ.any():
                boundary_rows += 1
                near = (exact_mass_before(x, k)[differ] - p).abs() <= 1e-6
                assert near.all(), (vocab, i, k, p, m, differ.nonzero().flatten().tolist())
    assert boundary_rows <= 3


def test_keep_mask_edges():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, -INF, 3.0]])
    k, p, lmp = filter_tensors([(2, 1.0, 0.0)], 6)
    assert filters.keep_mask(x, k, p, lmp).tolist() == [[False, True, True, False, False, True]]  # ties with the 2nd
    # Three tied tokens of mass ~1/3 each, top_p 0.5: the two smallest ids stay.
    x = torch.tensor([[0.0, 5.0, 5.0, -INF, 5.0]])
    k, p, lmp = filter_tensors([(0, 0.5, 0.0)], 5)
    assert filters.keep_mask(x, k, p, lmp).tolist() == [[False, True, True, False, False]]
    k, p, lmp = filter_tensors([(0, 1e-9, 0.0)], 5)  # the top token always stays
    assert filters.keep_mask(x, k, p, lmp).tolist() == [[False, True, False, False, False]]
    # min_p 0.999 keeps exactly the maximum's ties; keys see 0.0 and -0.0 as one value.
    x = torch.tensor([[0.0, -0.0, -1.0]])
    k, p, lmp = filter_tensors([(1, 0.999, 0.999)], 3)
    assert filters.keep_mask(x, k, p, lmp).tolist() == [[True, True, False]]


@pytest.mark.parametrize("device", DEVICES)
def test_sample_rows_gives_the_reference_tokens(device):
    """Same seeds, same tokens as the sort-based sampler: penalties, greedy and
    sampled rows, every filter mix, one batch and each row alone. On CUDA the
    kernels' log may round apart from torch's by an ulp: a near tie may then
    go the other way (as for the unfiltered kernel)."""
    g = torch.Generator().manual_seed(1)
    rng = random.Random(1)
    vocab, batch = 300, 48
    logits = torch.stack([random_row(rng, g, vocab) for _ in range(batch)])
    rows = []
    for i in range(batch):
        top_k, top_p, min_p = random_filters(rng, vocab)
        params = SamplingParams(temperature=rng.choice([0.0, 0.5, 1.0, 1.7]), top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=rng.choice([1.0, 1.3, 0.8]), presence_penalty=rng.choice([0.0, 0.4]))
        recent = torch.tensor([rng.randrange(vocab + 20) for _ in range(rng.randrange(0, 30))], dtype=torch.int64)
        rows.append(SampleRow(params, None if params.greedy else (rng.getrandbits(64), i), recent))
    want = sample_rows_reference(logits, rows)
    batched = sample_rows(logits.to(device), rows)
    alone = [sample_rows(logits[i:i + 1].to(device), rows[i:i + 1])[0] for i in range(batch)]
    assert batched == alone
    differ = sum(a != b for a, b in zip(batched, want))
    assert differ == 0 if device == "cpu" else differ <= 1


def test_penalties_equal_the_reference():
    g = torch.Generator().manual_seed(2)
    rng = random.Random(2)
    for _ in range(40):
        vocab = rng.choice([5, 64, 300])
        x = torch.randn(vocab, generator=g) * 3
        x[rng.randrange(vocab)] = 0.0
        recent = torch.tensor([rng.randrange(vocab + 5) for _ in range(rng.randrange(0, 40))], dtype=torch.int64)
        rep, pres = rng.choice([1.0, 1.5, 0.7]), rng.choice([0.0, 0.5, -0.3])
        assert torch.equal(apply_penalties(x, recent, rep, pres), penalize_reference(x, recent, rep, pres))


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_frequencies_follow_the_truncated_distribution(device):
    """4,000 draws (consecutive counters of one stream) against the filtered,
    renormalised distribution: within 4.5 standard deviations per token."""
    probs = torch.tensor([0.30, 0.22, 0.18, 0.12, 0.08, 0.06, 0.04])
    logits = probs.log()
    cases = [(SamplingParams(top_k=3), [0, 1, 2]),
             (SamplingParams(top_p=0.75), [0, 1, 2, 3]),  # mass before token 3 is 0.70 < 0.75
             (SamplingParams(min_p=0.25), [0, 1, 2, 3, 4]),  # 0.08 >= 0.25 x 0.30
             (SamplingParams(temperature=0.5, top_k=5, top_p=0.9), None)]
    n = 4000
    for params, kept in cases:
        scaled = torch.softmax(logits / params.temperature, dim=0)
        if kept is None:  # T 0.5 sharpens: [0.41, 0.22, 0.15, 0.06, 0.03, ...]; 0.9 needs 4, top_k allows 5
            order = scaled.argsort(descending=True)
            mass_before = scaled[order].cumsum(0) - scaled[order]
            kept = sorted(order[(mass_before < 0.9)][:5].tolist())
        want = torch.zeros(7)
        want[kept] = scaled[kept] / scaled[kept].sum()
        rows = [SampleRow(params, (12345, c)) for c in range(n)]
        draws = torch.tensor(sample_rows(logits.expand(n, 7).to(device), rows))
        freq = torch.bincount(draws, minlength=7).float() / n
        assert set(draws.tolist()) <= set(kept)
        sd = (want * (1 - want) / n).sqrt()
        assert ((freq - want).abs() <= 4.5 * sd + 1e-9).all(), (params, freq.tolist(), want.tolist())


# -- the kernels against the definition ------------------------------------------------------
def kernel():
    from streamgemma.kernels.sampling_filters import filtered_gumbel_argmax
    return filtered_gumbel_argmax


def draw_definition(x, words, temps, k, p, lmp):
    xs = x if temps is None else x / temps[:, None]
    keep = filters.keep_mask(xs, k, p, lmp)
    return gumbel_argmax_reference(xs.masked_fill(~keep, -INF), words)


@pytest.mark.parametrize("tile,replicas,group", [(32, 3, 1), (64, 1, 1), (16, 2, 3)])
def test_kernels_draw_the_definitions_tokens(tile, replicas, group):
    """Under the interpreter the kernels' tokens equal the PyTorch form's, for
    several tiles per row (tile maxima, tie counts across tiles), replicated
    first-digit histograms, several tiles per program (the last group
    partial), strided rows and every filter mix."""
    g = torch.Generator().manual_seed(tile)
    rng = random.Random(tile)
    vocab, batch = 173, 8
    dev = DEVICES[-1]
    wide = torch.stack([random_row(rng, g, vocab + 3) for _ in range(batch)])
    x = wide[:, :vocab]
    specs = [random_filters(rng, vocab) for _ in range(batch)]
    specs[0], specs[1] = (3, 0.6, 0.0), (0, 0.5, 0.05)
    x[1] = 0.75  # all tied: top_p 0.5 keeps the first half by id
    words = torch.tensor([[rng.getrandbits(32) for _ in range(4)] for _ in range(batch)], dtype=torch.int64)
    temps = torch.rand(batch, generator=g) + 0.4
    for t in (None, temps):
        k, p, lmp = filter_tensors(specs, vocab)
        want = draw_definition(x, words, t, k, p, lmp)
        got = kernel()(x.to(dev), words.to(dev), None if t is None else t.to(dev), k.to(dev), p.to(dev), lmp.to(dev),
                       tile=tile, replicas=replicas, group=group)
        assert got.cpu().tolist() == want.tolist()
    assert want[1] < math.ceil(vocab / 2)


def test_kernel_rows_alone_equal_rows_in_a_batch_and_searches_can_be_skipped():
    g = torch.Generator().manual_seed(5)
    rng = random.Random(5)
    vocab, batch = 97, 5
    dev = DEVICES[-1]
    x = torch.stack([random_row(rng, g, vocab) for _ in range(batch)]).to(dev)
    words = torch.randint(0, 2 ** 32, (batch, 4), generator=g).to(dev)
    specs = [(5, 1.0, 0.0), (0, 0.8, 0.0), (0, 1.0, 0.1), (7, 0.9, 0.02), (0, 1.0, 0.0)]
    k, p, lmp = filter_tensors(specs, vocab, dev)
    batched = kernel()(x, words, None, k, p, lmp, tile=32)
    alone = [kernel()(x[i:i + 1], words[i:i + 1], None, k[i:i + 1], p[i:i + 1], lmp[i:i + 1], tile=32).item()
             for i in range(batch)]
    assert batched.tolist() == alone
    # A batch with no top_p row need not run the top_p search (likewise top_k).
    only_k = kernel()(x[:1], words[:1], None, k[:1], p[:1], lmp[:1], tile=32, has_top_p=False)
    only_p = kernel()(x[1:2], words[1:2], None, k[1:2], p[1:2], lmp[1:2], tile=32, has_top_k=False)
    assert [only_k.item(), only_p.item()] == alone[:2]


def small_k_kernel():
    from streamgemma.kernels.filter_smallk import small_k_gumbel_argmax
    return small_k_gumbel_argmax


def candidates(x: torch.Tensor, k: torch.Tensor, tile: int) -> list[int]:
    """Per row, the finite entries >= the k-th largest tile maximum: the
    small-top_k path's candidates (a row with more than its slots overflows)."""
    rows, vocab = x.shape
    pad = torch.full((rows, -vocab % tile), -INF)
    maxima = torch.cat([x, pad], dim=1).view(rows, -1, tile).amax(dim=-1)
    out = []
    for i in range(rows):
        n_tiles = maxima.shape[1]
        tau = maxima[i].sort(descending=True).values[k[i] - 1] if k[i] <= n_tiles else -INF
        out.append(int(((x[i] >= tau) & (x[i] > -INF)).sum()))
    return out


@pytest.mark.parametrize("cap", [256, 8])
def test_small_k_path_draws_the_definitions_tokens(cap):
    """The small-top_k path (compaction of the entries >= tau, one finishing
    program per row) draws the definition's tokens under the interpreter:
    ties at the k-th value and at the top_p boundary, k = 1, k above the
    tile count, top_p 1 and tiny, min_p edges, rows of -inf and all tied;
    cap 8 sends most rows through the exact whole-row fallback."""
    g = torch.Generator().manual_seed(11 + cap)
    rng = random.Random(11 + cap)
    vocab, batch, tile = 173, 10, 32
    dev = DEVICES[-1]
    x = torch.stack([random_row(rng, g, vocab) for _ in range(batch)])
    specs = [(rng.choice([1, 2, 5, 7, 40, 100]), rng.choice([1.0, 0.95, 0.5, 1e-6, 0.999]),
              rng.choice([0.0, 0.05, 0.999])) for _ in range(batch)]
    specs[0], specs[1], specs[2], specs[3] = (3, 0.6, 0.0), (40, 0.5, 0.0), (1, 1.0, 0.0), (60, 0.3, 0.0)
    x[1] = 0.75  # all tied: top_k keeps all, top_p 0.5 the first half by id
    x[2] = -INF  # the reference's token: 0
    x[3] = (x[3] * 2).round() / 2  # ties at the k-th value and the boundary
    words = torch.tensor([[rng.getrandbits(32) for _ in range(4)] for _ in range(batch)], dtype=torch.int64)
    temps = torch.rand(batch, generator=g) + 0.4
    k, p, lmp = filter_tensors(specs, vocab)
    overflow = [n > cap for n in candidates(x / temps[:, None], k, tile)]
    assert (any(overflow) and not all(overflow)) if cap == 8 else not any(overflow)
    want = draw_definition(x, words, temps, k, p, lmp)
    got = small_k_kernel()(x.to(dev), words.to(dev), temps.to(dev), k.to(dev), p.to(dev), lmp.to(dev),
                           tile=tile, cap=cap)
    assert got.cpu().tolist() == want.tolist()
    assert want[2] == 0 and want[1] < math.ceil(vocab / 2)
    alone = [small_k_kernel()(x[i:i + 1].to(dev), words[i:i + 1].to(dev), None, k[i:i + 1].to(dev),
                              p[i:i + 1].to(dev), lmp[i:i + 1].to(dev), tile=tile, cap=cap).item() for i in (0, 3)]
    assert alone == draw_definition(x[[0, 3]], words[[0, 3]], None, k[[0, 3]], p[[0, 3]], lmp[[0, 3]]).tolist()


SMALL_K_FOR_SM90 = """
from streamgemma.kernels import filter_smallk as fs

rows = dict(x_ptr="*fp32", stride="i32", temps_ptr="*fp32", state_ptr="*i64", count_ptr="*i32", cand_ptr="*i64",
            V="i32")
compiled(fs._compact_kernel, dict(rows, tile_max_ptr="*fp32", n_tiles="i32"),
         dict(CAP=512, HAS_TEMP=True, TILE=512, GROUP=1), 4)
finish = dict(rows, words_ptr="*i64", top_k_ptr="*i64", top_p_ptr="*fp32", row_max_ptr="*fp32", out_ptr="*i64",
              scale="fp32")
for cap, warps in ((512, 4), (2048, 8)):
    compiled(fs._finish_kernel, finish, dict(CAP=cap, HAS_TEMP=False, TILE=512), warps)
"""


@pytest.mark.slow
def test_the_small_k_kernels_compile_for_the_gpu():
    """The interpreter accepts programs the compiler refuses: the compaction
    and the finishing program (sort, draw, whole-row fallback) compiled for
    sm_90 with Triton's own ptxas in a child without the interpreter."""
    compile_for_sm90(SMALL_K_FOR_SM90)


def test_the_small_k_path_serves_small_batches_whose_rows_all_have_a_small_top_k():
    assert [filters.small_k_slots(k) for k in ([40], [1, 64], [100], [256] * 16)] == [512, 512, 1024, 2048]
    assert [filters.small_k_slots(k) for k in ([], [0, 40], [257], [40] * 17)] == [0, 0, 0, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernels_on_cuda_keep_the_cpu_set_at_2b_vocabulary():
    """256,000-token rows on the GPU: the compiled kernels draw the CPU
    definition's tokens (up to an ulp of log at near ties)."""
    g = torch.Generator().manual_seed(7)
    vocab, batch = 256000, 12
    x = (torch.randn(batch, vocab, generator=g) * 1.0).to(torch.bfloat16).float()  # bf16 logits: many ties
    words = torch.randint(0, 2 ** 32, (batch, 4), generator=g)
    specs = [(40, 0.95, 0.0), (0, 0.95, 0.0), (0, 1.0, 0.05), (40, 1.0, 0.0), (1000, 0.5, 0.0), (0, 0.999, 0.0),
             (3, 0.9, 0.1), (0, 0.2, 0.0), (50000, 0.97, 0.0), (0, 1.0, 0.5), (10, 0.3, 0.0), (0, 0.99, 1e-4)]
    k, p, lmp = filter_tensors(specs, vocab)
    temps = torch.full((batch,), 0.8)
    want = draw_definition(x, words, temps, k, p, lmp)
    got = kernel()(x.cuda(), words.cuda(), temps.cuda(), k.cuda(), p.cuda(), lmp.cuda()).cpu()
    assert (got != want).sum() <= 1, (got.tolist(), want.tolist())
    on = (k > 0) & (k <= 256)  # the small-top_k path, over the rows it serves
    small = small_k_kernel()(x[on].cuda(), words[on].cuda(), temps[on].cuda(), k[on].cuda(), p[on].cuda(),
                             lmp[on].cuda()).cpu()
    assert (small != want[on]).sum() <= 1, (small.tolist(), want[on].tolist())
    flat = torch.zeros(2, vocab)  # 256,000 tied tokens: overflow, the whole-row path
    flat_k, flat_p, flat_lmp = filter_tensors([(40, 0.95, 0.0), (3, 1.0, 0.0)], vocab)
    got = small_k_kernel()(flat.cuda(), words[:2].cuda(), None, flat_k.cuda(), flat_p.cuda(), flat_lmp.cuda())
    assert got.tolist() == draw_definition(flat, words[:2], None, flat_k, flat_p, flat_lmp).tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_filter_graphs_replay_the_eager_tokens():
    """CUDA graphs of the filters: the eager kernels' tokens on every call, as
    logits, streams and settings change under a recurring address; a new
    address runs eagerly once, then is captured; at most max_graphs are kept."""
    from streamgemma.sampling.graphs import FilterGraphs

    g = torch.Generator(device="cuda").manual_seed(3)
    rng = random.Random(3)
    vocab, batch = 256000, 6
    from streamgemma.kernels.filter_smallk import filtered_draw

    graphs = FilterGraphs(filtered_draw, max_graphs=3)
    wide = torch.empty(batch, vocab + 64, device="cuda")
    x = wide[:, :vocab]  # strided, as the engine's logits sliced to the tokenizer's vocabulary
    for call in range(5):
        x.normal_(generator=g)
        words = torch.randint(0, 2 ** 32, (batch, 4), device="cuda", generator=g)
        temps = torch.rand(batch, device="cuda", generator=g) + 0.5
        specs = [(rng.choice([0, 1, 40, 999]), rng.choice([1.0, 0.95, 0.5]), rng.choice([0.0, 0.05]))
                 for _ in range(batch)]
        specs[0] = (40, 0.9, 0.0)  # some row has each filter: one graph key throughout
        k, p, lmp = filter_tensors(specs, vocab, "cuda")
        want = kernel()(x, words, temps, k, p, lmp)
        got = graphs(x, words, temps, k, p, lmp, has_top_k=True, has_top_p=True)
        assert got.tolist() == want.tolist(), call
    assert graphs.captures == 1 and len(graphs) == 1
    for _ in range(3):  # temporaries (a new tensor per call) are staged: copied into the graph's own buffer
        fresh = x + torch.rand(batch, 1, device="cuda", generator=g)
        want = kernel()(fresh, words, temps, k, p, lmp)
        assert graphs(fresh, words, temps, k, p, lmp, has_top_k=True, has_top_p=True, staged=True).tolist() \
            == want.tolist()
    assert graphs.captures == 2 and len(graphs) == 2
    other = wide.clone()[:, :vocab]
    for _ in range(2):
        graphs(other, words, temps, k, p, lmp, has_top_k=True, has_top_p=True)
    graphs(other, words, None, k, p, lmp, has_top_k=True, has_top_p=True)
    graphs(other, words, None, k, p, lmp, has_top_k=True, has_top_p=True)
    assert graphs.captures == 4 and len(graphs) == 3
    k = torch.tensor([40, 1, 256, 7, 40, 2], device="cuda")  # the small-top_k path, captured too
    for call in range(3):
        x.normal_(generator=g)
        want = kernel()(x, words, temps, k, p, lmp)
        assert graphs(x, words, temps, k, p, lmp, has_top_k=True, has_top_p=True, small_k=512).tolist() \
            == want.tolist(), call
    assert graphs.captures == 5


def test_models_off_cuda_have_no_filter_graphs():
    model = sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0, device="cpu", dtype="float32")
    assert model.sampling_graphs is None


@pytest.mark.parametrize("block", [16, 64, 4096])
def test_the_penalty_kernel_equals_the_definition_bit_for_bit(block):
    """One launch (under the interpreter on CPU) gives the values of the
    PyTorch penalties: repeats, ids past the vocabulary (padding), ids at tile
    edges, -inf and signed values, strided rows, rows without any id."""
    from streamgemma.kernels.penalties import penalize
    from streamgemma.sampling.sampler import _penalize, _penalty_ids

    g = torch.Generator().manual_seed(block)
    rng = random.Random(block)
    vocab, rows = 301, 6
    wide = torch.randn(rows, vocab + 5, generator=g) * 3
    wide[2, :40] = -INF
    x = wide[:, :vocab]
    sizes = [rng.choice([1, 7, 60, 700]) for _ in range(rows)]
    recents = [torch.tensor([rng.randrange(vocab + 9) for _ in range(n)]) for n in sizes]
    recents[0] = torch.tensor([0, 15, 16, 63, 64, 300, 300, 0])
    recents[4] = torch.tensor([vocab + 1, vocab + 3])  # nothing to penalize
    recents[5] = None
    ids = _penalty_ids(recents, vocab)
    factors = torch.tensor([[rng.choice([1.0, 1.1, 0.7, 1.3]), rng.choice([0.0, 0.4, -0.25])] for _ in range(rows)])
    want = _penalize(x, ids, factors[:, 0:1], factors[:, 1:2])
    got = penalize(x.to(DEVICES[-1]), ids.to(DEVICES[-1]), factors.to(DEVICES[-1]), block=block).cpu()
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert not torch.equal(got[0], x[0]) and torch.equal(got[4], x[4]) and torch.equal(got[5], x[5])


def test_the_penalty_kernel_compiles_once_as_the_window_grows(monkeypatch):
    """The recent-id window grows token by token up to 1,024: a compile-time
    argument that followed its width compiled a new kernel mid-generation (a
    stall of the whole stream at each power of two)."""
    from streamgemma.kernels import penalties

    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **constexprs: launches.append(constexprs)

    monkeypatch.setattr(penalties, "_penalize_kernel", Recorder())
    x = torch.zeros(1, 300)
    for width in (1, 17, 300, 1024):
        penalties.penalize(x, torch.zeros(1, width, dtype=torch.int64), torch.ones(1, 2))
    assert len(launches) == 4 and all(c == launches[0] for c in launches)
