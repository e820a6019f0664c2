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

import array
import itertools
import logging
import secrets
import time
from collections.abc import Sequence

import anyio
import anyio.to_thread

from ..errors import SnapshotError, SnapshotIdError, SnapshotNotFound
from ..sampling.params import SamplingParams
from ..session.model import Model
from ..session.store import SnapshotStore
from ..validate import check_position, check_sampling, check_seed
from . import expiry, fleet, recovery, scheduler
from .batch import batch_executor
from .inputs import DEFAULT_MAX_PENDING_TOKENS, DEFAULT_MAX_QUEUED_TEXT_BYTES, DEFAULT_MAX_QUEUED_TOKENS, InputQueues
from .journaling import DEFAULT_SNAPSHOT_EVERY, TickJournal
from .offload import DEFAULT_MAX_UNWRITTEN, SUSPEND_COMPRESSION_LEVEL, MemoryStore, Offloader
from .record import ActiveGeneration, Done, EngineError, EngineStats, PendingInput, SessionRecord
from .slots import Slots
from .stored import StoredSessions
from .streams import Deliveries, TokenQueue, TokenStream

log = logging.getLogger("streamgemma.engine")

DEFAULT_INPUT_CHUNK = 64  # tokens of queued input prefilled per tick: bounds how long decoders wait
SETTLE_WAIT_S = 5.0  # for a cancelled generation to end at a tick, before ending it outside one


