"""The sampler's random numbers: a counter-based stream per session.

A session's stream is a pair (seed, counter), both in [0, 2**64). The noise
for one token is a pure function of (seed, counter, vocab entry), so

- every row of a batch gets its noise from ONE kernel launch (no per-session
  generator object to call), on any device;
- the stream's state is 16 bytes, saved in snapshots as is (`to_bytes`) and
  the same on every device.

The definition (part of the snapshot contract, docs/snapshot-format.md):

    Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
    3", SC 2011; the Random123 reference) with
        key     = (seed & 0xffffffff, seed >> 32)
        counter = (v >> 2, counter & 0xffffffff, counter >> 32, 0)
    gives four 32-bit words; vocab entry v uses word number (v & 3), w, and
        u = (2 * (w >> 9) + 1) * 2**-24        (exact in float32, in (0, 1))
        noise[v] = log(-log(u))                 (float32)
    and the sampled token is the smallest index v maximising
        x[v] - noise[v]                         (float32)
    where x is the row's logits after penalties, temperature (x / T, a
    correctly rounded float32 division) and filters.

That is the Gumbel-max trick: -log(u) ~ Exp(1), -log(-log(u)) ~ Gumbel(0, 1),
and argmax(x + Gumbel) is a draw from softmax(x). A sampled token uses the
row's (seed, counter) and then the stream advances its counter by exactly 1;
a greedy token uses and advances nothing.

This module is the pure-PyTorch reference (int64 arithmetic, any device) and
the CPU path; `streamgemma.kernels.gumbel_argmax` computes the same on CUDA
in one launch for all rows and is tested against it."""

from __future__ import annotations

import dataclasses
import operator
import secrets
import struct

import torch

# Philox4x32 constants (Random123: PHILOX_M4x32_0/1, PHILOX_W32_0/1).
M0 = 0xD2511F53
M1 = 0xCD9E8D57
W0 = 0x9E3779B9
W1 = 0xBB67AE85
ROUNDS = 10

MASK32 = 0xFFFFFFFF
SEED_MODULUS = 2 ** 64

STATE_MAGIC = b"PHX1"
STATE_BYTES = 20  # magic + seed (u64 LE) + counter (u64 LE)


# -- the stream's state ---------------------------------------------------------------
@dataclasses.dataclass
class RandomStream:
    """One session's random stream: `seed` and `counter` in [0, 2**64) (the
    counter is the number of sampled tokens drawn since the stream was seeded). Mutable:
    `take()` hands out the current (seed, counter) and advances the counter."""

    seed: int
    counter: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.seed < SEED_MODULUS:
            raise ValueError(f"a stream's seed must be in [0, 2**64), got {self.seed}")
        if not 0 <= self.counter < SEED_MODULUS:
            raise ValueError(f"a stream's counter must be in [0, 2**64), got {self.counter}")

    @classmethod
    def seeded(cls, seed: int | None) -> RandomStream:
        """A stream at counter 0. seed: any int, reduced mod 2**64 (so -1 and
        2**64 - 1 are one seed, as torch.manual_seed had it); None: 64 bits from
        the OS's entropy (`secrets`). TypeError for a seed that is not an int."""
        return cls(secrets.randbits(64) if seed is None else operator.index(seed) % SEED_MODULUS, 0)

    def take(self) -> tuple[int, int]:
        """(seed, counter) for one sampled token; the counter then advances by 1."""
        if self.counter >= SEED_MODULUS - 1:  # (only a hand-made snapshot starts this close to the end)
            raise ValueError("the random stream is used up: its counter is at 2**64 - 1")
        out = (self.seed, self.counter)
        self.counter += 1
        return out

    def copy(self) -> RandomStream:
        return RandomStream(self.seed, self.counter)

    def to_bytes(self) -> bytes:
        """b"PHX1" + seed (u64 little-endian) + counter (u64 little-endian): 20
        bytes, the snapshot's `extra.rng`."""
        return STATE_MAGIC + struct.pack("<QQ", self.seed, self.counter)

    @classmethod
    def from_bytes(cls, data: bytes) -> RandomStream:
        """Inverse of `to_bytes`; ValueError for anything else."""
        data = bytes(data)
        if not data.startswith(STATE_MAGIC) or len(data) != STATE_BYTES:
            raise ValueError(f"a sampler state is {STATE_BYTES} bytes starting with {STATE_MAGIC!r}, "
                             f"got {len(data)} bytes starting with {data[:4]!r}")
        seed, counter = struct.unpack("<QQ", data[len(STATE_MAGIC):])
        return cls(seed, counter)


