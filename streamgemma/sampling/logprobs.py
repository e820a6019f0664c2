"""Log-probabilities of sampled tokens (opt-in: `SamplingParams.logprobs`).

Definition: a token's logprob is the natural log of its probability under
the distribution it was actually drawn from, the one `sample_rows` samples:
the row's logits after the penalties, divided by the temperature, with the
tokens that top_k / top_p / min_p drop removed (`filters.keep_mask`), then
softmax. A greedy row (temperature 0) reports the softmax of its penalized
logits (temperature 1; the token is its most likely one). The alternatives
are the k most likely tokens of that same distribution, likeliest first
(tokens the filters removed are never listed, so fewer than k may come).

Cost: nothing at all for rows that did not ask (`score_rows` returns None
and no tensor is touched). For rows that did, the work is queued on the
device right behind the sampling, before the next decode step, and copied
to pinned host memory with its own event: reading it waits for the sampling,
never for the decode queued after it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .filters import keep_mask
from .sampler import SampleRow, apply_penalties

Scored = tuple[float, tuple[tuple[int, float], ...]]  # (logprob, ((id, logprob), ...))


def distribution(logits: torch.Tensor, row: SampleRow) -> torch.Tensor:
    """float32 log-probabilities [V] of the distribution `row` samples from
    (see the module docstring). logits: float32 [V] (the sampled vocabulary)."""
    params = row.params
    x = logits.float()
    if params.repetition_penalty != 1.0 or params.presence_penalty != 0.0:
        x = apply_penalties(x, row.recent if row.recent is not None else torch.empty(0, dtype=torch.int64),
                            params.repetition_penalty, params.presence_penalty)
    if not params.greedy:
        if params.temperature != 1.0:
            x = x / torch.tensor(params.temperature, dtype=torch.float32, device=x.device)
        vocab = x.shape[0]
        top_k = params.top_k if 0 < params.top_k < vocab else 0
        if top_k or params.top_p < 1.0 or params.min_p > 0.0:
            dev = x.device
            keep = keep_mask(x[None], torch.tensor([top_k], device=dev),
                             torch.tensor([params.top_p], dtype=torch.float32, device=dev),
                             torch.tensor([math.log(params.min_p) if params.min_p > 0 else -math.inf],
                                          dtype=torch.float32, device=dev))[0]
            x = x.masked_fill(~keep, float("-inf"))
    return torch.log_softmax(x, dim=-1)


class ScoredRows:
    """The logprobs of the rows that asked, launched at construction; `get(i)`
    reads row i's (None for a row that did not ask)."""

    def __init__(self, logits: torch.Tensor, ids: torch.Tensor, rows: Sequence[SampleRow]):
        self._rows = {i: n for n, i in enumerate(i for i, r in enumerate(rows) if r.params.logprobs is not None)}
        k = max(1, max(rows[i].params.logprobs for i in self._rows))
        values, indices = [], []
        for i in self._rows:
            lp = distribution(logits[i], rows[i])
            top = lp.topk(min(k, lp.shape[0]))
            values.append(torch.cat([lp.gather(0, ids[i:i + 1]), top.values]))
            indices.append(top.indices)
        self._k = [rows[i].params.logprobs for i in self._rows]
        values, indices = torch.stack(values), torch.stack(indices)
        self._event = None
        if values.device.type == "cuda":
            host_values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host_indices = torch.empty(indices.shape, dtype=indices.dtype, pin_memory=True)
            host_values.copy_(values, non_blocking=True)
            host_indices.copy_(indices, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            values, indices = host_values, host_indices
        self._values, self._indices = values, indices
        self._read: tuple[list, list] | None = None

    def get(self, i: int) -> Scored | None:
        n = self._rows.get(i)
        if n is None:
            return None
        if self._read is None:
            if self._event is not None:
                self._event.synchronize()
            self._read = (self._values.tolist(), self._indices.tolist())
        values, indices = self._read[0][n], self._read[1][n]
        top = tuple((t, v) for t, v in zip(indices[:self._k[n]], values[1:1 + self._k[n]]) if v != -math.inf)
        return values[0], top


def score_rows(logits: torch.Tensor, ids: torch.Tensor, rows: Sequence[SampleRow]) -> ScoredRows | None:
    """Launch the logprobs of the rows whose params ask for them. logits:
    float32 [B, V] the rows were sampled from; ids: their sampled ids, int64
    [B] on the device (`PendingIds.device_ids`). None when no row asks."""
    if all(r.params.logprobs is None for r in rows):
        return None
    return ScoredRows(logits, ids, rows)