class Engine:
    """Schedules many sessions of `model` onto batched decode steps.

    max_active: sessions holding a pool slot at once (the decode batch size bound); more may be open, the idle
    ones suspended to `store` (default: an in-memory store). input_chunk: tokens of queued input consumed per
    prefill. Queued input is bounded (more is refused with EngineError("limit")): max_pending_tokens for one
    session (1,048,576), max_queued_tokens for all (4,194,304), max_queued_text_bytes of text waiting to be
    tokenized, all sessions (16 MiB). input_share: the most of the scheduler's time input takes while sessions
    generate (0.15; see `scheduler`). step_input_tokens / idle_step_input_tokens: see `scheduler` (0: always
    prefill; the idle default is 4 on CUDA, 1 elsewhere). session_ttl: seconds after which a session nobody
    holds (`owner` None) and nobody used is closed, its snapshot deleted (None: never). max_unwritten,
    compression_level: see `offload`. journal: keep the store's journal (`journaling`), snapshot_every: tokens
    between snapshots. host_work: "loop" or "thread" (see `batch`; default by device). Run the scheduler with
    `await engine.run()` in a task group (it returns when cancelled); call the other methods from the same event
    loop. `stats` holds counters for monitoring.
    """

    def __init__(self, model: Model, max_active: int = 64, store: SnapshotStore | None = None,
                 input_chunk: int = DEFAULT_INPUT_CHUNK, max_pending_tokens: int = DEFAULT_MAX_PENDING_TOKENS,
                 max_queued_tokens: int = DEFAULT_MAX_QUEUED_TOKENS,
                 max_queued_text_bytes: int = DEFAULT_MAX_QUEUED_TEXT_BYTES,
                 input_share: float = scheduler.DEFAULT_INPUT_SHARE,
                 step_input_tokens: int = scheduler.DEFAULT_STEP_INPUT_TOKENS,
                 idle_step_input_tokens: int | None = None, session_ttl: float | None = None,
                 max_unwritten: int = DEFAULT_MAX_UNWRITTEN, compression_level: int = SUSPEND_COMPRESSION_LEVEL,
                 host_work: str | None = None, journal: bool = True, snapshot_every: int = DEFAULT_SNAPSHOT_EVERY):
        if max_active < 1:
            raise ValueError(f"max_active must be >= 1, got {max_active!r}")
        if input_chunk < 1:
            raise ValueError(f"input_chunk must be >= 1, got {input_chunk!r}")
        if session_ttl is not None and not session_ttl > 0:
            raise ValueError(f"session_ttl must be > 0 seconds or None (never), got {session_ttl!r}")
        if idle_step_input_tokens is None:
            idle_step_input_tokens = scheduler.IDLE_STEP_INPUT_TOKENS.get(model.device.type, 1)
        self.model = model
        self.input_chunk = input_chunk
        self.session_ttl = session_ttl
        self.store = store if store is not None else MemoryStore()
        self.stats = EngineStats()
        self.scheduler = scheduler.Scheduler(step_input_tokens, idle_step_input_tokens, input_share)
        self.inputs = InputQueues(model.tokenizer, model.config.vocab_size, max_pending_tokens, max_queued_tokens,
                                  max_queued_text_bytes)
        self.executor = batch_executor(model, self.stats, host_work)
        self.deliveries = Deliveries()  # a tick's tokens delivered, or a generation ended outside a tick
        self.journal = TickJournal(self.store.journal() if journal else None, self.stats, snapshot_every,
                                   delivered=self.deliveries.signal)
        self.offloader = Offloader(model, self.store, self.stats, self._superseded, max_unwritten, compression_level,
                                   self.journal.journal)
        self.sessions: dict[str, SessionRecord] = {}
        self.unsaved: list[str] = []  # after `suspend_all`: sessions it could not store
        self._generating: dict[str, SessionRecord] = {}  # sessions with a generation
        self._model_lock = anyio.Lock()
        self.slots = Slots(max_active, self.sessions, self.scheduler, self.offloader, self._model_lock)
        self.stored = StoredSessions(self.sessions, self.offloader, self.journal)
        self._wake = anyio.Event()
        self._clock = itertools.count(1)  # orders uses for least-recently-used suspension

    # -- sessions --------------------------------------------------------------------
    @property
    def max_active(self) -> int:
        return self.slots.max_active

    @property
    def active(self) -> int:
        """Sessions holding a pool slot now."""
        return self.slots.active

    @property
    def unwritten(self) -> int:
        """Suspended sessions' snapshots in host memory, not (yet) in the store."""
        return self.offloader.unwritten

    async def open(self, seed: int | None = None, contents=None, durable: bool = True) -> SessionRecord:
        """A new session with an unguessable id, at position 0 or starting
        from `contents` (a decoded snapshot, e.g. a cached prefix; copied,
        not consumed). seed: None or an int in [-2**63, 2**64) (what a snapshot stores).
        durable=False: not snapshotted at open nor journaled (a session no client
        reopens after a crash, like the HTTP API's); suspensions still store it."""
        check_seed(seed)
        sid = secrets.token_urlsafe(16)
        if self.journal.enabled:  # own it first: a store that is down fails this at once
            await self.offloader.claim(sid)
        await self.wait_input_turn()
        async with self._model_lock:
            await self.slots.make_room(wait=True)
            async with self.scheduler.input_work(self._generating):
                live = (self.model.session(seed=seed) if contents is None
                        else await anyio.to_thread.run_sync(self.model.restore, contents))
            if stored := durable and self.journal.enabled:  # recovery starts from a stored snapshot
                self.slots.hold()  # its slot counts while the store writes; nothing is kept if that fails
        if not durable:
            self.journal.ephemeral.add(sid)
        if stored:
            try:
                await self.offloader.store_new(sid, live, self._model_lock)
            finally:
                await self.slots.unhold()
        es = self.sessions[sid] = SessionRecord(sid, live, live.position)
        self._touch(es)
        return es

    async def capture(self, es: SessionRecord):
        """The state of `es` copied to host memory (`Session.capture`),
        between two ticks; restored into a slot first if suspended."""
        self._check_usable(es)
        if es.live is None:
            await self.wait_input_turn()
        async with self._model_lock:
            self._check_usable(es)
            await self.journal.drain()  # what it reports (e.g. `open` with since) must be durable
            await self._ensure_live(es)
            return await anyio.to_thread.run_sync(es.live.capture)

    async def resume(self, session_id: str) -> SessionRecord:
        """The session `session_id`: in the engine (live or suspended), or in
        the store (e.g. from before a restart); restored into a slot when next
        used. EngineError("unknown_session") if neither has it,
        EngineError("snapshot_error") if its snapshot is damaged or of
        another model. A generation being cancelled ends first, so the
        session's position is final when this returns."""
        es = await self.stored.resume(session_id, self._resume_stored)
        if es.generation is not None and es.generation.cancelled:
            await self._settle(es)  # so the position reported is final
        return es

    async def _resume_stored(self, session_id: str) -> SessionRecord:
        """Register `session_id` from the store, its journal replayed."""
        try:
            await self.wait_input_turn()
            async with self.scheduler.input_work(self._generating):
                try:
                    contents = await self.offloader.read(session_id)
                    self.journal.claimed(session_id)
                    records = await self.journal.read(session_id, contents.position)
                except BaseException:  # (damaged, cancelled, ...): the lease must not stay held, renewed forever
                    await self.offloader.release(session_id)
                    raise
        except (SnapshotNotFound, SnapshotIdError):
            raise EngineError("unknown_session", "no such session") from None
        except SnapshotError as e:
            raise EngineError("snapshot_error", f"the stored session cannot be restored: {e} (close it to "
                                                "delete it)") from None
        if not records:
            es = self.sessions[session_id] = SessionRecord(session_id, None, contents.position)
            self.offloader.keep(session_id, contents)  # (restored into a slot when next used)
            return es
        try:  # it consumed more than its snapshot holds: replay the journal
            live = await recovery.replayed(contents, records, self.model.restore, self.slots, self.scheduler,
                                           self._generating, self._model_lock, self.stats)
        except BaseException as e:  # (a gap in the records; no slot free to replay into; ...)
            with anyio.CancelScope(shield=True):  # nothing half-replayed stays; the store keeps it
                await self.offloader.release(session_id)
            if not isinstance(e, SnapshotError):
                raise
            raise EngineError("snapshot_error", f"the stored session cannot be restored: {e} "
                                                "(close it to delete it)") from None
        es = self.sessions[session_id] = SessionRecord(session_id, live, live.position)
        self._touch(es)
        return es

    def append(self, es: SessionRecord, ids_or_text: Sequence[int] | array.array | str) -> PendingInput:
        """Queue input for `es`; returns at once. Text gets BOS first when it
        is the session's first input; short text is tokenized now, longer text
        in the session's next input turn. It is consumed before the session's
        next sampled token (a running generation continues from the new state).
        Await `engine.consumed(pending)` for the position after it. Raises
        EngineError("limit") past a bound on queued input (see the class)."""
        self._check_usable(es)
        pending = self.inputs.add(es, ids_or_text)
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
        requested = time.monotonic()
        self._check_usable(es)
        if es.generation is not None:
            raise EngineError("generating", "a generation is already running on this session; cancel it first")
        if params.max_tokens is None:
            raise ValueError("the engine needs max_tokens (a bound on the generation)")
        check_sampling(params)
        for pending in list(es.inputs):  # validated against the state the generation will start from
            await self.consumed(pending)
        if es.generation is not None:
            raise EngineError("generating", "a generation is already running on this session; cancel it first")
        check_position(es.position + params.max_tokens, "max_tokens")
        if es.live is None:
            await self.wait_input_turn()
        async with self._model_lock:
            self._check_usable(es)  # (closed while its input was consumed)
            await self._ensure_live(es)
            generation = await anyio.to_thread.run_sync(es.live.start_generation, params)
            if params.seed is not None:  # the reseeded stream, journaled with the next tick
                self.journal.record(es.id, es.live, "rng")
        queue = TokenQueue()  # holds a whole generation, so the scheduler never waits on a reader
        active = es.generation = ActiveGeneration(generation, queue, requested)
        self._generating[es.id] = es
        self._touch(es)
        self._wake.set()
        # Closing the stream cancels this generation only: by then a later one may run on the session.
        return TokenStream(queue, lambda: es.generation is active and self.cancel(es))

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
            self._check_usable(es)  # (closed while we waited)
            await self.journal.drain()  # the tokens its position counts went out first
            future = await self.offloader.snapshot(es.id, es.live)
            position = es.position
        if future is not None:
            await anyio.to_thread.run_sync(future.result)
        return position

    async def close(self, es: SessionRecord, delete: bool = True) -> None:
        """End `es` for good: cancel its generation, free its slot, fail its queued
        input, delete its stored snapshot (delete=False: keep it, for another worker)."""
        if es.closed:
            return
        es.closed = True
        async with self._model_lock:  # not while a tick's worker thread uses the session
            await self.journal.submit()  # records made since the last tick (a seeded generate's) go with them:
            await self.journal.drain()  # its last tokens go out (and its records land) before it ends
            self._finish(es, "cancelled", now=True)
            self.inputs.drop(es, EngineError("closed", "the session was closed"))
            if es.live is not None:
                es.live.close()
                es.live = None
        # Gone from the engine before the store's deletes: if they fail, `discard` retries them.
        self.sessions.pop(es.id, None)
        self._generating.pop(es.id, None)
        if delete:
            await self.stored.delete(es.id)
        else:
            self.offloader.forget(es.id)
            self.journal.forget(es.id)

    async def discard(self, session_id: str) -> None:
        """`close` a session by id that may not be open: one only in the store,
        also one whose snapshot cannot be restored (damaged, or of another
        model) is deleted. EngineError("unknown_session") if there is none."""
        es = await self.stored.resumed(session_id)  # (a resume reading it: close what it registers)
        if es is not None:
            await self.close(es)
            return
        try:
            await self.stored.delete(session_id, missing_ok=False)
        except (SnapshotNotFound, SnapshotIdError):
            raise EngineError("unknown_session", "no such session") from None

    async def detach(self, es: SessionRecord) -> None:
        """The client holding `es` is gone: cancel its generation and drop its
        queued input (the client was never told it landed); returns once the
        generation has ended, so the session's position is final."""
        self.cancel(es)
        async with self._model_lock:  # not while a tick consumes its input
            self.stats.dropped_inputs += self.inputs.drop(
                es, EngineError("closed", "the connection ended before this input was consumed"))
        await self._settle(es)
        await self.journal.drain()  # its position is durable, as reported next
        es.last_active = time.monotonic()

    async def _settle(self, es: SessionRecord) -> None:
        """Wait for the cancelled generation of `es` to end (at the next tick);
        end it here if no tick comes (the scheduler has stopped)."""
        if es.generation is not None:
            with anyio.move_on_after(SETTLE_WAIT_S):
                await es.generation.ended.wait()
        if es.generation is not None:
            async with self._model_lock:
                await self.journal.drain()
                self._finish(es, "cancelled", now=True)

    async def suspend_all(self) -> list[str]:
        """Shutdown: cancel every generation, suspend every live session and
        wait until every snapshot is stored (failed writes retried once).
        Returns the ids whose state is now in the store; those that could not
        be stored are logged as errors and listed in `unsaved`. Queued input
        is dropped."""
        async with self._model_lock:
            await self.journal.drain(self.journal.shutdown_retry_s)  # (here: the committer has stopped)
            for es in list(self.sessions.values()):
                self._finish(es, "cancelled", now=True)
                self.inputs.drop(es, EngineError("closed", "the server is shutting down"))
                if es.live is not None:
                    try:
                        await self.slots.suspend(es)
                    except Exception:  # noqa: BLE001 - one failed write must not lose the others
                        log.exception("could not suspend session %s", es.id)
            failed = await self.offloader.flush()
        for sid in failed:
            log.error("session %s could not be stored; it is lost when this process exits", sid)
        self.unsaved = [sid for sid, es in self.sessions.items() if es.live is not None or sid in failed]
        return [sid for sid, es in self.sessions.items()
                if es.live is None and not self.offloader.pending(sid)]

    # -- scheduler -------------------------------------------------------------------
    async def run(self) -> None:
        """The scheduler loop: ticks while there is work, sleeps otherwise;
        with a session_ttl, also expires unused sessions. Runs until
        cancelled (an in-flight model call finishes first, so session state
        is never left half-updated)."""
        async with anyio.create_task_group() as tg:
            if self.session_ttl is not None:
                tg.start_soon(expiry.expire_periodically, self)
            if self.store.coordinated:
                tg.start_soon(fleet.serve_fleet, self)
            if self.journal.enabled:
                tg.start_soon(self.journal.run)
            while True:
                if not (self._generating or self.inputs.waiting):
                    self._wake = anyio.Event()
                    await self._wake.wait()
                    continue
                await self.tick()

    async def tick(self) -> None:
        """One scheduling round (see `scheduler`)."""
        async with self._model_lock:
            try:
                plan = self.scheduler.plan_input(self._generating.values(), self.inputs.waiting.values(),
                                                 time.monotonic())
                for es in plan.cancelled:
                    self._finish(es, "cancelled")
                riders = list(plan.riders)
                self.slots.riding = {es.id for es in riders}  # kept in their slots if the input turn can make room
                turn = plan.restore or plan.prefill
                input_seconds = 0.0  # this tick's input work, for the scheduler's input budget
                if turn is not None:
                    started = time.monotonic()
                    if plan.restore is not None:
                        if await self._restore_for_input(turn):
                            riders.append(turn)
                    else:
                        await self._input_turn(turn)
                    self.inputs.next_turn(turn)  # (a restore too: else two sessions could swap slots forever)
                    input_seconds = time.monotonic() - started
                    self.stats.phase_seconds["prefill"] += input_seconds
                decode = self.scheduler.plan_decode(self._generating.values(), riders)
                if decode:
                    batch = [(es, es.generation) for es in decode.batch]
                    started = time.monotonic()
                    inputs = [(es.live, es.next_input_token()) for es in decode.riders]
                    tokens = await self.executor.run([active.generation for _, active in batch],
                                                     [es.live.slot for es in decode.batch], inputs)
                    input_seconds += self.scheduler.decoded(len(batch), len(decode.riders),
                                                            time.monotonic() - started)
                    started = time.perf_counter()
                    self.journal.tokens(batch, tokens)  # journaled; to their streams once durable
                    for (es, _), token in zip(batch, tokens):
                        if token.finish_reason is not None:
                            self._finish(es, token.finish_reason)
                    for es, (_, token) in zip(decode.riders, inputs):
                        self.journal.record(es.id, es.live, "step", [token])
                        self.journal.consumed(es.id, self.inputs.consumed(es, 1))
                    self.stats.phase_seconds["deliver"] += time.perf_counter() - started
                if plan.decoding and input_seconds:
                    self.scheduler.charge_input(input_seconds, time.monotonic())
            finally:  # (cancelled mid-tick too: what it recorded is submitted, so its waiters are answered)
                self.slots.riding = set()
                with anyio.CancelScope(shield=True):
                    await self.journal.submit()  # its outputs reach clients once it is durable
            for es in self.journal.due(self.sessions):  # bound the replay: a background snapshot
                await self.offloader.background(es.id, es.live)
        if not self.journal.enabled:  # (else the committer signals, once the tokens went out)
            self.deliveries.signal()
        await self.journal.room()  # the device runs ahead of the store by a tick or two at most
        await anyio.sleep(0)  # let the event loop run sends and new requests between ticks

    async def _input_turn(self, es: SessionRecord) -> None:
        """Tokenize the first queued input of `es` if it is text, else consume
        one chunk of its queued ids (across appends) in one prefill."""
        text = self.inputs.text_to_tokenize(es)
        try:
            if text is not None:
                self.inputs.tokenized(es, text, await anyio.to_thread.run_sync(self.inputs.tokenize, text))
                return
            if not await self.slots.ensure_live(es):
                return  # (no slot free this tick: a later one)
            chunk = self.inputs.take(es, self.input_chunk)
            await anyio.to_thread.run_sync(es.live.feed, chunk)
            self.stats.prefill_calls += 1
        except Exception as e:  # noqa: BLE001 - delivered to whoever awaits this input
            self._input_failed(es, e)
            return
        self.journal.record(es.id, es.live, "feed", chunk)
        self.journal.consumed(es.id, self.inputs.consumed(es, len(chunk)))

    async def _restore_for_input(self, es: SessionRecord) -> bool:
        """Give `es` a slot so its input can ride along; False if none is free, or that failed."""
        try:
            return await self.slots.ensure_live(es)
        except Exception as e:  # noqa: BLE001 - delivered to whoever awaits this input
            self._input_failed(es, e)
            return False

    def _input_failed(self, es: SessionRecord, error: BaseException) -> None:
        if isinstance(error, EngineError) and error.code == "capacity" and self.inputs.started(es):
            return  # part of it landed: it waits for a slot (a refusal would hide that part)
        self.inputs.fail_first(es, error)
        self.stats.dropped_inputs += 1

    async def position(self, es: SessionRecord) -> int:
        """The position of `es` between two ticks, counting only tokens its stream was given."""
        async with self._model_lock:
            await self.journal.drain()
            return es.position

    async def expire(self) -> int:
        """`expiry.expire`: close sessions nobody holds or used for `session_ttl` s, delete
        snapshots not written for as long; how many. `run` does it periodically."""
        return await expiry.expire(self) if self.session_ttl is not None else 0

    def _finish(self, es: SessionRecord, reason: str, now: bool = False) -> None:
        """End the generation of `es` (if any) with `reason`; its Done follows its
        tokens once they are durable (now: at once, after `journal.drain`)."""
        active, es.generation = es.generation, None
        if active is None:
            return
        self._generating.pop(es.id, None)
        # Text held back as a possible stop-string start is plain output after all.
        held = active.generation.flush() if reason == "cancelled" else ""
        self._touch(es)
        self.journal.end(es.id, active, Done(reason, es.position, held), now)

    def charge_input(self, seconds: float) -> None:
        """Work for a client outside the ticks (its frames, open, resume): input while sessions generate."""
        self.scheduler.charge_outside(self._generating.values(), seconds, time.monotonic())

    async def wait_input_turn(self) -> None:
        """While sessions generate, wait until the input budget allows work not queued for a tick."""
        await self.scheduler.wait_input_turn(self._generating)

    async def _ensure_live(self, es: SessionRecord) -> None:
        """Restore `es` for a client's request (under the model lock): input work, as a tick's restore is."""
        if es.live is None:
            async with self.scheduler.input_work(self._generating):
                await self.slots.ensure_live(es, wait=True)

    def _superseded(self, session_id: str) -> bool:
        es = self.sessions.get(session_id)
        return es is None or es.live is not None

    def _touch(self, es: SessionRecord) -> None:
        es.last_used = next(self._clock)
        es.last_active = time.monotonic()

    def _check_usable(self, es: SessionRecord) -> None:
        if es.closed:
            raise EngineError("closed", f"session {es.id!r} is closed")
