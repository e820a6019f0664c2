"""`Engine`: continuous batching of many sessions of one model.

A tick, in order:
1. Generations cancelled since the last tick end (Done("cancelled")).
2. Short input rides along with the decoders: while some session is
   generating (so a decode runs this tick anyway), a live session whose
   pending input is at most `step_input_tokens` tokens consumes one of them
   as an extra row of that decode (what `Session.step` does), at no cost to
   the others. When nobody generates, input of at most
   `idle_step_input_tokens` tokens (CUDA: 4, CPU: 1) is consumed the same
   way, in a decode of input rows only. Otherwise one chunk (`prefill_chunk` tokens)
   of appended input is consumed for one session with the parallel path:
   the sessions with pending input take turns (round robin), so a long
   append never stalls the decoders for more than one chunk, and every
   waiting session progresses; a suspended session whose turn it is and
   whose input is short is restored and rides along. (On a GPU a short
   prefill costs ~20 ms of launches, while a decode step costs ~3 ms and a
   row in a running one almost nothing: a transcript line appended to each
   of 256 generating sessions would otherwise stall them all for seconds,
   and a one-token append to an idle engine would cost a prefill.)
3. Every session that is generating and has no pending input advances by
   one token (fairness: all of them, every tick; input appended to a
   generating session is consumed before its next token, so it sits out
   the ticks until then). The tick samples all their rows at once
   (`sampling.sample_rows`: each row with its session's parameters and
   random stream, the noise of all rows in one kernel on CUDA, one
   device-to-host read of the ids for the whole batch), runs ONE
   `model.decode` over them, copies the logits rows the sessions keep in ONE
   copy (each session's logits are then a row of that copy), and records
   each token in its session (detokenizer, stop strings). On CUDA the decode
   takes the sampled ids from the device, so it is launched before they
   reach the host, and the host records the tokens while the GPU runs the
   decode: the device goes from one step to the next without waiting for
   the host. (On CUDA this host work runs on the event loop's thread and
   only the wait for the sampled ids in a worker thread; on the CPU, where
   the model's arithmetic is the cost, all of it in a worker.)
4. Tokens are delivered to their streams in the event loop.
A session gets exactly the tokens `Session.generate` would give it with the
same seed, whatever else is in the batch.

Only `max_active` sessions hold a slot of the model's state pool. When
another one needs a slot, the least recently used idle session (no
generation, no pending input) is suspended: its state is copied to host
memory (`Session._capture`, ~1 ms) and its slot freed at once; encoding the
snapshot (msgpack, zstd at `compression_level`) and `store.put` happen in
a writer thread (write-behind, one thread, so writes of one session land in
order). Until its write has succeeded the engine keeps the copy, and a
session resumed meanwhile is restored from it; a failed write is logged
and the copy kept (retried when the writer must make room, by `snapshot`
and by `suspend_all`), so no session is lost while the process lives. At
most `max_unwritten` copies wait: a suspension beyond that waits for the
writer (and is refused, EngineError "capacity", if all of them have failed
twice). `snapshot` and `suspend_all` return once their writes are stored;
`close` deletes after any queued write. A suspended session is restored
the next time it is used (`resume` keeps what it read from the store for
that, so the store is read and decoded once per resumption).

Every model call runs in a worker thread (anyio.to_thread), one at a time
(`_model_lock`), so the event loop stays free to read and write sockets.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import secrets
import time
from typing import Sequence

import anyio
import anyio.lowlevel
import anyio.to_thread
import torch
import zstandard

from ..session import snapshot as snapshot_format
from ..errors import SnapshotNotFound, StreamgemmaError
from ..session.model import Model
from ..sampling.sampler import PendingIds
from ..sampling.params import SamplingParams
from ..session.session import Generation, Session, check_token_ids, sampled_vocab
from ..types import Token
from ..session.store import SnapshotStore, validate_session_id

log = logging.getLogger("streamgemma.serve.engine")

DEFAULT_PREFILL_CHUNK = 64  # tokens of appended input per tick: bounds how long decoders wait
DEFAULT_MAX_PENDING_TOKENS = 1 << 20  # appended but unconsumed tokens per session: bounds host memory
DEFAULT_STEP_INPUT_TOKENS = 16  # pending input this short rides along in decode rows (one token per tick)
# ... and when nobody generates: on CUDA a decode step (~3 ms, a CUDA graph) per
# token beats a prefill call (~20 ms of launches) up to about 4 tokens; on the
# CPU both cost about the model's arithmetic, so only a single token (where a
# decode row and a prefill cost the same) takes a decode row.
DEFAULT_IDLE_STEP_INPUT_TOKENS = {"cuda": 4}
DEFAULT_IDLE_STEP_INPUT_TOKENS_OTHER = 1
DEFAULT_MAX_UNWRITTEN = 32  # suspended sessions' host copies waiting for the writer: bounds host memory
# Suspensions' snapshots skip entropy coding: the resume path decompresses 5-8x
# faster and the writer compresses ~5x faster, for files ~15-25% larger
# (bench/NOTES.md, "Resume"). Any level makes a valid snapshot.
SUSPEND_COMPRESSION_LEVEL = -1
_PRELOADED = 8  # stored sessions read by `resume` and kept for their restore


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


class _PendingInput:
    """Token ids appended to a session and not yet consumed."""

    def __init__(self, ids: list[int]):
        self.ids = ids
        self.offset = 0  # ids[:offset] are consumed
        self.consumed = anyio.Event()
        self.position = -1  # the session's position once all ids are consumed
        self.error: BaseException | None = None


class _TokenQueue:
    """One generation's tokens (then its `Done`) from the scheduler to the
    reader: a deque, and an event made only while the reader waits. (anyio's
    memory object streams take a scheduling round per item; with 256 streams
    at hundreds of tokens/s each that was a large share of the server's time.)
    Unbounded, but a generation puts at most max_tokens + 1 items."""

    def __init__(self):
        self.items: collections.deque = collections.deque()
        self.reader_gone = False
        self._wakeup: anyio.Event | None = None

    def put(self, item: object) -> bool:
        """Queue `item`; False (and nothing queued) if the reader has gone."""
        if self.reader_gone:
            return False
        self.items.append(item)
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None
        return True

    async def get(self) -> object:
        while not self.items:
            self._wakeup = anyio.Event()
            await self._wakeup.wait()
        return self.items.popleft()


class _ActiveGeneration:
    """A generation the scheduler is advancing, and where its tokens go."""

    def __init__(self, generation: Generation, queue: _TokenQueue):
        self.generation = generation
        self.queue = queue
        self.cancelled = False


class EngineSession:
    """A session managed by an `Engine`: live in a pool slot, or suspended in
    the engine's store. Use it through the engine's methods."""

    def __init__(self, session_id: str, live: Session | None, position: int):
        self.id = session_id
        self.live = live
        self._position = position
        self.inputs: collections.deque[_PendingInput] = collections.deque()
        self.generation: _ActiveGeneration | None = None
        self.last_used = 0
        self.closed = False
        self.owner: object | None = None  # the connection attached to it, if any

    @property
    def position(self) -> int:
        """Tokens consumed so far."""
        return self.live.position if self.live is not None else self._position

    @property
    def idle(self) -> bool:
        return self.generation is None and not self.inputs

    def __repr__(self) -> str:
        return f"EngineSession({self.id!r}, position={self.position}, {'live' if self.live else 'suspended'})"


class TokenStream:
    """The tokens of one generation, as an async iterator of `Token`; after
    it ends, `done` holds the `Done`. Closing it early (aclose, or leaving an
    `async for`) cancels the generation."""

    def __init__(self, engine: "Engine", session: EngineSession, queue: _TokenQueue):
        self._engine = engine
        self._session = session
        self._queue = queue
        self.done: Done | None = None

    def __aiter__(self) -> "TokenStream":
        return self

    async def __anext__(self) -> Token:
        if self.done is not None:
            raise StopAsyncIteration
        if self._queue.reader_gone:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, Done):
            self.done = item
            self._queue.reader_gone = True
            raise StopAsyncIteration
        return item

    @property
    def ready(self) -> bool:
        """Whether tokens (or the end) are waiting to be taken."""
        return self.done is None and bool(self._queue.items)

    @property
    def ending(self) -> bool:
        """Whether the generation's end is among the items waiting: taking
        them now ends the stream."""
        items = self._queue.items
        return self.done is None and bool(items) and isinstance(items[-1], Done)

    def take_ready(self) -> list[Token]:
        """The tokens already produced and not yet taken, without waiting
        (possibly none). When the generation's end is among them, `done` is
        set and iteration stops after them. Lets a writer send every token
        that is ready in one frame."""
        tokens: list[Token] = []
        items = self._queue.items
        while self.done is None and items:
            item = items.popleft()
            if isinstance(item, Done):
                self.done = item
                self._queue.reader_gone = True
                break
            tokens.append(item)
        return tokens

    async def aclose(self) -> None:
        """Stop consuming: the generation is cancelled (if still running)."""
        if self.done is None:
            self._engine.cancel(self._session)
        self._queue.reader_gone = True
        await anyio.lowlevel.checkpoint()


class _MemoryStore(SnapshotStore):
    """Snapshots in a dict: the store of an engine given none. Sessions
    survive suspension, not the process."""

    def __init__(self):
        self._blobs: dict[str, bytes] = {}

    def put(self, session_id: str, blob: bytes) -> None:
        self._blobs[validate_session_id(session_id)] = bytes(blob)

    def get(self, session_id: str) -> bytes:
        try:
            return self._blobs[validate_session_id(session_id)]
        except KeyError:
            raise SnapshotNotFound(f"no snapshot for session {session_id!r}") from None

    def delete(self, session_id: str) -> None:
        if self._blobs.pop(validate_session_id(session_id), None) is None:
            raise SnapshotNotFound(f"no snapshot for session {session_id!r}")

    def list(self) -> list[str]:
        return sorted(self._blobs)


class _Write:
    """A suspended session's snapshot on its way to the store: the captured
    state, kept in memory until `future` (encode + store.put, in the writer
    thread) has succeeded; then `contents` is None (the store has it)."""

    def __init__(self, contents: snapshot_format.SnapshotContents, future: concurrent.futures.Future):
        self.contents: snapshot_format.SnapshotContents | None = contents
        self.future = future
        future.add_done_callback(self._done)

    def _done(self, future: concurrent.futures.Future) -> None:  # in the writer thread
        if future.exception() is None:
            self.contents = None

    @property
    def written(self) -> bool:
        return self.future.done() and self.future.exception() is None

    @property
    def failed(self) -> bool:
        return self.future.done() and self.future.exception() is not None


def _log_failed_write(session_id: str, store: SnapshotStore, future: concurrent.futures.Future) -> None:
    error = future.exception()
    if error is not None:
        log.error("could not write session %s to %r; its state stays in memory (the write is retried later)",
                  session_id, store, exc_info=error)


class Engine:
    """Schedules many sessions of `model` onto batched decode steps.

    max_active: sessions holding a pool slot at once (the decode batch size
    bound); more may be open, the idle ones suspended to `store` (default: an
    in-memory store). prefill_chunk: tokens of appended input consumed per
    tick. max_pending_tokens: input appended to one session and not yet
    consumed (more is refused with EngineError("limit")). step_input_tokens:
    pending input at most this long is consumed one token per tick in the
    decode batch while others generate (0: always prefill).
    idle_step_input_tokens: the same when nobody generates (default: 4 on
    CUDA, 1 elsewhere; 0: always prefill). max_unwritten: suspended sessions
    whose snapshots may wait in host memory for the background writer (each
    holds a copy of its state: at most a slot's size plus the logits).
    compression_level: zstd level of the snapshots the engine writes. Run
    the scheduler with `await engine.run()` in a task group (it returns when
    cancelled); call the other methods from the same event loop.

    Counters for monitoring: `phase_seconds` (where the scheduler's time
    goes; on the CPU "decode" includes the sampling, which runs with it in a
    worker thread), `decode_calls`, `decoded_tokens` (generated),
    `decoded_input_tokens` (input consumed in decode rows), `prefill_calls`,
    `suspensions`, `resumptions`; `unwritten` (snapshots waiting for or
    failed in the writer).
    """

    def __init__(self, model: Model, max_active: int = 64, store: SnapshotStore | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, max_pending_tokens: int = DEFAULT_MAX_PENDING_TOKENS,
                 step_input_tokens: int = DEFAULT_STEP_INPUT_TOKENS, idle_step_input_tokens: int | None = None,
                 max_unwritten: int = DEFAULT_MAX_UNWRITTEN, compression_level: int = SUSPEND_COMPRESSION_LEVEL):
        if max_active < 1:
            raise ValueError(f"max_active must be >= 1, got {max_active!r}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk!r}")
        if idle_step_input_tokens is None:
            idle_step_input_tokens = DEFAULT_IDLE_STEP_INPUT_TOKENS.get(model.device.type,
                                                                        DEFAULT_IDLE_STEP_INPUT_TOKENS_OTHER)
        for name, value in (("step_input_tokens", step_input_tokens),
                            ("idle_step_input_tokens", idle_step_input_tokens)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0 (0: always prefill), got {value!r}")
        if max_unwritten < 1:
            raise ValueError(f"max_unwritten must be >= 1, got {max_unwritten!r}")
        if isinstance(compression_level, bool) or not isinstance(compression_level, int) \
                or compression_level > zstandard.MAX_COMPRESSION_LEVEL:
            raise ValueError(f"compression_level must be an int <= {zstandard.MAX_COMPRESSION_LEVEL} "
                             f"(zstd; negative: faster), got {compression_level!r}")
        self.step_input_tokens = step_input_tokens
        self.idle_step_input_tokens = idle_step_input_tokens
        self.max_unwritten = max_unwritten
        self.compression_level = compression_level
        self._host_work_in_loop = model.device.type == "cuda"  # see _decode
        self.model = model
        self.max_active = max_active
        self.store = store if store is not None else _MemoryStore()
        self.prefill_chunk = prefill_chunk
        self.max_pending_tokens = max_pending_tokens
        self.sessions: dict[str, EngineSession] = {}
        # Sessions with a generation, and those with pending input (in turn
        # order): a tick looks at these, not at every open session.
        self._generating: dict[str, EngineSession] = {}
        self._waiting: dict[str, EngineSession] = {}
        self._model_lock = anyio.Lock()
        self._wake = anyio.Event()
        self._ticked = anyio.Event()  # set (and replaced) after a tick's tokens or a generation's end
        self._clock = itertools.count(1)  # orders uses for least-recently-used suspension
        # The last tick's copy of the logits [B, V] and its rows, each the `_logits`
        # of the session in that row (worker thread only).
        self._kept: torch.Tensor | None = None
        self._kept_rows: tuple[torch.Tensor, ...] = ()
        self._kept_sessions: list[Session] = []
        # Write-behind of suspended sessions: one writer thread, so writes (and
        # deletes) of one id reach the store in the order they were queued.
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streamgemma-writer")
        self._unwritten: dict[str, _Write] = {}
        # State `resume` read from the store, kept for the restore that usually follows.
        self._preloaded: collections.OrderedDict[str, snapshot_format.SnapshotContents] = collections.OrderedDict()
        # Where the scheduler's time goes, cumulative seconds (monitoring):
        # "prefill" (prefill chunks), "sample" (issuing the sampling), "wait"
        # (for the sampled ids: the device's time, GIL released), "decode"
        # (decode call, logits copy, accepting tokens), "deliver" (to streams).
        self.phase_seconds: dict[str, float] = dict.fromkeys(("prefill", "sample", "wait", "decode", "deliver"), 0.0)
        self.decode_calls = 0
        self.decoded_tokens = 0
        self.decoded_input_tokens = 0
        self.prefill_calls = 0
        self.suspensions = 0
        self.resumptions = 0

    # -- sessions --------------------------------------------------------------------
    @property
    def active(self) -> int:
        """Sessions holding a pool slot now."""
        return sum(1 for s in self.sessions.values() if s.live is not None)

    @property
    def unwritten(self) -> int:
        """Suspended sessions' snapshots in host memory, not (yet) in the store."""
        return sum(1 for w in self._unwritten.values() if not w.written)

    async def open(self, seed: int | None = None) -> EngineSession:
        """A new session at position 0 with an unguessable id."""
        async with self._model_lock:
            await self._make_room()
            live = self.model.session(seed=seed)
        sid = secrets.token_urlsafe(16)
        es = EngineSession(sid, live, 0)
        self.sessions[sid] = es
        self._touch(es)
        return es

    async def resume(self, session_id: str) -> EngineSession:
        """The session `session_id`: already in the engine (live or suspended),
        or stored in the store (e.g. by an engine before a restart). It is
        restored into a slot when next used. EngineError("unknown_session")
        if neither has it."""
        es = self.sessions.get(session_id)
        if es is not None:
            return es
        try:
            validate_session_id(session_id)
            blob = await anyio.to_thread.run_sync(self.store.get, session_id)
        except (SnapshotNotFound, StreamgemmaError):
            raise EngineError("unknown_session", f"no session {session_id!r}") from None
        contents = await anyio.to_thread.run_sync(self._decode_snapshot, blob)
        # Another request may have resumed it while we read: there is one EngineSession per id.
        es = self.sessions.get(session_id)
        if es is None:
            es = EngineSession(session_id, None, contents.position)
            self.sessions[session_id] = es
            # Kept for the restore that usually follows (a few at most: bounded memory).
            self._preloaded[session_id] = contents
            while len(self._preloaded) > _PRELOADED:
                self._preloaded.popitem(last=False)
        return es

    def append(self, es: EngineSession, ids_or_text: Sequence[int] | str) -> _PendingInput:
        """Queue input for `es`; returns at once. Text is tokenized now, with
        BOS when it is the session's first input. The input is consumed
        before the session's next sampled token (also during a generation:
        the generation continues from the new state). Await
        `engine.consumed(pending)` for the position after it."""
        self._check_usable(es)
        if isinstance(ids_or_text, str):
            tok = self.model.tokenizer
            if tok is None:
                raise ValueError("text input needs a tokenizer, and this model has none; send token ids")
            if not ids_or_text:
                raise ValueError("the text is empty: there is nothing to append")
            first = es.position == 0 and not es.inputs
            ids = tok.encode(ids_or_text, add_bos=first)
        else:
            ids = check_token_ids(ids_or_text, self.model.config.vocab_size)
            if not ids:
                raise ValueError("no tokens to append")
        queued = sum(len(p.ids) - p.offset for p in es.inputs)
        if queued + len(ids) > self.max_pending_tokens:
            raise EngineError("limit", f"{queued} tokens of this session's input are still waiting to be consumed; "
                                       f"at most {self.max_pending_tokens} may wait: wait for 'appended' replies")
        pending = _PendingInput(ids)
        es.inputs.append(pending)
        self._waiting.setdefault(es.id, es)
        self._touch(es)
        self._wake.set()
        return pending

    async def consumed(self, pending: _PendingInput) -> int:
        """Wait until `pending` (from `append`) is consumed; the session's
        position after it. Raises what consuming it raised."""
        await pending.consumed.wait()
        if pending.error is not None:
            raise pending.error
        return pending.position

    async def generate(self, es: EngineSession, params: SamplingParams) -> TokenStream:
        """Start a generation on `es`; its tokens arrive on the returned
        stream. Pending input is consumed first. Raises EngineError
        ("generating") if one is already running, ValueError/StoppedError as
        `Session.generate` (no prompt, ended at a stop, ...)."""
        self._check_usable(es)
        if es.generation is not None:
            raise EngineError("generating", "a generation is already running on this session; cancel it first")
        if params.max_tokens is None:
            raise ValueError("the engine needs max_tokens (a bound on the generation)")
        # Validate against the state the generation will start from: wait for
        # the scheduler to consume pending input (in chunks, between ticks).
        for pending in list(es.inputs):
            await self.consumed(pending)
        if es.generation is not None:
            raise EngineError("generating", "a generation is already running on this session; cancel it first")
        async with self._model_lock:
            await self._ensure_live(es)
            generation = await anyio.to_thread.run_sync(es.live.start_generation, params)
        # The buffer holds a whole generation, so the scheduler never waits on a reader.
        queue = _TokenQueue()
        es.generation = _ActiveGeneration(generation, queue)
        self._generating[es.id] = es
        self._touch(es)
        self._wake.set()
        return TokenStream(self, es, queue)

    def cancel(self, es: EngineSession) -> bool:
        """Cancel the running generation of `es`, if any (True if there was
        one). Its stream then ends with Done("cancelled") at the next tick;
        a token being computed is still consumed and delivered first."""
        if es.generation is None or es.generation.cancelled:
            return False
        es.generation.cancelled = True
        self._wake.set()
        return True

    async def snapshot(self, es: EngineSession) -> int:
        """Store the state of `es` in the store under its id (between two
        ticks: a consistent state, also mid-generation), and wait until it
        is stored. Returns its position. Raises what the store raised."""
        self._check_usable(es)
        async with self._model_lock:
            future = None
            if es.live is not None:
                contents = await anyio.to_thread.run_sync(es.live._capture)
                future = self._writer.submit(self._write, es.id, contents)
            elif es.id in self._unwritten:  # suspended, its write queued (or failed: retried)
                write = self._unwritten[es.id]
                future = (self._start_write(es.id, write.contents) if write.failed else write).future
            position = es.position
        if future is not None:
            await anyio.to_thread.run_sync(future.result)
        return position

    async def close(self, es: EngineSession) -> None:
        """End `es` for good: cancel its generation, free its slot, fail its
        pending input, delete its stored snapshot."""
        if es.closed:
            return
        es.closed = True
        async with self._model_lock:  # not while a tick's worker thread uses the session
            self._finish(es, "cancelled")
            self._fail_inputs(es, EngineError("closed", "the session was closed"))
            if es.live is not None:
                es.live.close()
                es.live = None
        self._unwritten.pop(es.id, None)
        self._preloaded.pop(es.id, None)
        try:  # through the writer: after any write of this session still queued there
            await anyio.to_thread.run_sync(self._writer.submit(self.store.delete, es.id).result)
        except SnapshotNotFound:
            pass
        self.sessions.pop(es.id, None)
        self._generating.pop(es.id, None)
        self._waiting.pop(es.id, None)

    async def suspend_all(self) -> list[str]:
        """Shutdown: cancel every generation, snapshot every live session to
        the store and free its slot, and wait until every suspended
        session's snapshot is stored (failed writes are retried once).
        Returns the ids of the engine's sessions whose state is now in the
        store; one that could not be stored is logged as an error. Input
        appended but not yet consumed is dropped (its `consumed` raises)."""
        async with self._model_lock:
            for es in list(self.sessions.values()):
                self._finish(es, "cancelled")
                self._fail_inputs(es, EngineError("closed", "the server is shutting down"))
                if es.live is not None:
                    try:
                        await self._suspend(es)
                    except Exception:  # noqa: BLE001 - one failed write must not lose the others
                        log.exception("could not suspend session %s", es.id)
            self._retry_failed_writes()
            await anyio.to_thread.run_sync(concurrent.futures.wait, [w.future for w in self._unwritten.values()])
        for sid, write in self._unwritten.items():
            if write.failed:
                log.error("session %s could not be stored; it is lost when this process exits", sid)
        self._forget_written()
        return [sid for sid, es in self.sessions.items() if es.live is None and sid not in self._unwritten]

    # -- scheduler -------------------------------------------------------------------
    async def run(self) -> None:
        """The scheduler loop: ticks while there is work, sleeps otherwise.
        Runs until cancelled (an in-flight model call finishes first, so
        session state is never left half-updated)."""
        while True:
            if not self._has_work():
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            await self._tick()

    def _has_work(self) -> bool:
        return bool(self._generating or self._waiting)

    async def _tick(self) -> None:
        """One scheduling round (see the module docstring)."""
        async with self._model_lock:
            for es in list(self._generating.values()):
                if es.generation.cancelled:
                    self._finish(es, "cancelled")
            decoding = any(not es.inputs and es.live is not None for es in self._generating.values())
            short = self.step_input_tokens if decoding else self.idle_step_input_tokens
            riders = [es for es in self._waiting.values() if es.live is not None and self._input_fits(es, short)]
            riding = {es.id for es in riders}
            turn = next((es for es in self._waiting.values() if es.id not in riding), None)
            if turn is not None and self._input_fits(turn, short):  # suspended: restored, then it rides along
                if await self._restore_for_input(turn):
                    riders.append(turn)
            elif turn is not None:
                started = time.perf_counter()
                await self._prefill_chunk(turn)
                self.phase_seconds["prefill"] += time.perf_counter() - started
                if turn.inputs and self._waiting.pop(turn.id, None) is not None:
                    self._waiting[turn.id] = turn  # next turn: after the others waiting
            # Requests that arrived during the prefill count: input appended to a
            # generator is consumed before its next token.
            batch = [(es, es.generation) for es in self._generating.values() if not es.inputs and es.live is not None]
            riders = [es for es in riders if es.inputs and es.live is not None]
            if batch or riders:
                generations = [active.generation for _, active in batch]
                slots = [es.live.slot for es, _ in batch]
                inputs = [(es.live, es.inputs[0].ids[es.inputs[0].offset]) for es in riders]
                tokens = await self._decode(generations, slots, inputs)
                started = time.perf_counter()
                for (es, active), token in zip(batch, tokens):
                    if es.generation is active:  # not ended meanwhile
                        self._deliver(es, token)
                for es in riders:
                    self._input_consumed(es, 1)
                self.phase_seconds["deliver"] += time.perf_counter() - started
        self._signal_delivered()
        # Let the event loop run sends and new requests between ticks.
        await anyio.sleep(0)

    async def wait_tick(self) -> None:
        """Return after the next scheduler tick has delivered its tokens, or
        a generation has ended outside a tick (closed, shut down). Lets a
        consumer of many streams (the server's frame writer) look at all of
        them once per tick instead of waking once per token."""
        await self._ticked.wait()

    def _signal_delivered(self) -> None:
        ticked, self._ticked = self._ticked, anyio.Event()
        ticked.set()

    def _input_fits(self, es: EngineSession, limit: int) -> bool:
        """Whether the pending input of `es` is at most `limit` tokens, so it
        rides along in decode rows rather than taking prefill chunks (see
        the module docstring)."""
        if es.closed:
            return False
        remaining = 0
        for pending in es.inputs:
            remaining += len(pending.ids) - pending.offset
            if remaining > limit:
                return False
        return remaining > 0

    async def _decode(self, generations: list[Generation], slots: list[int],
                      inputs: Sequence[tuple[Session, int]]) -> list[Token]:
        """The tick's model work, run where it is cheapest. On the CPU the
        model's work is the cost: all of it (`_decode_batch`) goes to a
        worker thread, so the event loop stays free. On CUDA the host only
        launches work and keeps books, and in a worker thread that Python
        would fight the event loop for the GIL (with 256 streams a tick's
        sampling took 14 ms instead of ~3): so it runs here (sample, launch
        the decode on the device's ids, accept), and only the wait for the
        ids (which releases the GIL) goes to a thread."""
        if not self._host_work_in_loop:
            t0 = time.perf_counter()
            tokens = await anyio.to_thread.run_sync(self._decode_batch, generations, slots, inputs)
            self.phase_seconds["decode"] += time.perf_counter() - t0
            return tokens
        lock = self.model.lock  # an RLock: it must be taken (and released) by this thread
        while not lock.acquire(blocking=False):  # a Session outside the engine is using the model
            await anyio.sleep(0.001)
        phases = self.phase_seconds
        try:
            # A cancellation requested earlier (e.g. shutdown during a prefill) ends
            # the tick here, before any session is touched...
            await anyio.lowlevel.checkpoint_if_cancelled()
            t0 = time.perf_counter()
            pending = self._sample(generations) if generations else None  # (none when only input rides along)
            t1 = time.perf_counter()
            # The decode reads the sampled ids on the device: it is queued right
            # behind the sampling, so the device goes on to the step while the
            # host waits for the ids and keeps the books (a host round trip per
            # tick left the GPU idle ~1 ms of a ~5 ms tick at batch 256).
            self._launch_decode(generations, slots, inputs, pending.device_ids if pending is not None else [])
            t2 = time.perf_counter()
            if pending is not None:
                # ... and none arrives between launching the step and recording its
                # tokens: the sessions' books must match what the device consumed.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(pending.wait)
            t3 = time.perf_counter()
            tokens = self._accept(generations, inputs, pending.ids() if pending is not None else [])
            phases["sample"] += t1 - t0
            phases["wait"] += t3 - t2
            phases["decode"] += (t2 - t1) + (time.perf_counter() - t3)
            return tokens
        finally:
            lock.release()

    def _sample(self, generations: list[Generation]) -> PendingIds:
        logits = self._batch_logits(generations)
        vocab = sampled_vocab(self.model)
        rows = logits if vocab == logits.shape[1] else logits[:, :vocab]
        return PendingIds(rows, [g.sample_row() for g in generations])

    def _decode_batch(self, generations: list[Generation], slots: list[int],
                      inputs: Sequence[tuple[Session, int]] = ()) -> list[Token]:
        """The whole tick's model work in one call (the CPU's arrangement, in
        a worker thread): sample every generation's row at once, then
        `_launch_decode` with the ids, then `_accept`."""
        with self.model.lock:
            picked = self._sample(generations).ids() if generations else []
            self._launch_decode(generations, slots, inputs, picked)
        return self._accept(generations, inputs, picked)

    def _launch_decode(self, generations: list[Generation], slots: list[int],
                       inputs: Sequence[tuple[Session, int]], tokens: list[int] | torch.Tensor) -> None:
        """One decode call for the generations' rows (`tokens`: their sampled
        ids, host ints or an int64 tensor on the device) plus one row per
        (session, input token) of `inputs`, and one copy of the logits rows
        the sessions keep. Caller holds the model's lock. Nothing here waits
        for the device."""
        riders = [t for _, t in inputs]
        if isinstance(tokens, torch.Tensor):
            if riders:
                extra = torch.tensor(riders, dtype=torch.int64)
                if tokens.device.type == "cuda":
                    extra = extra.pin_memory()
                tokens = torch.cat([tokens, extra.to(tokens.device, non_blocking=True)])
        else:
            tokens = list(tokens) + riders
        out = self.model.decode(slots + [s.slot for s, _ in inputs], tokens)
        # decode's result may be a reused buffer: one copy of all rows, each session keeps its row.
        kept = out.clone(memory_format=torch.contiguous_format)
        self._kept, self._kept_rows = kept, kept.unbind(0)
        self._kept_sessions = [g.session for g in generations] + [s for s, _ in inputs]
        self.decode_calls += 1
        self.decoded_tokens += len(generations)
        self.decoded_input_tokens += len(inputs)

    def _accept(self, generations: list[Generation], inputs: Sequence[tuple[Session, int]],
                picked: list[int]) -> list[Token]:
        """Record the tick's tokens in their sessions (the last `_launch_decode`
        consumed them): each generation's sampled token (detokenizer, stop
        strings), each input token as `Session.step` does. Touches only
        these sessions; needs no device work."""
        rows = self._kept_rows
        n = len(generations)
        for (session, token), row in zip(inputs, rows[n:]):
            session._consumed([token], row)
        return [g.accept(t, row) for g, t, row in zip(generations, picked, rows)]

    def _batch_logits(self, generations: list[Generation]) -> torch.Tensor:
        """The sessions' current logits as one float32 [B, V] tensor: the last
        tick's copy when the batch is the same sessions in the same order with
        those logits (the steady state), else a stack of their rows."""
        sessions = [g.session for g in generations]
        rows = self._kept_rows
        if len(rows) == len(sessions) and all(s._logits is r for s, r in zip(sessions, rows)):
            return self._kept
        # A session that left the batch copies its row out, so that the old
        # [B, V] buffer is freed rather than kept alive by one row of it.
        staying = set(map(id, sessions))
        for s, r in zip(self._kept_sessions, rows):
            if s._logits is r and id(s) not in staying:
                s._logits = r.clone()
        return torch.stack([s._logits for s in sessions])

    async def _prefill_chunk(self, es: EngineSession) -> None:
        pending = es.inputs[0]
        try:
            await self._ensure_live(es)
            chunk = pending.ids[pending.offset:pending.offset + self.prefill_chunk]
            await anyio.to_thread.run_sync(es.live.feed, chunk)
            self.prefill_calls += 1
        except Exception as e:  # noqa: BLE001 - delivered to whoever awaits this input
            self._input_failed(es, e)
            return
        self._input_consumed(es, len(chunk))

    async def _restore_for_input(self, es: EngineSession) -> bool:
        """Give `es` a slot so its pending input can ride along; False (and
        its first input failed with the error) if that fails."""
        try:
            await self._ensure_live(es)
        except Exception as e:  # noqa: BLE001 - delivered to whoever awaits this input
            self._input_failed(es, e)
            return False
        return True

    def _input_failed(self, es: EngineSession, error: BaseException) -> None:
        """The first pending input of `es` cannot be consumed: hand `error` to its waiter."""
        pending = es.inputs.popleft()
        pending.error = error
        pending.consumed.set()
        if not es.inputs:
            self._waiting.pop(es.id, None)

    def _input_consumed(self, es: EngineSession, count: int) -> None:
        """`count` tokens of the first pending input of `es` were consumed."""
        pending = es.inputs[0]
        pending.offset += count
        if pending.offset >= len(pending.ids):
            es.inputs.popleft()
            pending.position = es.position
            pending.consumed.set()
        if not es.inputs:
            self._waiting.pop(es.id, None)

    def _deliver(self, es: EngineSession, token: Token) -> None:
        active = es.generation
        if not active.queue.put(token):
            active.cancelled = True  # nobody is listening any more
        if token.finish_reason is not None:
            self._finish(es, token.finish_reason)
        elif active.cancelled:
            self._finish(es, "cancelled")

    def _finish(self, es: EngineSession, reason: str) -> None:
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

    def _fail_inputs(self, es: EngineSession, error: BaseException) -> None:
        self._waiting.pop(es.id, None)
        while es.inputs:
            pending = es.inputs.popleft()
            pending.error = error
            pending.consumed.set()

    # -- slots and the store -----------------------------------------------------------
    async def _ensure_live(self, es: EngineSession) -> None:
        """Give `es` a slot, restoring its state: from memory if its write is
        still pending (or failed) or `resume` just read it, else from the
        store (caller holds _model_lock)."""
        if es.live is not None:
            return
        await self._make_room()
        write = self._unwritten.get(es.id)
        contents = write.contents if write is not None else self._preloaded.pop(es.id, None)
        if contents is None:  # (also when its write has just succeeded)
            contents = await anyio.to_thread.run_sync(self._read_snapshot, es.id)
        es.live = await anyio.to_thread.run_sync(self.model._restore_contents, contents)
        self._preloaded.pop(es.id, None)
        self.resumptions += 1

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

    async def _suspend(self, es: EngineSession) -> None:
        """Copy the state of `es` to host memory, free its slot, queue the write."""
        await self._make_writer_room()
        contents = await anyio.to_thread.run_sync(es.live._capture)
        es._position = es.live.position
        es.live.close()
        es.live = None
        self._start_write(es.id, contents)
        self.suspensions += 1

    def _start_write(self, session_id: str, contents: snapshot_format.SnapshotContents) -> _Write:
        """Queue the write of `contents` as the snapshot of `session_id`; it
        replaces any earlier one (the writer runs them in order)."""
        future = self._writer.submit(self._write, session_id, contents)
        future.add_done_callback(functools.partial(_log_failed_write, session_id, self.store))
        write = self._unwritten[session_id] = _Write(contents, future)
        return write

    def _retry_failed_writes(self) -> None:
        for sid, write in list(self._unwritten.items()):
            if write.failed:
                self._start_write(sid, write.contents)

    def _write(self, session_id: str, contents: snapshot_format.SnapshotContents) -> None:
        """In the writer thread: encode and store."""
        self.store.put(session_id, snapshot_format.encode_contents(contents, self.compression_level))

    async def _make_writer_room(self) -> None:
        """Wait until fewer than max_unwritten snapshots are held for the
        writer. If all those held have failed, retry them once; if they
        fail again, refuse (EngineError "capacity"): the store is broken,
        and suspending more would only pile up state in memory."""
        retried = False
        while True:
            self._forget_written()
            if len(self._unwritten) < self.max_unwritten:
                return
            oldest = next((w.future for w in self._unwritten.values() if not w.future.done()), None)
            if oldest is not None:
                await anyio.to_thread.run_sync(concurrent.futures.wait, [oldest])
            elif not retried:
                self._retry_failed_writes()
                retried = True
            else:
                raise EngineError("capacity", f"{len(self._unwritten)} suspended sessions could not be written "
                                              f"to the store {self.store!r} (see the server log); retry later")

    def _forget_written(self) -> None:
        """Drop the host copies that are stored, and failed ones of sessions
        live again (their live state supersedes them)."""
        for sid, write in list(self._unwritten.items()):
            es = self.sessions.get(sid)
            if write.written or (write.failed and (es is None or es.live is not None)):
                del self._unwritten[sid]

    def _read_snapshot(self, session_id: str) -> snapshot_format.SnapshotContents:
        return self._decode_snapshot(self.store.get(session_id))

    def _decode_snapshot(self, blob: bytes) -> snapshot_format.SnapshotContents:
        return snapshot_format.decode(blob, self.model.config, self.model.fingerprint)

    def _touch(self, es: EngineSession) -> None:
        es.last_used = next(self._clock)

    def _check_usable(self, es: EngineSession) -> None:
        if es.closed:
            raise EngineError("closed", f"session {es.id!r} is closed")

