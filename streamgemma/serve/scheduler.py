"""The plan of a tick, as plain data computed from the engine's books.

A tick, in order:
1. Generations cancelled since the last tick end.
2. Input. Short input rides along with the decoders: while some session is
   generating (so a decode runs anyway), a live session whose queued input
   is at most `step_input_tokens` consumes one token of it as an extra row
   of that decode, at no cost to the others. When nobody generates, input of
   at most `idle_step_input_tokens` rides the same way in a decode of input
   rows only. Otherwise one session takes an input turn: its queued text
   is tokenized, or one prefill chunk of its queued ids (gathered across its
   appends, so many small appends cost one call) is consumed. Sessions with
   queued input take turns (round robin), so a long append never stalls the
   decoders for more than one chunk. A suspended session whose turn it is and
   whose input is short is restored and rides along.
3. Every generating session without queued input advances by one token, all
   of them every tick (input appended to a generating session is consumed
   before its next token).
`plan_input` is 1-2, `plan_decode` is 3 (computed after the prefill, so input
that arrived meanwhile counts). Neither touches a device or an event loop
(only `wait_input_turn` waits, for requests outside the ticks).

Fairness. Generating sessions share every decode step, so none delays
another by more than a batch row. Input is the work that could starve them:
while some session decodes, input (turns, and the riders' rows of the decode
steps) may take at most `input_share` of the scheduler's time (an
`InputBudget`: after input work of d seconds, the next waits
d * (1 - share) / share, and ticks meanwhile decode the generating sessions
alone), so they keep at least 1 - input_share of their token rate however
much input others send; the input itself is served round robin within that
share. With nobody generating, input takes all the time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterable, Mapping

import anyio

from .record import EngineError, SessionRecord

DEFAULT_STEP_INPUT_TOKENS = 16
# When nobody generates: on CUDA a decode step (a CUDA graph) per token beats a
# prefill call's launches up to about 4 tokens; on the CPU both cost the model's
# arithmetic, so only a single token takes a decode row.
IDLE_STEP_INPUT_TOKENS = {"cuda": 4}  # by device type; 1 on others
DEFAULT_INPUT_SHARE = 0.15  # of the scheduler's time for input turns while sessions generate


class DecodeCosts:
    """What a decode step of n rows takes, learned from the ticks that ran
    (an exponential average per row count): the riders' input work in a
    step is its time beyond that of the generating rows alone, which is
    almost nothing on a GPU and most of the step on a CPU."""

    def __init__(self):
        self.seconds: dict[int, float] = {}

    def observe(self, rows: int, seconds: float) -> None:
        """A step of `rows` generating rows (no riders) took `seconds`."""
        known = self.seconds.get(rows)
        self.seconds[rows] = seconds if known is None else 0.9 * known + 0.1 * seconds

    def riders_seconds(self, generating: int, riders: int, seconds: float) -> float:
        """The riders' part of a step of `generating` + `riders` rows that took
        `seconds` (their share of the rows until the generating rows' time is known)."""
        alone = self.seconds.get(generating)
        if alone is None:
            return seconds * riders / (generating + riders)
        return max(0.0, seconds - alone)


class InputBudget:
    """How much of the scheduler's time input turns may take while sessions
    generate (see the module docstring). Times are the caller's clock."""

    def __init__(self, share: float = DEFAULT_INPUT_SHARE):
        if not 0 < share <= 1:
            raise ValueError(f"input_share must be in (0, 1] (1: input turns every tick), got {share!r}")
        self.share = share
        self.next_turn_at = float("-inf")

    def allows(self, now: float) -> bool:
        return now >= self.next_turn_at

    def charge(self, seconds: float, now: float) -> None:
        """Input work took `seconds`, ending at `now` (charges add up)."""
        self.next_turn_at = max(self.next_turn_at, now) + seconds * (1 - self.share) / self.share


@dataclasses.dataclass
class InputPlan:
    cancelled: list[SessionRecord]  # generations to end now
    riders: list[SessionRecord]  # live sessions that consume one input token in this tick's decode
    restore: SessionRecord | None = None  # suspended, short input: restore it, then it rides along
    prefill: SessionRecord | None = None  # consumes one chunk of its first input with the parallel path
    decoding: bool = False  # some session generates: input work counts against the input budget


@dataclasses.dataclass
class DecodePlan:
    batch: list[SessionRecord]  # generating sessions that sample and consume a token
    riders: list[SessionRecord]  # sessions that consume their next input token in the same decode

    def __bool__(self) -> bool:
        return bool(self.batch or self.riders)


class Scheduler:
    def __init__(self, step_input_tokens: int = DEFAULT_STEP_INPUT_TOKENS, idle_step_input_tokens: int = 1,
                 input_share: float = DEFAULT_INPUT_SHARE):
        for name, value in (("step_input_tokens", step_input_tokens),
                            ("idle_step_input_tokens", idle_step_input_tokens)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0 (0: always prefill), got {value!r}")
        self.step_input_tokens = step_input_tokens
        self.idle_step_input_tokens = idle_step_input_tokens
        self.budget = InputBudget(input_share)
        self.decode_costs = DecodeCosts()

    def plan_input(self, generating: Iterable[SessionRecord], waiting: Iterable[SessionRecord],
                   now: float = float("inf")) -> InputPlan:
        """generating: sessions with a generation; waiting: sessions with
        queued input, in turn order; now: the clock of `charge_input`."""
        generating, waiting = list(generating), list(waiting)
        cancelled = [es for es in generating if es.generation.cancelled]
        decoding = self.decoding(generating)
        if decoding and not self.budget.allows(now):  # input has had its share: decoders only
            return InputPlan(cancelled, [], decoding=True)
        short = self.step_input_tokens if decoding else self.idle_step_input_tokens
        riders = [es for es in waiting if es.live is not None and _fits(es, short)]
        turn = next((es for es in waiting if es not in riders), None)
        if turn is None:
            return InputPlan(cancelled, riders, decoding=decoding)
        if _fits(turn, short):  # suspended (a live one would ride already)
            return InputPlan(cancelled, riders, restore=turn, decoding=decoding)
        return InputPlan(cancelled, riders, prefill=turn, decoding=decoding)

    @staticmethod
    def decoding(generating: Iterable[SessionRecord]) -> bool:
        """Whether some of the sessions with a generation decode this tick
        (so input work counts against the input budget)."""
        return any(es.live is not None and not es.inputs and not es.generation.cancelled for es in generating)

    def charge_outside(self, generating: Iterable[SessionRecord], seconds: float, now: float) -> None:
        """Work done for a client outside the ticks (parsing its frames, its
        open or resume) counts as input while sessions generate: it takes
        the processor time and event loop that decoding needs."""
        if self.decoding(generating):
            self.budget.charge(seconds, now)

    async def wait_input_turn(self, generating: Mapping[str, SessionRecord]) -> None:
        """While sessions of `generating` (a live view) generate, wait until
        the input budget allows more input work."""
        budget = self.budget
        while self.decoding(generating.values()) and not budget.allows(now := time.monotonic()):
            await anyio.sleep(budget.next_turn_at - now)

    @contextlib.asynccontextmanager
    async def input_work(self, generating: Mapping[str, SessionRecord]):
        """Charge the block's time to the input budget (see `charge_outside`)."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.charge_outside(generating.values(), time.monotonic() - started, time.monotonic())

    def charge_input(self, seconds: float, now: float) -> None:
        """The input work of the tick planned last (its input turn, and the
        riders' part of the decode: `decoded`) took `seconds`, ending at `now`."""
        self.budget.charge(seconds, now)

    def decoded(self, generating: int, riders: int, seconds: float) -> float:
        """A decode step of `generating` + `riders` rows took `seconds`; the
        riders' part of it."""
        if not riders:
            self.decode_costs.observe(generating, seconds)
            return 0.0
        return self.decode_costs.riders_seconds(generating, riders, seconds)

    @staticmethod
    def to_suspend(live: list[SessionRecord], riding: set[str]) -> SessionRecord:
        """Which of the `live` sessions (all slots taken) gives up its slot: the
        least recently used idle one, else one that only waits for its input
        turn (restored on its turn: waiting input never holds a slot, or a
        client could take every slot with slow input), this tick's riders
        (`riding` ids) last. EngineError("capacity") if all generate."""
        waiting = [es for es in live if es.generation is None and not es.idle]
        # Riders of this tick last: one suspended now just drops out of its decode.
        idle = [es for es in live if es.idle] or [es for es in waiting if es.id not in riding] or waiting
        if not idle:
            raise EngineError("capacity", f"all {len(live)} slots are busy generating; retry later")
        return min(idle, key=lambda es: es.last_used)

    @staticmethod
    def plan_decode(generating: Iterable[SessionRecord], riders: Iterable[SessionRecord]) -> DecodePlan:
        batch = [es for es in generating if es.generation is not None and not es.inputs and es.live is not None]
        return DecodePlan(batch, [es for es in riders if es.inputs and es.live is not None])


def _fits(es: SessionRecord, limit: int) -> bool:
    """Whether the queued input of `es` is short enough to ride along (and
    all token ids: text is tokenized in an input turn)."""
    return not es.closed and es.tokenized and 0 < es.queued_tokens <= limit
