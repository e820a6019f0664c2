"""The engine's books: what it knows of each session (`SessionRecord`), its
queued input, its running generation, and the engine's counters. Plain
records; the scheduler reads them, the engine changes them."""

from __future__ import annotations

import array
import collections
import dataclasses
import logging
import time
from collections.abc import Callable

import anyio

from ..errors import StreamgemmaError
from ..session.generation import Generation
from ..session.session import Session

log = logging.getLogger("streamgemma.engine")


class EngineError(StreamgemmaError):
    """A request the engine cannot serve. `code` names the reason for clients
    (see docs/protocol.md): unknown_session, session_busy, generating,
    not_generating, capacity, closed, limit, snapshot_error."""

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
    """Input appended to a session and not yet consumed: token ids (an int32
    array: 4 bytes a token, where a list costs about 36), or text that is
    tokenized when its turn comes (`ids` None until then). Small: a client
    may queue many thousands (slots, and the event made only if awaited)."""

    __slots__ = ("ids", "text", "add_bos", "text_bytes", "offset", "position", "error", "done", "_event",
                 "_callbacks")

    def __init__(self, ids: array.array | None, text: str | None = None, add_bos: bool | None = None,
                 text_bytes: int = 0):
        self.ids = ids
        self.text = text
        self.add_bos = add_bos  # text: whether its ids start with BOS (put first when tokenizing); ids: None
        self.text_bytes = text_bytes  # UTF-8 size of `text` while it waits to be tokenized
        self.offset = 0  # ids[:offset] are consumed
        self.position = -1  # the session's position once all ids are consumed
        self.error: BaseException | None = None
        self.done = False
        self._event: anyio.Event | None = None
        self._callbacks: list[Callable[[PendingInput], None]] | None = None

    @property
    def remaining(self) -> int:
        return len(self.ids) - self.offset if self.ids is not None else 0

    @property
    def consumed(self) -> anyio.Event:
        """Set once it is consumed or failed."""
        if self._event is None:
            self._event = anyio.Event()
            if self.done:
                self._event.set()
        return self._event

    def add_done_callback(self, callback: Callable[[PendingInput], None]) -> None:
        """Call `callback(self)` once it is consumed or failed (in the engine's
        tick: it must not block). Cheaper than a task awaiting `consumed`
        when a client sends thousands of appends."""
        if self._callbacks is None:
            self._callbacks = []
        self._callbacks.append(callback)

    def complete(self) -> None:
        """Consumed (position set) or failed (error set): tell whoever waits."""
        self.done = True
        if self._event is not None:
            self._event.set()
        for callback in self._callbacks or ():
            try:
                callback(self)
            except Exception:  # noqa: BLE001 - a failing listener must not stop the scheduler
                log.exception("a callback of consumed input failed")


# Upper bounds (seconds) of the time-to-first-token histogram (EngineStats, /metrics).
FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ActiveGeneration:
    """A generation the engine is advancing, and where its tokens go.
    requested: when `Engine.generate` was called (time.monotonic; None: now)."""

    def __init__(self, generation: Generation, queue, requested: float | None = None):
        self.generation = generation
        self.queue = queue  # streams.TokenQueue
        self.cancelled = False
        self.ended = anyio.Event()  # set once its Done is queued
        self.requested = time.monotonic() if requested is None else requested
        self.tokens = 0

    def put(self, token, stats: EngineStats) -> bool:
        """Queue `token` (False: nobody reads the stream any more); the first
        one's delay since the request goes to `stats`."""
        if self.tokens == 0:
            stats.observe_first_token(time.monotonic() - self.requested)
        self.tokens += 1
        return self.queue.put(token)


class SessionRecord:
    """A session managed by an `Engine`: live in a pool slot, or suspended in
    the engine's store. Use it through the engine's methods."""

    def __init__(self, session_id: str, live: Session | None, position: int):
        self.id = session_id
        self.live = live
        self.suspended_position = position
        self.inputs: collections.deque[PendingInput] = collections.deque()
        self.queued_tokens = 0  # sum of the inputs' remaining ids, kept as they change
        self.queued_text_bytes = 0  # UTF-8 bytes of queued text not yet tokenized
        self.generation: ActiveGeneration | None = None
        self.last_used = 0  # orders uses, for least-recently-used suspension
        self.last_active = time.monotonic()  # for idle expiry
        self.closed = False
        self.owner: object | None = None  # the connection attached to it, if any

    @property
    def position(self) -> int:
        """Tokens consumed so far."""
        return self.live.position if self.live is not None else self.suspended_position

    @property
    def idle(self) -> bool:
        return self.generation is None and not self.inputs

    @property
    def tokenized(self) -> bool:
        """Whether all queued input is token ids (text waits for its turn to be tokenized)."""
        return self.queued_text_bytes == 0

    def next_input_token(self) -> int:
        first = self.inputs[0]
        return first.ids[first.offset]

    def __repr__(self) -> str:
        return f"SessionRecord({self.id!r}, position={self.position}, {'live' if self.live else 'suspended'})"


@dataclasses.dataclass
class EngineStats:
    """Counters for monitoring. phase_seconds: where the scheduler's time goes
    ("prefill" chunks; "sample" issuing the sampling; "wait" for the sampled
    ids, the device's time; "decode" the call and accepting
    tokens, which on the CPU includes the sampling; "deliver" to streams)."""

    phase_seconds: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(("prefill", "sample", "wait", "decode", "deliver"), 0.0))
    decode_calls: int = 0
    sampling_plans: int = 0  # built when a tick's batch differs from the last (else the last is reused)
    decoded_tokens: int = 0  # generated
    decoded_input_tokens: int = 0  # input consumed in decode rows
    prefill_calls: int = 0
    suspensions: int = 0
    resumptions: int = 0
    write_failures: int = 0  # snapshot writes the store refused (each is logged)
    dropped_inputs: int = 0  # inputs dropped unconsumed: their connection ended, or they failed
    expired_sessions: int = 0  # deleted after `session_ttl` without use
    journal_commits: int = 0  # group commits of the write-ahead journal (one per tick with records)
    journal_failures: int = 0  # commits that failed (each is logged and retried)
    # Time to first token of every generation, from its `generate` call (queued input is consumed first,
    # so an append + generate pair counts the prompt's prefill): counts per FIRST_TOKEN_BUCKETS bound.
    first_token_buckets: list[int] = dataclasses.field(default_factory=lambda: [0] * len(FIRST_TOKEN_BUCKETS))
    first_token_count: int = 0
    first_token_seconds: float = 0.0  # their sum

    def observe_first_token(self, seconds: float) -> None:
        self.first_token_count += 1
        self.first_token_seconds += seconds
        for i, bound in enumerate(FIRST_TOKEN_BUCKETS):
            if seconds <= bound:
                self.first_token_buckets[i] += 1
                break
