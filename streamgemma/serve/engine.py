"""`Engine`: continuous batching of many sessions of one model.

The engine keeps the books (`record`), asks the `Scheduler` for each tick's
plan, has a `BatchExecutor` run the decode, an `Offloader` move sessions
between slots and the store, and delivers tokens to `TokenStream`s. A session
gets exactly the tokens `Session.generate` would give it with the same seed,
whatever else is in the batch.

Every model call runs in a worker thread or under the model's lock, one at a
time (`_model_lock`), so the event loop stays free to read and write sockets.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Sequence

import anyio
import anyio.to_thread
import zstandard

from ..errors import SnapshotNotFound, StreamgemmaError
from ..sampling.params import SamplingParams
from ..session.model import Model
from ..session.session import check_token_ids
from ..session.store import SnapshotStore
from .batch import batch_executor
from .offload import DEFAULT_MAX_UNWRITTEN, SUSPEND_COMPRESSION_LEVEL, MemoryStore, Offloader
from .record import ActiveGeneration, Done, EngineError, EngineStats, PendingInput, SessionRecord
from .scheduler import (
    DEFAULT_IDLE_STEP_INPUT_TOKENS,
    DEFAULT_IDLE_STEP_INPUT_TOKENS_OTHER,
    DEFAULT_STEP_INPUT_TOKENS,
    Scheduler,
)
from .streams import TokenQueue, TokenStream

log = logging.getLogger("streamgemma.engine")

DEFAULT_INPUT_CHUNK = 64  # tokens of queued input prefilled per tick: bounds how long decoders wait
DEFAULT_MAX_PENDING_TOKENS = 1 << 20  # queued input tokens per session: bounds host memory


class Engine:
    """Schedules many sessions of `model` onto batched decode steps.

    max_active: sessions holding a pool slot at once (the decode batch size
    bound); more may be open, the idle ones suspended to `store` (default: an
    in-memory store). input_chunk: tokens of queued input consumed per
    prefill. max_pending_tokens: input queued for one session (more is
    refused with EngineError("limit")). step_input_tokens /
    idle_step_input_tokens: see `scheduler` (0: always prefill; the idle
    default is 4 on CUDA, 1 elsewhere). max_unwritten, compression_level:
    see `offload`. host_work: "loop" or "thread" (see `batch`; default by
    device). Run the scheduler with `await engine.run()` in a task group (it
    returns when cancelled); call the other methods from the same event loop.
    `stats` holds counters for monitoring.
    """

    def __init__(self, model: Model, max_active: int = 64, store: SnapshotStore | None = None,
                 input_chunk: int = DEFAULT_INPUT_CHUNK, max_pending_tokens: int = DEFAULT_MAX_PENDING_TOKENS,
                 step_input_tokens: int = DEFAULT_STEP_INPUT_TOKENS, idle_step_input_tokens: int | None = None,
                 max_unwritten: int = DEFAULT_MAX_UNWRITTEN, compression_level: int = SUSPEND_COMPRESSION_LEVEL,
                 host_work: str | None = None):
        if max_active < 1:
            raise ValueError(f"max_active must be >= 1, got {max_active!r}")
        if input_chunk < 1:
            raise ValueError(f"input_chunk must be >= 1, got {input_chunk!r}")
        if max_unwritten < 1:
            raise ValueError(f"max_unwritten must be >= 1, got {max_unwritten!r}")
        if isinstance(compression_level, bool) or not isinstance(compression_level, int) \
                or compression_level > zstandard.MAX_COMPRESSION_LEVEL:
            raise ValueError(f"compression_level must be an int <= {zstandard.MAX_COMPRESSION_LEVEL} "
                             f"(zstd; negative: faster), got {compression_level!r}")
        if idle_step_input_tokens is None:
            idle_step_input_tokens = DEFAULT_IDLE_STEP_INPUT_TOKENS.get(model.device.type,
                                                                        DEFAULT_IDLE_STEP_INPUT_TOKENS_OTHER)
        self.model = model
        self.max_active = max_active
        self.input_chunk = input_chunk
        self.max_pending_tokens = max_pending_tokens
        self.store = store if store is not None else MemoryStore()
        self.stats = EngineStats()
        self.scheduler = Scheduler(step_input_tokens, idle_step_input_tokens)
        self.executor = batch_executor(model, self.stats, host_work)
        self.offloader = Offloader(model, self.store, self.stats, self._superseded, max_unwritten, compression_level)
        self.sessions: dict[str, SessionRecord] = {}
        # Sessions with a generation, and those with queued input (in turn order).
        self._generating: dict[str, SessionRecord] = {}
        self._waiting: dict[str, SessionRecord] = {}
        self._model_lock = anyio.Lock()
        self._wake = anyio.Event()
        self._ticked = anyio.Event()  # set (and replaced) after a tick's tokens or a generation's end
        self._clock = itertools.count(1)  # orders uses for least-recently-used suspension

    # -- sessions --------------------------------------------------------------------
    @property
    def active(self) -> int:
        """Sessions holding a pool slot now."""
        return sum(1 for s in self.sessions.values() if s.live is not None)

    @property
    def unwritten(self) -> int:
        """Suspended sessions' snapshots in host memory, not (yet) in the store."""
        return self.offloader.unwritten

    async def open(self, seed: int | None = None) -> SessionRecord:
        """A new session at position 0 with an unguessable id."""
        async with self._model_lock:
            await self._make_room()
            live = self.model.session(seed=seed)
        sid = secrets.token_urlsafe(16)
        es = SessionRecord(sid, live, 0)
        self.sessions[sid] = es
        self._touch(es)
        return es

    async def resume(self, session_id: str) -> SessionRecord:
        """The session `session_id`: in the engine (live or suspended), or in
        the store (e.g. from before a restart); restored into a slot when next
        used. EngineError("unknown_session") if neither has it."""
        es = self.sessions.get(session_id)
        if es is not None:
            return es
        try:
            contents = await self.offloader.read(session_id)
        except (SnapshotNotFound, StreamgemmaError):
            raise EngineError("unknown_session", f"no session {session_id!r}") from None
        # Another request may have resumed it while we read: one SessionRecord per id.
        es = self.sessions.get(session_id)
        if es is None:
            es = self.sessions[session_id] = SessionRecord(session_id, None, contents.position)
            self.offloader.keep(session_id, contents)
        return es

    def append(self, es: SessionRecord, ids_or_text: Sequence[int] | str) -> PendingInput:
        """Queue input for `es`; returns at once. Text is tokenized now, with
        BOS when it is the session's first input. It is consumed before the
        session's next sampled token (a running generation continues from the
        new state). Await `engine.consumed(pending)` for the position after it."""
        self._check_usable(es)
        if isinstance(ids_or_text, str):
            tok = self.model.tokenizer
            if tok is None:
                raise ValueError("text input needs a tokenizer, and this model has none; send token ids")
            if not ids_or_text:
                raise ValueError("the text is empty: there is nothing to append")
            ids = tok.encode(ids_or_text, add_bos=es.position == 0 and not es.inputs)
        else:
            ids = check_token_ids(ids_or_text, self.model.config.vocab_size)
            if not ids:
                raise ValueError("no tokens to append")
        if es.queued_tokens + len(ids) > self.max_pending_tokens:
            raise EngineError("limit", f"{es.queued_tokens} tokens of this session's input are still waiting to be "
                                       f"consumed; at most {self.max_pending_tokens} may wait: wait for 'appended' "
                                       "replies")
        pending = PendingInput(ids)
        es.inputs.append(pending)
        es.queued_tokens += len(ids)
        self._waiting.setdefault(es.id, es)
        self._touch(es)
        self._wake.set()
        return pending

    async def consumed(self, pending: PendingInput) -> int:
        """Wait until `pending` (from `append`) is consumed; the session's
        position after it. Raises what consuming it raised."""
        await pending.consumed.wait()
        if pending.error is not None:
            raise pending.error
        return pending.position

    async def generate(self, es: SessionRecord, params: SamplingParams) -> TokenStream:
        """Start a generation on `es`; its tokens arrive on the returned
        stream. Queued input is consumed first. Raises EngineError
        ("generating") if one is already running, ValueError/StoppedError as
        `Session.generate` (no prompt, ended at a stop, ...)."""
        self._check_usable(es)
        if es.generation is not None:
            raise EngineError("generating", "a generation is already running on this session; cancel it first")
        if params.max_tokens is None:
            raise ValueError("the engine needs max_tokens (a bound on the generation)")
        # Validate against the state the generation will start from.
        for pending in list(es.inputs):
            await self.consumed(pending)
        if es.generation is not None:
            raise EngineError("generating", "a generation is already running on this session; cancel it first")
        async with self._model_lock:
            await self._ensure_live(es)
            generation = await anyio.to_thread.run_sync(es.live.start_generation, params)
        queue = TokenQueue()  # holds a whole generation, so the scheduler never waits on a reader
        es.generation = ActiveGeneration(generation, queue)
        self._generating[es.id] = es
        self._touch(es)
        self._wake.set()
        return TokenStream(queue, lambda: self.cancel(es))

    def cancel(self, es: SessionRecord) -> bool:
        """Cancel the running generation of `es`, if any (True if there was
        one). Its stream then ends with Done("cancelled") at the next tick; a
        token being computed is still consumed and delivered first."""
        if es.generation is None or es.generation.cancelled:
            return False
        es.generation.cancelled = True
        self._wake.set()
        return True

    async def snapshot(self, es: SessionRecord) -> int:
        """Store the state of `es` under its id (between two ticks: a
        consistent state, also mid-generation) and wait until it is stored.
        Returns its position. Raises what the store raised."""
        self._check_usable(es)
        async with self._model_lock:
            future = await self.offloader.snapshot(es.id, es.live)
            position = es.position
        if future is not None:
            await anyio.to_thread.run_sync(future.result)
        return position

    async def close(self, es: SessionRecord) -> None:
        """End `es` for good: cancel its generation, free its slot, fail its
        queued input, delete its stored snapshot."""
        if es.closed:
            return
        es.closed = True
        async with self._model_lock:  # not while a tick's worker thread uses the session
            self._finish(es, "cancelled")
            self._fail_inputs(es, EngineError("closed", "the session was closed"))
            if es.live is not None:
                es.live.close()
                es.live = None
        await self.offloader.delete(es.id)
        self.sessions.pop(es.id, None)
        self._generating.pop(es.id, None)
        self._waiting.pop(es.id, None)

    async def suspend_all(self) -> list[str]:
        """Shutdown: cancel every generation, suspend every live session and
        wait until every snapshot is stored (failed writes retried once).
        Returns the ids whose state is now in the store; one that could not
        be stored is logged as an error. Queued input is dropped."""
        async with self._model_lock:
            for es in list(self.sessions.values()):
                self._finish(es, "cancelled")
                self._fail_inputs(es, EngineError("closed", "the server is shutting down"))
                if es.live is not None:
                    try:
                        await self._suspend(es)
                    except Exception:  # noqa: BLE001 - one failed write must not lose the others
                        log.exception("could not suspend session %s", es.id)
            failed = await self.offloader.flush()
        for sid in failed:
            log.error("session %s could not be stored; it is lost when this process exits", sid)
        return [sid for sid, es in self.sessions.items()
                if es.live is None and not self.offloader.pending(sid)]

    # -- scheduler -------------------------------------------------------------------
    async def run(self) -> None:
        """The scheduler loop: ticks while there is work, sleeps otherwise.
        Runs until cancelled (an in-flight model call finishes first, so
        session state is never left half-updated)."""
        while True:
            if not (self._generating or self._waiting):
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            await self.tick()

    async def tick(self) -> None:
        """One scheduling round (see `scheduler`)."""
        async with self._model_lock:
            plan = self.scheduler.plan_input(self._generating.values(), self._waiting.values())
            for es in plan.cancelled:
                self._finish(es, "cancelled")
            riders = list(plan.riders)
            if plan.restore is not None and await self._restore_for_input(plan.restore):
                riders.append(plan.restore)
            elif plan.prefill is not None:
                started = time.perf_counter()
                await self._prefill_chunk(plan.prefill)
                self.stats.phase_seconds["prefill"] += time.perf_counter() - started
                turn = plan.prefill
                if turn.inputs and self._waiting.pop(turn.id, None) is not None:
                    self._waiting[turn.id] = turn  # its next turn comes after the others waiting
            decode = self.scheduler.plan_decode(self._generating.values(), riders)
            if decode:
                batch = [(es, es.generation) for es in decode.batch]
                tokens = await self.executor.run([active.generation for _, active in batch],
                                                 [es.live.slot for es in decode.batch],
                                                 [(es.live, es.next_input_token()) for es in decode.riders])
                started = time.perf_counter()
                for (es, active), token in zip(batch, tokens):
                    if es.generation is active:  # not ended meanwhile
                        self._deliver(es, token)
                for es in decode.riders:
                    self._input_consumed(es, 1)
                self.stats.phase_seconds["deliver"] += time.perf_counter() - started
        self._signal_delivered()
        await anyio.sleep(0)  # let the event loop run sends and new requests between ticks

    async def wait_tick(self) -> None:
        """Return after the next tick has delivered its tokens, or a generation
        has ended outside a tick (closed, shut down): a consumer of many
        streams looks at all of them once per tick instead of once per token."""
        await self._ticked.wait()

    def _signal_delivered(self) -> None:
        ticked, self._ticked = self._ticked, anyio.Event()
        ticked.set()

    async def _prefill_chunk(self, es: SessionRecord) -> None:
        pending = es.inputs[0]
        try:
            await self._ensure_live(es)
            chunk = pending.ids[pending.offset:pending.offset + self.input_chunk]
            await anyio.to_thread.run_sync(es.live.feed, chunk)
            self.stats.prefill_calls += 1
        except Exception as e:  # noqa: BLE001 - delivered to whoever awaits this input
            self._input_failed(es, e)
            return
        self._input_consumed(es, len(chunk))

    async def _restore_for_input(self, es: SessionRecord) -> bool:
        """Give `es` a slot so its input can ride along; False (its first input
        failed with the error) if that fails."""
        try:
            await self._ensure_live(es)
        except Exception as e:  # noqa: BLE001 - delivered to whoever awaits this input
            self._input_failed(es, e)
            return False
        return True

    def _input_failed(self, es: SessionRecord, error: BaseException) -> None:
        pending = es.inputs.popleft()
        es.queued_tokens -= pending.remaining
        pending.error = error
        pending.consumed.set()
        if not es.inputs:
            self._waiting.pop(es.id, None)

    def _input_consumed(self, es: SessionRecord, count: int) -> None:
        """`count` tokens of the first queued input of `es` were consumed."""
        pending = es.inputs[0]
        pending.offset += count
        es.queued_tokens -= count
        if pending.remaining <= 0:
            es.inputs.popleft()
            pending.position = es.position
            pending.consumed.set()
        if not es.inputs:
            self._waiting.pop(es.id, None)

    def _fail_inputs(self, es: SessionRecord, error: BaseException) -> None:
        self._waiting.pop(es.id, None)
        while es.inputs:
            pending = es.inputs.popleft()
            pending.error = error
            pending.consumed.set()
        es.queued_tokens = 0

    def _deliver(self, es: SessionRecord, token) -> None:
        active = es.generation
        if not active.queue.put(token):
            active.cancelled = True  # nobody is listening any more
        if token.finish_reason is not None:
            self._finish(es, token.finish_reason)
        elif active.cancelled:
            self._finish(es, "cancelled")

    def _finish(self, es: SessionRecord, reason: str) -> None:
        """End the generation of `es` (if any) with `reason`."""
        active, es.generation = es.generation, None
        if active is None:
            return
        self._generating.pop(es.id, None)
        # Text held back as a possible stop-string start is plain output after all.
        held = active.generation.flush() if reason == "cancelled" else ""
        active.queue.put(Done(reason, es.position, held))
        self._touch(es)
        self._signal_delivered()  # (also outside a tick: close, shutdown)

    # -- slots -------------------------------------------------------------------------
    async def _ensure_live(self, es: SessionRecord) -> None:
        """Give `es` a slot, restoring its state (caller holds _model_lock)."""
        if es.live is not None:
            return
        await self._make_room()
        es.live = await self.offloader.restore(es.id)

    async def _make_room(self) -> None:
        """Free a slot if max_active are taken: suspend the least recently
        used idle session (caller holds _model_lock)."""
        live = [es for es in self.sessions.values() if es.live is not None]
        if len(live) < self.max_active:
            return
        idle = [es for es in live if es.idle]
        if not idle:
            raise EngineError("capacity", f"all {self.max_active} slots are busy generating or consuming input; "
                                          "retry later")
        await self._suspend(min(idle, key=lambda es: es.last_used))

    async def _suspend(self, es: SessionRecord) -> None:
        position = es.live.position
        await self.offloader.suspend(es.id, es.live)
        es.suspended_position, es.live = position, None

    def _superseded(self, session_id: str) -> bool:
        es = self.sessions.get(session_id)
        return es is None or es.live is not None

    def _touch(self, es: SessionRecord) -> None:
        es.last_used = next(self._clock)

    def _check_usable(self, es: SessionRecord) -> None:
        if es.closed:
            raise EngineError("closed", f"session {es.id!r} is closed")
