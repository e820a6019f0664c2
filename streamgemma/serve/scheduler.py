"""The plan of a tick, as plain data computed from the engine's books.

A tick, in order:
1. Generations cancelled since the last tick end.
2. Input. Short input rides along with the decoders: while some session is
   generating (so a decode runs anyway), a live session whose queued input
   is at most `step_input_tokens` consumes one token of it as an extra row
   of that decode, at no cost to the others. When nobody generates, input of
   at most `idle_step_input_tokens` rides the same way in a decode of input
   rows only. Otherwise one prefill chunk is consumed for one session: the
   sessions with queued input take turns (round robin), so a long append
   never stalls the decoders for more than one chunk. A suspended session
   whose turn it is and whose input is short is restored and rides along.
3. Every generating session without queued input advances by one token, all
   of them every tick (input appended to a generating session is consumed
   before its next token).
`plan_input` is 1-2, `plan_decode` is 3 (computed after the prefill, so input
that arrived meanwhile counts). Neither touches a device or an event loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from .record import SessionRecord

DEFAULT_STEP_INPUT_TOKENS = 16
# When nobody generates: on CUDA a decode step (a CUDA graph) per token beats a
# prefill call's launches up to about 4 tokens; on the CPU both cost the model's
# arithmetic, so only a single token takes a decode row.
DEFAULT_IDLE_STEP_INPUT_TOKENS = {"cuda": 4}
DEFAULT_IDLE_STEP_INPUT_TOKENS_OTHER = 1


@dataclasses.dataclass
class InputPlan:
    cancelled: list[SessionRecord]  # generations to end now
    riders: list[SessionRecord]  # live sessions that consume one input token in this tick's decode
    restore: SessionRecord | None = None  # suspended, short input: restore it, then it rides along
    prefill: SessionRecord | None = None  # consumes one chunk of its first input with the parallel path


@dataclasses.dataclass
class DecodePlan:
    batch: list[SessionRecord]  # generating sessions that sample and consume a token
    riders: list[SessionRecord]  # sessions that consume their next input token in the same decode

    def __bool__(self) -> bool:
        return bool(self.batch or self.riders)


class Scheduler:
    def __init__(self, step_input_tokens: int = DEFAULT_STEP_INPUT_TOKENS, idle_step_input_tokens: int = 1):
        for name, value in (("step_input_tokens", step_input_tokens),
                            ("idle_step_input_tokens", idle_step_input_tokens)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0 (0: always prefill), got {value!r}")
        self.step_input_tokens = step_input_tokens
        self.idle_step_input_tokens = idle_step_input_tokens

    def plan_input(self, generating: Iterable[SessionRecord], waiting: Iterable[SessionRecord]) -> InputPlan:
        """generating: sessions with a generation; waiting: sessions with
        queued input, in turn order."""
        generating, waiting = list(generating), list(waiting)
        cancelled = [es for es in generating if es.generation.cancelled]
        decoding = any(not es.inputs and es.live is not None for es in generating if es not in cancelled)
        short = self.step_input_tokens if decoding else self.idle_step_input_tokens
        riders = [es for es in waiting if es.live is not None and _fits(es, short)]
        turn = next((es for es in waiting if es not in riders), None)
        if turn is None:
            return InputPlan(cancelled, riders)
        if _fits(turn, short):  # suspended (a live one would ride already)
            return InputPlan(cancelled, riders, restore=turn)
        return InputPlan(cancelled, riders, prefill=turn)

    @staticmethod
    def plan_decode(generating: Iterable[SessionRecord], riders: Iterable[SessionRecord]) -> DecodePlan:
        batch = [es for es in generating if es.generation is not None and not es.inputs and es.live is not None]
        return DecodePlan(batch, [es for es in riders if es.inputs and es.live is not None])


def _fits(es: SessionRecord, limit: int) -> bool:
    """Whether the queued input of `es` is short enough to ride along."""
    return not es.closed and 0 < es.queued_tokens <= limit