def stream_words(seed: int, counter: int) -> tuple[int, int, int, int]:
    """The per-row inputs of the noise: (key0, key1, counter1, counter2), each
    in [0, 2**32) (counter word 0 is the vocab entry's v >> 2, word 3 is 0).
    ValueError unless seed and counter are in [0, 2**64)."""
    if not (0 <= seed < SEED_MODULUS and 0 <= counter < SEED_MODULUS):
        raise ValueError(f"a random stream's seed and counter must be in [0, 2**64), got ({seed}, {counter})")
    return seed & MASK32, seed >> 32, counter & MASK32, counter >> 32


# -- Philox4x32-10 in int64 arithmetic --------------------------------------------------
def _mulhilo(m: int, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product m * a, for a constant m and
    int64 a with values in [0, 2**32). The product can reach 2**64, past
    int64, so m is split into 16-bit halves: every partial product stays
    below 2**49."""
    m_hi, m_lo = m >> 16, m & 0xFFFF
    p_lo = a * m_lo                    # < 2**48
    t = a * m_hi
    t += p_lo >> 16                    # m * a = t * 2**16 + (p_lo & 0xffff); t < 2**49
    # In place where the tensors are private: a third less time on the CPU
    # (the passes over [rows, vocab / 4] int64 are the cost).
    lo = (t & 0xFFFF).bitwise_left_shift_(16)
    lo |= p_lo.bitwise_and_(0xFFFF)
    return t.bitwise_right_shift_(16), lo


def philox4x32_10(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
                  k0: torch.Tensor, k1: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1), elementwise.

    Inputs: int64 tensors (broadcastable to one shape, one device) with values
    in [0, 2**32). Returns the four output words as int64 tensors of the
    broadcast shape, values in [0, 2**32). Random123's known answer:
    counter 0, key 0 -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8."""
    for r in range(ROUNDS):
        if r:  # the key is bumped between rounds (after the last one it is not needed)
            k0 = (k0 + W0) & MASK32
            k1 = (k1 + W1) & MASK32
        hi0, lo0 = _mulhilo(M0, c0)
        hi1, lo1 = _mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def noise_words(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """The raw 32-bit word of every vocab entry of every row: int64 [S, vocab]
    (values in [0, 2**32)) on words' device. words: int64 [S, 4] rows of
    `stream_words` (key0, key1, counter1, counter2)."""
    calls = -(-vocab // 4)  # one Philox call serves v = 4j .. 4j + 3
    j = torch.arange(calls, dtype=torch.int64, device=words.device)[None, :]
    k0, k1, c1, c2 = (words[:, i:i + 1] for i in range(4))
    out = philox4x32_10(j, c1, c2, torch.zeros_like(j), k0, k1)
    out = [w.expand(words.shape[0], calls) for w in out]  # rows that only broadcast so far
    return torch.stack(out, dim=-1).reshape(words.shape[0], 4 * calls)[:, :vocab]


def gumbel_noise(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """noise[s, v] = log(-log(u)) (float32 [S, vocab]) for the rows' streams:
    the value `gumbel_argmax` subtracts from the scaled logits."""
    w = noise_words(words, vocab)
    u = ((w >> 9) * 2 + 1).to(torch.float32) * 2.0 ** -24  # exact: < 2**24 times a power of two
    return u.log_().neg_().log_()


# Philox calls (per row: vocab / 4) worked on at once by the reference: bounds its
# int64 temporaries (a dozen [rows, calls] tensors, 512 kB each) whatever the batch: cache-sized
# pieces measured fastest on a CPU (V = 256,000: one row at a time).
_REFERENCE_CALLS = 1 << 16


def gumbel_argmax_reference(x: torch.Tensor, words: torch.Tensor, temps: torch.Tensor | None = None) -> torch.Tensor:
    """The sampled token of every row: argmax over v of (x[s, v] / temps[s] -
    noise[s, v]), the smallest v on ties. The reference of
    `streamgemma.kernels.gumbel_argmax.gumbel_argmax` and the path where it
    does not run (CPU).

    x: float32 [S, V] (any strides); words: int64 [S, 4] (`stream_words` of
    each row's (seed, counter)); temps: float32 [S] or None (no division).
    All on one device. Returns int64 [S] on that device. Row s's id depends
    only on row s's inputs."""
    rows, vocab = x.shape
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows == 0:
        return out
    step = max(1, _REFERENCE_CALLS // max(1, -(-vocab // 4)))
    for a in range(0, rows, step):
        b = min(rows, a + step)
        xs = x[a:b] if temps is None else x[a:b] / temps[a:b, None]
        noise = gumbel_noise(words[a:b], vocab)
        score = torch.sub(xs, noise, out=noise)
        out[a:b] = score.argmax(dim=-1)  # torch.argmax: the first maximal index
    return out
