"""Plain values shared by the SDK and its client (no torch)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class Token:
    """One generated token.

    id: the token id. text: the text it completes, UTF-8 safe: "" while the
    bytes of a character are still arriving or while text is held back because
    it may be the start of a stop string. finish_reason: on the last token of a
    generation, "stop" (a stop token or stop string) or "length" (max_tokens);
    else None. logprob / top_logprobs: only when the generation asked for
    them (`logprobs=k`): the natural log of the token's probability under the
    distribution it was sampled from, and the k likeliest tokens of that
    distribution as (id, logprob) pairs, likeliest first; else None.
    """

    id: int
    text: str
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
