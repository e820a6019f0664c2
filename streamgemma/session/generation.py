"""`Generation`: one generation in progress, split in two halves so that a
caller can run one batched model step for many sessions between them:
`sample_row()` (what sampling needs of the next token) and
`accept(token, logits)` (record it, decide whether the generation ended)."""

from __future__ import annotations

import math

import torch

from ..sampling.logprobs import Scored
from ..sampling.params import SamplingParams
from ..sampling.sampler import SampleRow
from ..sampling.stops import StopStrings
from ..tokenizer import Tokenizer
from ..types import Token
from .host import HostState
from .snapshot import MAX_STOPPED_CHARS


class Generation:
    """Drives `state` (a session's host state) through one generation. Create
    with `Session.start_generation`; `Session.generate` runs one row, the
    engine many rows per step."""

    def __init__(self, state: HostState, params: SamplingParams, stop_ids: frozenset[int], vocab: int):
        self.state = state
        self.params = params
        self.stop_ids = stop_ids
        self.vocab = vocab  # leading logits entries that are sampled
        self._penalize = params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
        self._stops = StopStrings(params.stop) if params.stop else None
        self._max_tokens = params.max_tokens if params.max_tokens is not None else math.inf
        self.generated = 0
        self.finish_reason: str | None = None

    def logits(self) -> torch.Tensor:
        """The logits the next token is sampled from, [vocab]."""
        return self.state.logits[:self.vocab]

    def sample_row(self) -> SampleRow:
        """The sampling inputs of the next token. A sampled (not greedy)
        generation takes one counter of the session's stream: call once per token."""
        s, params = self.state, self.params
        return SampleRow(params, None if params.greedy else s.rng.take(),
                         s.recent.tensor() if self._penalize else None)

    def take_rng(self) -> tuple[int, int] | None:
        """`sample_row().rng` alone: the (seed, counter) of the next token (None when greedy)."""
        return None if self.params.greedy else self.state.rng.take()

    def recent_ids(self) -> torch.Tensor | None:
        """`sample_row().recent` alone: the ids the penalties see (None without penalties)."""
        return self.state.recent.tensor() if self._penalize else None

    def accept(self, token: int, next_logits: torch.Tensor | tuple[torch.Tensor, int],
               scored: Scored | None = None) -> Token:
        """Record that the model consumed `token`, with `next_logits` (float32
        [vocab], owned by the caller; or (batch, i): row i of batch) after it. Returns the Token to stream;
        its finish_reason is set when the generation has ended. scored: the
        token's (logprob, alternatives) when the params ask for them
        (`sampling.logprobs`)."""
        s = self.state
        stop_token = token in self.stop_ids
        # A stop token's own text (e.g. "<end_of_turn>") is never emitted; bytes pending before it are.
        pending = s.detok.flush() if stop_token and s.detok is not None else ""
        text = s.consume_one(token, next_logits)
        self.generated += 1
        finish = None
        stops = self._stops
        if stop_token:
            text = stops.push(pending)[0] if stops is not None else pending
            finish = "stop"
            tok = s.tokenizer
            s.stopped = f"stop token {token} ({tok.piece(token) if tok else 'no tokenizer'})"
        elif stops is not None:
            text, hit = stops.push(text)
            if hit:
                finish = "stop"
                s.stopped = _cut(f"stop string {stops.matched!r}", MAX_STOPPED_CHARS)
        if finish is None and self.generated >= self._max_tokens:
            finish = "length"
        if finish is not None and stops is not None and stops.matched is None:
            text += stops.flush()  # ended without a stop string: held-back text is plain output
        self.finish_reason = finish
        if scored is not None:
            return Token(token, text, finish, scored[0], scored[1])
        return Token(token, text, finish)

    def flush(self) -> str:
        """Text held back as a possible stop-string start, released when the
        generation is ended early (cancelled)."""
        return self._stops.flush() if self._stops is not None else ""


def sampled_vocab(tokenizer: Tokenizer | None, vocab_size: int) -> int:
    """How many leading logits entries are sampled: the tokenizer's pieces (a
    checkpoint may have spare embedding rows), or the whole vocabulary."""
    return tokenizer.vocab_size if tokenizer is not None else vocab_size


def _cut(text: str, most: int) -> str:
    """`text`, cut to `most` characters with an ellipsis (a snapshot holds no longer description)."""
    return text if len(text) <= most else text[:most - 1] + "…"
