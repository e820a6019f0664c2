"""Sampling: `SamplingParams` (validated settings of one generation) and the
ops that pick the next token from float32 logits on the model's device."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How a generation picks tokens and when it ends.

    max_tokens: most tokens to generate (None: until a stop).
    temperature: 0 is greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0: off). top_p: keep the smallest set
    whose probability reaches p (1: off). min_p: drop tokens whose probability
    is below min_p x the top token's (0: off).
    repetition_penalty: >1 discourages tokens seen among the session's recent
    ids (positive logits divided by it, negative multiplied; 1: off).
    presence_penalty: subtracted once from the logit of every recent token (0: off).
    stop: strings that end the generation; they are never emitted, even when
    they span several tokens. stop_token_ids: ids that end the generation
    (None: the tokenizer's eos and <end_of_turn>). seed: reseeds the session's
    generator at the start of the generation (None: keep its current state).
    """

    max_tokens: int | None = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer or None, got {self.max_tokens!r}")
        _check_real("temperature", self.temperature, lo=0.0)
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        _check_real("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _check_real("min_p", self.min_p)
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p!r}")
        _check_real("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty!r}")
        _check_real("presence_penalty", self.presence_penalty)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        object.__setattr__(self, "stop", stop)
        if self.stop_token_ids is not None:
            ids = tuple(self.stop_token_ids)
            for i in ids:
                if not _is_int(i) or i < 0:
                    raise ValueError(f"stop_token_ids must be token ids (ints >= 0), got {i!r}")
            object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_real(name: str, v, lo: float | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v!r}")


def new_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator on `device`, seeded with `seed` (None: from OS entropy)."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def apply_penalties(logits: torch.Tensor, recent: torch.Tensor, repetition: float, presence: float) -> torch.Tensor:
    """Penalize tokens in `recent` ([N] int64, on the logits' device; repeats
    count once). logits: float32 [V]. Returns a new [V] tensor."""
    seen = torch.zeros_like(logits, dtype=torch.bool).index_fill_(0, recent, True)
    out = logits
    if repetition != 1.0:
        out = torch.where(seen, torch.where(out > 0, out / repetition, out * repetition), out)
    if presence != 0.0:
        out = out - seen.to(out.dtype) * presence
    return out


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """The next token id, a 0-dim int64 tensor on the logits' device.

    logits: float32 [V] (penalties already applied). Everything stays on the
    device; the caller reads the id with one `.item()`. `generator` is only
    used when sampling (temperature > 0).
    """
    if params.greedy:
        return torch.argmax(logits)
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep a token if the mass before it is below top_p: the top token always stays.
        drop_sorted = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= params.top_p
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter_(0, order, drop_sorted), 0.0)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    # Exponential race (argmax of p / Exp(1)) draws from p without normalizing
    # and without the host round-trip torch.multinomial can need.
    noise = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-20)
    return torch.argmax(probs / noise)


class StopStrings:
    """Holds back streamed text that might be the start of a stop string.

    `push(text)` returns (text safe to emit, stopped). Once a stop string is
    complete, the text before it is returned with stopped=True and nothing
    from the stop string on is ever emitted.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.held = ""
        self.matched: str | None = None  # the stop string that ended the text, once one has

    def push(self, text: str) -> tuple[str, bool]:
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            at = min(hits)
            self.matched = next(s for s in self.stops if buf.find(s) == at)
            self.held = ""
            return buf[:at], True
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(buf)), 0, -1)
                    if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """Held-back text, released because the generation ended without a stop string."""
        text, self.held = self.held, ""
        return text
