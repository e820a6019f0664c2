"""The sampler's counter-based random stream: the Philox4x32-10 definition
(Random123's known answers), the PyTorch reference against an independent
pure-Python Philox, the Triton kernel against the reference (under Triton's
interpreter without a GPU: TRITON_INTERPRET is set in conftest.py, on small
shapes), and a session's (seed, counter): how it advances, forks, resets and
travels in snapshots, old-format snapshots included."""

import random
import struct

import pytest
import torch
from textfixtures import model  # noqa: F401 (fixture)

import streamgemma as sg
from streamgemma.sampling import philox
from streamgemma.sampling.philox import RandomStream
from streamgemma.session import snapshot as snapshot_format

DEV = "cuda" if torch.cuda.is_available() else "cpu"
MASK = 0xFFFFFFFF

# Random123, tests/kat_vectors: counter (4 words), key (2 words) -> output (4 words).
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff),
     (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
]


def philox_py(ctr, key):
    """Philox4x32-10 on Python ints, written from the paper (no int64 tricks)."""
    c, (k0, k1) = list(ctr), key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & MASK, (p0 >> 32) ^ c[3] ^ k1, p0 & MASK]
    return c


def word_py(seed, counter, v):
    """The raw word of vocab entry v at (seed, counter), from the definition."""
    out = philox_py((v >> 2, counter & MASK, counter >> 32, 0), (seed & MASK, seed >> 32))
    return out[v & 3]


# Streams at the edges of the 64-bit seed and counter (both halves of each word set).
STREAMS = [(0, 0), (2 ** 64 - 1, 2 ** 64 - 1), (12345, 7), (2 ** 63 + 11, 2 ** 32), (0xDEADBEEF, 2 ** 32 - 1)]


def words_of(streams, device=DEV) -> torch.Tensor:
    return torch.tensor([philox.stream_words(s, c) for s, c in streams], dtype=torch.int64, device=device)


# -- the definition ----------------------------------------------------------------------
@pytest.mark.parametrize("ctr,key,want", KNOWN_ANSWERS)
def test_philox_known_answers(ctr, key, want):
    assert philox_py(ctr, key) == list(want)
    t = [torch.tensor([v], dtype=torch.int64) for v in (*ctr, *key)]
    assert [int(w) for w in philox.philox4x32_10(*t)] == list(want)


def test_int64_mulhilo_equals_the_exact_product():
    rng = random.Random(0)
    values = [0, 1, 2, 0xFFFF, 0x10000, 2 ** 31 - 1, 2 ** 31, MASK] + [rng.getrandbits(32) for _ in range(5000)]
    a = torch.tensor(values, dtype=torch.int64)
    for m in (philox.M0, philox.M1):
        hi, lo = philox._mulhilo(m, a.clone())
        assert hi.tolist() == [(m * v) >> 32 for v in values]
        assert lo.tolist() == [(m * v) & MASK for v in values]


@pytest.mark.parametrize("seed,counter", STREAMS)
def test_reference_words_follow_the_definition(seed, counter):
    vocab = 1003  # not a multiple of 4: the last Philox call is partly used
    got = philox.noise_words(words_of([(seed, counter)], "cpu"), vocab)[0].tolist()
    assert got == [word_py(seed, counter, v) for v in range(vocab)]


def test_uniforms_are_exact_and_inside_the_open_interval():
    w = torch.tensor([0, 511, 512, MASK - 511, MASK], dtype=torch.int64)
    u = ((w >> 9) * 2 + 1).to(torch.float32) * 2.0 ** -24
    assert u.tolist() == [2.0 ** -24, 2.0 ** -24, 3 * 2.0 ** -24, 1 - 2.0 ** -24, 1 - 2.0 ** -24]
    noise = u.log().neg().log()
    assert torch.isfinite(noise).all() and noise[0] > 2.8 and noise[-1] < -16.6


def test_reference_samples_the_argmax_of_logits_minus_noise():
    x = torch.randn(3, 70) * 2
    words = words_of(STREAMS[:3], "cpu")
    temps = torch.tensor([0.5, 1.0, 2.0])
    noise = philox.gumbel_noise(words, 70)
    assert torch.equal(noise[1], philox.gumbel_noise(words[1:2], 70)[0])  # row by row, the same
    want = (x / temps[:, None] - noise).argmax(-1)
    assert torch.equal(philox.gumbel_argmax_reference(x, words, temps), want)


# -- the kernel against the reference ------------------------------------------------------
def kernel():
    from streamgemma.kernels import gumbel_argmax
    return gumbel_argmax


