"""The engine's books: what it knows of each session (`SessionRecord`), its
queued input, its running generation, and the engine's counters. Plain
records; the scheduler reads them, the engine changes them."""

from __future__ import annotations

import collections
import dataclasses

import anyio

from ..errors import StreamgemmaError
from ..session.generation import Generation
from ..session.session import Session


class EngineError(StreamgemmaError):
    """A request the engine cannot serve. `code` names the reason for clients
    (see docs/protocol.md): unknown_session, session_busy, generating,
    not_generating, capacity, closed, limit."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Done:
    """The end of a generation: reason "length", "stop" or "cancelled", the
    session's position after it, and `text`: on a cancelled generation, text
    that was held back as a possible start of a stop string (else "")."""

    reason: str
    position: int
    text: str = ""


class PendingInput:
    """Token ids appended to a session and not yet consumed."""

    def __init__(self, ids: list[int]):
        self.ids = ids
        self.offset = 0  # ids[:offset] are consumed
        self.consumed = anyio.Event()
        self.position = -1  # the session's position once all ids are consumed
        self.error: BaseException | None = None

    @property
    def remaining(self) -> int:
        return len(self.ids) - self.offset


class ActiveGeneration:
    """A generation the engine is advancing, and where its tokens go."""

    def __init__(self, generation: Generation, queue):
        self.generation = generation
        self.queue = queue  # streams.TokenQueue
        self.cancelled = False


class SessionRecord:
    """A session managed by an `Engine`: live in a pool slot, or suspended in
    the engine's store. Use it through the engine's methods."""

    def __init__(self, session_id: str, live: Session | None, position: int):
        self.id = session_id
        self.live = live
        self.suspended_position = position
        self.inputs: collections.deque[PendingInput] = collections.deque()
        self.queued_tokens = 0  # sum of the inputs' remaining ids, kept as they change
        self.generation: ActiveGeneration | None = None
        self.last_used = 0
        self.closed = False
        self.owner: object | None = None  # the connection attached to it, if any

    @property
    def position(self) -> int:
        """Tokens consumed so far."""
        return self.live.position if self.live is not None else self.suspended_position

    @property
    def idle(self) -> bool:
        return self.generation is None and not self.inputs

    def next_input_token(self) -> int:
        first = self.inputs[0]
        return first.ids[first.offset]

    def __repr__(self) -> str:
        return f"SessionRecord({self.id!r}, position={self.position}, {'live' if self.live else 'suspended'})"


@dataclasses.dataclass
class EngineStats:
    """Counters for monitoring. phase_seconds: where the scheduler's time goes
    ("prefill" chunks; "sample" issuing the sampling; "wait" for the sampled
    ids, the device's time; "decode" the call, logits copy and accepting
    tokens, which on the CPU includes the sampling; "deliver" to streams)."""

    phase_seconds: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(("prefill", "sample", "wait", "decode", "deliver"), 0.0))
    decode_calls: int = 0
    decoded_tokens: int = 0  # generated
    decoded_input_tokens: int = 0  # input consumed in decode rows
    prefill_calls: int = 0
    suspensions: int = 0
    resumptions: int = 0
