"""`SamplingParams`: the validated settings of one generation (no torch)."""

from __future__ import annotations

import dataclasses
import math
import numbers

from ..validate import check_sampling

MAX_LOGPROBS = 20  # alternatives a token may report with its log-probability


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
    (None: the tokenizer's eos and <end_of_turn>). seed: restarts the session's
    random stream at the start of the generation, as (seed mod 2**64, counter
    0) (None: keep the stream where it is). logprobs: None (off), or k in
    [0, 20]: each token carries its log-probability under the distribution
    it was sampled from and the k likeliest alternatives (see
    `sampling.logprobs`).
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
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer or None, got {self.max_tokens!r}")
        _check_real("temperature", self.temperature, lo=0.0)
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        # Plain ints and floats from here on (e.g. numpy's): the sampler and the snapshot take no others.
        for name in ("max_tokens", "top_k", "seed", "logprobs"):
            if _is_int(getattr(self, name)):
                object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty"):
            _check_real(name, getattr(self, name))  # (then the ranges below compare plain floats)
            object.__setattr__(self, name, float(getattr(self, name)))
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p!r}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty!r}")
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else _sequence("stop", self.stop)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:  # (a lone surrogate: no generated text can ever match it)
                raise ValueError(f"stop string {s!r} is not valid Unicode") from None
        object.__setattr__(self, "stop", stop)
        if self.stop_token_ids is not None:
            ids = _sequence("stop_token_ids", self.stop_token_ids)
            for i in ids:
                if not _is_int(i) or i < 0:
                    raise ValueError(f"stop_token_ids must be token ids (ints >= 0), got {i!r}")
            object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        check_sampling(self)  # ranges the float32 sampler and the snapshot format honour

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _sequence(name: str, v) -> tuple:
    """`v` as a tuple, if it is a list or tuple-like collection (not bytes, a mapping or a scalar)."""
    if isinstance(v, (str, bytes, bytearray, dict)) or not isinstance(v, (list, tuple, set, frozenset)):
        raise ValueError(f"{name} must be a list of {'strings' if name == 'stop' else 'token ids'}, got {v!r}")
    return tuple(v)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_real(name: str, v, lo: float | None = None) -> None:
    try:
        finite = not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v)
    except OverflowError:  # an int or Fraction beyond any float
        finite = False
    if not finite:
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v!r}")