def assert_same_tokens(got, x, words, temps):
    """Under the interpreter the kernel's tokens equal the reference's. Compiled
    on a GPU, tl.log and torch.log may round apart by an ulp: a different
    token is then allowed only where the reference's scores nearly tie."""
    want = philox.gumbel_argmax_reference(x, words, temps)
    if DEV == "cpu":
        assert got.tolist() == want.tolist()
        return
    xs = x if temps is None else x / temps[:, None]
    scores = xs - philox.gumbel_noise(words, x.shape[1])
    for s in (got != want).nonzero().flatten().tolist():
        best, picked = scores[s, want[s]], scores[s, got[s]]
        assert best - picked <= 1e-5 * max(1.0, abs(best.item())), f"row {s}"
    assert (got != want).sum() <= max(1, len(got) // 50)


@pytest.mark.parametrize("block", [16, 64])
def test_kernel_words_equal_the_reference(block):
    words = words_of(STREAMS)
    got = kernel().philox_words(words, 1001, block=block)[:, :1001]
    assert torch.equal(got.cpu(), philox.noise_words(words.cpu(), 1001))
    zero = kernel().philox_words(torch.zeros(1, 4, dtype=torch.int64, device=DEV), 4)
    assert zero[0].tolist() == list(KNOWN_ANSWERS[0][2])  # counter 0, key 0


@pytest.mark.parametrize("block", [32, 256])  # 8 tiles of 128 entries, 1 tile of 1024 (+ a partial one)
def test_kernel_picks_the_reference_tokens(block):
    """Strided rows (a view of the first V columns), mixed temperatures,
    filtered (-inf) entries, ties (+inf entries: the smallest index wins,
    across lanes and tiles) and a row with nothing left (-inf: index 0)."""
    g = torch.Generator().manual_seed(block)
    rows, vocab = 9, 1001
    wide = torch.randn(rows, vocab + 13, generator=g) * 3
    x = wide[:, :vocab]
    x[3, torch.rand(vocab, generator=g) < 0.9] = float("-inf")  # most entries filtered away
    x[4, [700, 5, 6, 513]] = float("inf")  # ties in several lanes and tiles: 5 wins
    x[5, [999, 1000, 900]] = float("inf")  # ties in the last, partial tile
    x[6] = float("-inf")  # nothing left: index 0 (torch.argmax's first maximum)
    x[7, :] = 0.25  # equal logits: the noise decides
    streams = [(random.Random(i).getrandbits(64), i * 3) for i in range(rows)]
    streams[8] = STREAMS[1]
    x, words = x.to(DEV), words_of(streams)
    temps = torch.tensor([0.7, 1.0, 1.3, 0.05, 2.0, 1.0, 0.9, 1.1, 0.31], device=DEV)
    for t in (None, temps):
        got = kernel().gumbel_argmax(x, words, t, block=block)
        assert got.dtype == torch.int64 and got.device == x.device
        assert got[4] == 5 and got[5] == 900 and got[6] == 0
        assert_same_tokens(got, x, words, t)


def test_kernel_row_alone_equals_row_in_batch():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 301, generator=g) * 4).to(DEV)
    words = words_of([(i * 7919, i) for i in range(6)])
    temps = torch.rand(6, generator=g).add(0.3).to(DEV)
    batched = kernel().gumbel_argmax(x, words, temps, block=16)
    alone = [kernel().gumbel_argmax(x[i:i + 1], words[i:i + 1], temps[i:i + 1], block=16).item() for i in range(6)]
    assert batched.tolist() == alone


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_on_cuda_picks_the_cpu_tokens():
    """The same logits and streams on the CPU (reference) and CUDA (kernel):
    the same tokens, up to near-ties that the log's last bit may break apart."""
    from streamgemma.sampling.params import SamplingParams
    from streamgemma.sampling.sampler import SampleRow, sample_rows

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 4099, generator=g) * 3
    kinds = [dict(temperature=1.0), dict(temperature=0.7), dict(temperature=0.0), dict(temperature=1.2, top_k=50)]
    rows = [SampleRow(SamplingParams(**kinds[i % 4]), (i * 104729, i)) for i in range(64)]
    cpu = sample_rows(logits, rows)
    cuda = sample_rows(logits.cuda(), rows)
    assert sum(a != b for a, b in zip(cpu, cuda)) <= 1


