"""The sort-based sampler that `sampler.sample_rows` replaced, kept as the test
reference of the filters' definition (tests/test_sampling_filters.py): each
row on its own, float32 softmax, a full stable sort and a cumulative sum for
top_p, exactly as streamgemma sampled before the sort-free path.

Not used by the library. Where a token's float32 mass-before lies within
rounding of top_p, this float32 arithmetic and the exact arithmetic of
`filters` may disagree on that one token (see `filters`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .philox import gumbel_argmax_reference, stream_words
from .sampler import SampleRow


def penalize_reference(x: torch.Tensor, recent: torch.Tensor | None, repetition: float,
                       presence: float) -> torch.Tensor:
    """x: float32 [V]; recent: int64 ids (those >= V ignored, repeats count once)."""
    if recent is None or recent.numel() == 0:
        return x
    vocab = x.shape[0]
    seen = torch.zeros(vocab + 1, dtype=torch.bool).scatter_(0, recent.clamp_max(vocab), True)[:vocab]
    seen = seen.to(x.device)
    x = torch.where(seen, torch.where(x > 0, x / repetition, x * repetition), x)
    return x - seen.to(x.dtype) * presence


def filter_reference(x: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """The kept logits of one row of scaled logits x (float32 [V]); dropped ones are -inf."""
    vocab = x.shape[0]
    if 0 < top_k < vocab:
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, -math.inf)
    if top_p < 1.0:
        probs = torch.softmax(x, dim=-1)
        sorted_probs, order = torch.sort(probs, descending=True, stable=True)
        # Keep a token if the mass before it is below top_p: the top token always stays.
        drop_sorted = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= torch.tensor(top_p, dtype=torch.float32)
        x = x.masked_fill(torch.empty_like(drop_sorted).scatter_(0, order, drop_sorted), -math.inf)
    if min_p > 0.0:
        floor = x.amax() + torch.tensor(math.log(min_p), dtype=torch.float32)
        x = x.masked_fill(x < floor, -math.inf)
    return x


def sample_rows_reference(logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[int]:
    """`sampler.sample_rows` as it was: penalties, greedy argmax or x / T, the
    filters above, then the Gumbel-max draw of `philox` (same noise)."""
    out = []
    for x, row in zip(logits, rows):
        p = row.params
        x = penalize_reference(x.float(), row.recent, p.repetition_penalty, p.presence_penalty)
        if p.greedy:
            out.append(int(x.argmax()))
            continue
        x = x / torch.tensor(p.temperature, dtype=torch.float32)
        x = filter_reference(x, p.top_k, p.top_p, p.min_p)
        words = torch.tensor([stream_words(*row.rng)], dtype=torch.int64, device=x.device)
        out.append(int(gumbel_argmax_reference(x[None], words)[0]))
    return out