# -- a session's stream ---------------------------------------------------------------------
def test_stream_seeds_and_bytes():
    a, b = RandomStream.seeded(None), RandomStream.seeded(None)
    assert a.seed != b.seed and 0 <= a.seed < 2 ** 64 and a.counter == 0
    assert RandomStream.seeded(-1) == RandomStream(2 ** 64 - 1) and RandomStream.seeded(2 ** 64 + 5).seed == 5
    with pytest.raises(TypeError):
        RandomStream.seeded(1.5)
    s = RandomStream(2 ** 64 - 2, 2 ** 40 + 9)
    assert s.to_bytes() == b"PHX1" + struct.pack("<QQ", 2 ** 64 - 2, 2 ** 40 + 9) and len(s.to_bytes()) == 20
    assert RandomStream.from_bytes(s.to_bytes()) == s
    assert s.take() == (2 ** 64 - 2, 2 ** 40 + 9) and s.counter == 2 ** 40 + 10
    with pytest.raises(ValueError, match="20 bytes"):
        RandomStream.from_bytes(s.to_bytes()[:-1])


@pytest.mark.parametrize("other", [torch.Generator().manual_seed(3).get_state().numpy().tobytes(),  # CPU, 5056
                                   bytes(range(16)), b"PHX2" + bytes(16)],
                         ids=["cpu-generator", "cuda-generator", "other-magic"])
def test_anything_but_a_phx1_state_is_refused(other):
    with pytest.raises(ValueError, match="20 bytes starting with"):
        RandomStream.from_bytes(other)


def test_greedy_tokens_leave_the_stream_and_each_sampled_token_advances_it(model):
    s = model.session(seed=5)
    s.feed("the quick brown fox")
    list(s.generate(max_tokens=6, temperature=0, stop_token_ids=[]))
    assert s.state.rng == RandomStream(5, 0)
    list(s.generate(max_tokens=7, top_k=20, stop_token_ids=[]))
    assert s.state.rng == RandomStream(5, 7)
    list(s.generate(max_tokens=3, seed=-2, stop_token_ids=[]))  # restarts the stream at (seed mod 2**64, 0)
    assert s.state.rng == RandomStream(2 ** 64 - 2, 3)
    child = s.fork()
    assert child.state.rng == s.state.rng and child.state.rng is not s.state.rng
    s.reset()  # a seeded session starts its stream over
    assert s.state.rng == RandomStream(5, 0) and child.state.rng == RandomStream(2 ** 64 - 2, 3)
    unseeded = model.session()
    unseeded.feed("hello world")
    list(unseeded.generate(max_tokens=2, stop_token_ids=[]))
    kept = unseeded.state.rng.copy()
    unseeded.reset()  # one without a seed keeps its stream
    assert unseeded.state.rng == kept and kept.counter == 2


def test_snapshots_store_the_stream_and_continue_it(model):
    sampling = dict(temperature=0.8, top_p=0.95, stop_token_ids=[])
    s = model.session(seed=2 ** 64 - 3)
    s.feed("hello world")
    list(s.generate(max_tokens=4, **sampling))
    blob = s.snapshot()
    doc = snapshot_format.decode(blob, model.config, model.fingerprint)
    assert doc.extra["rng"] == b"PHX1" + struct.pack("<QQ", 2 ** 64 - 3, 4)
    restored = model.restore(blob)
    assert restored.state.rng == s.state.rng
    want = [t.id for t in s.generate(max_tokens=12, **sampling)]
    assert [t.id for t in restored.generate(max_tokens=12, **sampling)] == want
    assert restored.state.rng == s.state.rng == RandomStream(2 ** 64 - 3, 16)


@pytest.mark.parametrize("legacy", [torch.Generator().manual_seed(1).get_state().numpy().tobytes(), bytes(16)],
                         ids=["cpu-generator", "cuda-generator"])
def test_a_pre_release_torch_generator_state_is_a_snapshot_error(model, legacy):
    s = model.session(seed=1)
    s.feed("the lazy dog")
    extra = dict(s.state.to_extra(), rng=legacy)
    blob = snapshot_format.encode(model.pool, s.slot, fingerprint=model.fingerprint, extra=extra, seed=1)
    with pytest.raises(sg.SnapshotFormatError, match="sampler state"):
        model.restore(blob)


def test_a_malformed_phx1_state_is_a_snapshot_error(model):
    s = model.session(seed=1)
    s.feed("the lazy dog")
    extra = dict(s.state.to_extra(), rng=b"PHX1" + bytes(15))
    blob = snapshot_format.encode(model.pool, s.slot, fingerprint=model.fingerprint, extra=extra, seed=1)
    with pytest.raises(sg.SnapshotFormatError, match="sampler state is 20 bytes"):
        model.restore(blob)
