"""One client connection of the websocket server: reads requests at the
rate its limits allow, dispatches them to the engine, writes events through
a bounded queue, and holds the sessions it opened until they are closed or
it ends (then they are detached: resumable by id from any connection)."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from typing import Any

import anyio
import websockets
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.protocol import State

from ..errors import (
    CapacityError,
    InvalidValueError,
    LeaseLost,
    SessionHeld,
    SnapshotError,
    StoppedError,
    StoreUnavailable,
)
from .limits import Throttle
from .protocol import (
    Append,
    Cancel,
    Close,
    Generate,
    Open,
    ProtocolError,
    Request,
    Snapshot,
    TokenFrames,
    event,
    parse_request,
)
from .pump import Outgoing
from .record import EngineError, PendingInput, SessionRecord

log = logging.getLogger("streamgemma.serve.server")

# Bytes a connection may be sent without waiting for its socket to drain; beyond
# that, frames queue (Limits.send_queue) behind the writer's backpressure.
WRITE_BUDGET = 1 << 16
# Frames larger than this take long enough to parse that, while sessions generate,
# they wait for the engine's input budget first (smaller ones are only charged to it).
LARGE_FRAME = 1 << 16
# How long an `open` waits for the connection that held the session to let go of it.
RELEASE_WAIT_S = 30.0


def log_id(session_id: str) -> str:
    """A session id as logged: its first 8 characters. An id is a capability
    (whoever has it and the token may resume the session): logs, often
    shared more widely than the store, get enough to match lines, not to resume."""
    return session_id[:8] + "..."


class Connection:
    """One client connection (see the module docstring)."""

    def __init__(self, server, ws: ServerConnection, number: int = 0):
        self.server = server  # the `Server` (not imported: it imports this module)
        self.engine = server.engine
        self.limits = server.limits
        self.ws = ws
        self.number = number  # for the log
        self.sessions: dict[str, SessionRecord] = {}
        self.opening = 0  # opens in progress (they count against the limits)
        self.ending = False  # its sessions are being detached
        self.released = anyio.Event()  # set once they are
        self._starting: dict[str, bool] = {}  # session id -> cancel requested, while a generate is starting
        # Frames waiting for the writer task: a bounded deque and a wake-up event
        # (cheaper per frame than an anyio memory stream, which takes a
        # scheduling round per item). The event is asyncio's, reused with
        # clear(): anyio's cannot be cleared, and making one per wait was a
        # visible share of the loop's time. (websockets.asyncio ties the
        # server to asyncio anyway.)
        self._outbox: collections.deque[str] = collections.deque()
        self._outbox_ready = asyncio.Event()
        self._outbox_closed = False
        self._overflowed = False
        self._unconfirmed = 0  # bytes written by _write_now since the writer last drained
        self._tasks: anyio.abc.TaskGroup | None = None
        self._streaming = 0  # generations whose frames are still being sent
        self._outgoing: dict[str, Outgoing] = {}  # session id -> its generation's way to this client

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tasks = tg
                tg.start_soon(self._write)
                await self._read()
                tg.cancel_scope.cancel()
        finally:
            self._outbox_closed = True
            with anyio.CancelScope(shield=True):
                await self._release_sessions()
                if self._overflowed:
                    with anyio.move_on_after(5):
                        await self.ws.close(1008, "send queue full: the client reads too slowly")

    async def _release_sessions(self) -> None:
        """Sessions outlive the connection (resumable by id); their generations
        and unconsumed input do not. An `open` of one of them from another
        connection meanwhile waits for `released`."""
        self.ending = True
        try:
            for es in list(self.sessions.values()):
                try:
                    await self.engine.detach(es)
                except Exception:  # noqa: BLE001 - the other sessions must still be released
                    log.exception("detaching session %s failed", log_id(es.id))
                es.owner = None
        finally:
            self.released.set()

    @property
    def sending(self) -> bool:
        """Whether frames wait to be written (queued, or a generation's not all sent)."""
        return bool(self._outbox) or bool(self._starting) or self._streaming > 0

    def send(self, frame: str) -> None:
        """Send an event, or queue it; never waits (a full queue disconnects
        the client)."""
        if self._outbox_closed:
            return
        if not self._outbox and self._write_now(frame):
            self.server.frames_direct += 1
            return
        if len(self._outbox) >= self.limits.send_queue:
            self._overflowed = True
            self._tasks.cancel_scope.cancel()
            return
        self.server.frames_queued += 1
        self._outbox.append(frame)
        self._outbox_ready.set()

    def _write_now(self, frame: str) -> bool:
        """Write `frame` at once with websockets' synchronous `broadcast`, when
        nothing is queued before it and fewer than WRITE_BUDGET bytes went out
        this way since the writer task last saw the socket drained; False
        otherwise, and the frame goes through the queue and the writer task,
        whose `send` waits for a slow client. (`send` per frame costs a
        wake-up and an async context: at 256 streams, a large share of the
        loop's time.) Frames never reorder: the writer empties the queue
        before anything is written directly again."""
        if self._unconfirmed >= WRITE_BUDGET or self.ws.state is not State.OPEN:
            return False
        broadcast([self.ws], frame)
        self._unconfirmed += len(frame)
        return True

    async def _write(self) -> None:
        outbox = self._outbox
        try:
            while True:
                await self._outbox_ready.wait()
                self._outbox_ready.clear()
                # Everything queued goes out now, without a scheduling round per frame.
                while outbox:
                    await self.ws.send(outbox.popleft())
                self._unconfirmed = 0  # `send` returned: the socket's buffer is below its high-water mark
        except websockets.ConnectionClosed:
            self._tasks.cancel_scope.cancel()

    async def _read(self) -> None:
        limits = self.limits
        throttle = Throttle(limits, time.monotonic())
        while True:
            with anyio.move_on_after(limits.idle_timeout) as idle:
                try:
                    frame = await self.ws.recv()
                except websockets.ConnectionClosed:
                    return
            if idle.cancelled_caught:
                if any(es.generation is not None or es.inputs for es in self.sessions.values()) or self._starting:
                    continue  # (busy: generating, or waiting for input to be consumed)
                await self.ws.close(1000, "idle timeout")
                return
            if len(frame) > LARGE_FRAME:  # parsing it is real work: within the input share
                await self.engine.wait_input_turn()
            started = time.perf_counter()
            try:
                request = parse_request(frame, limits.max_tokens, limits.default_max_tokens)
                if isinstance(request, Append):  # queued at once: its cost is the client's input work
                    self._append(request)
                    self.engine.charge_input(time.perf_counter() - started)
                else:
                    self.engine.charge_input(time.perf_counter() - started)
                    await self._dispatch(request)
            except ProtocolError as e:
                self._error(e.code, str(e), e.request_id, e.session, e.field)
            except Exception as e:  # noqa: BLE001 - a parser bug must not end the connection
                log.error("connection %d: a frame failed", self.number, exc_info=e)
                self._error("internal", f"the server failed on this frame: {type(e).__name__}")
            # Over its rate, the client waits: its frames are read later (TCP backpressure).
            wait = throttle.wait(len(frame.encode("utf-8", "surrogatepass")) if isinstance(frame, str)
                                 else len(frame), time.monotonic())
            if throttle.flooding:
                log.info("connection %d: over its rate limit for %g s; closing it", self.number, limits.rate_grace)
                await self.ws.close(1008, f"over the rate limit ({limits.messages_per_second:g} frames, "
                                          f"{limits.bytes_per_second:g} bytes a second) for {limits.rate_grace:g} s")
                return
            if wait > 0:
                await anyio.sleep(wait)

    def _error(self, code: str, message: str, request_id: Any = None, session: str | None = None,
               field: str | None = None) -> None:
        fields = {"code": code, "message": message}
        if session is not None:
            fields["session"] = session
        if field is not None:
            fields["field"] = field
        self.send(event("error", request_id, **fields))

    def _session_of(self, request: Request) -> SessionRecord:
        if request.session is None:
            if len(self.sessions) == 1:
                return next(iter(self.sessions.values()))
            if not self.sessions:
                raise ProtocolError("unknown_session", "this connection holds no session; open one first", request.id)
            raise ProtocolError("bad_message", "name the session (\"session\": ID): this connection holds "
                                               f"{len(self.sessions)} sessions", request.id)
        es = self.sessions.get(request.session)
        if es is None or es.closed:
            raise ProtocolError("unknown_session", "this connection has no such session; open it first",
                                request.id, request.session)
        return es

    async def _dispatch(self, request: Request) -> None:
        rid = request.id
        try:
            if self.server.stopping and isinstance(request, (Open, Generate)):
                raise EngineError("closed", "the server is shutting down")
            if isinstance(request, Open):
                await self._open(request)
                return
            if isinstance(request, Close) and request.session is not None and request.session not in self.sessions:
                await self._discard(request)
                return
            es = self._session_of(request)
            if isinstance(request, Generate):
                if es.id in self._starting or es.generation is not None:
                    raise EngineError("generating", "a generation is already running on this session; "
                                                    "cancel it first")
                self._starting[es.id] = False
                self._tasks.start_soon(self._generate, es, request)
            elif isinstance(request, Cancel):
                if es.id in self._starting:
                    self._starting[es.id] = True
                elif not self.engine.cancel(es):
                    raise EngineError("not_generating", "no generation is running on this session")
            elif isinstance(request, Snapshot):
                position = await self.engine.snapshot(es)
                self._flush_tokens(es.id)
                self.send(event("snapshot", rid, session=es.id, position=position))
            elif isinstance(request, Close):
                self.engine.cancel(es)
                try:
                    await self.engine.close(es)
                finally:  # (a store that failed its delete: a retried close goes through `_discard`)
                    self.sessions.pop(es.id, None)
                log.info("connection %d: session %s closed", self.number, log_id(es.id))
                self.send(event("closed", rid, session=es.id))
        except ProtocolError:
            raise
        except Exception as e:  # noqa: BLE001 - one failed request must not end the connection
            self._request_failed(e, request)

    def _append(self, request: Append) -> None:
        """Queue input; `appended` (or the error) is sent once it is consumed."""
        try:
            es = self._session_of(request)
            pending = self.engine.append(es, request.text if request.text is not None else request.tokens)
        except ProtocolError:
            raise
        except Exception as e:  # noqa: BLE001 - one failed request must not end the connection
            self._request_failed(e, request)
            return
        pending.add_done_callback(functools.partial(self._acknowledge_append, es.id, request.id))

    def _request_failed(self, e: Exception, request: Request) -> None:
        """Answer a failed request with the error's code."""
        rid, session = request.id, request.session
        if isinstance(e, EngineError):
            self._error(e.code, str(e), rid, session)
        elif isinstance(e, StoreUnavailable):
            self._error("store_unavailable", str(e), rid, session)
        elif isinstance(e, (SessionHeld, LeaseLost)):  # another worker of the fleet has it
            self._error("session_busy", str(e), rid, session)
        elif isinstance(e, CapacityError):  # the model's state pool is full
            self._error("capacity", str(e), rid, session)
        elif isinstance(e, InvalidValueError):
            self._error("invalid", str(e), rid, session, e.field)
        elif isinstance(e, SnapshotError):
            self._error("snapshot_error", str(e), rid, session)
        elif isinstance(e, (ValueError, TypeError, StoppedError)):
            self._error("invalid", str(e), rid, session)
        else:
            log.error("connection %d: %s request failed", self.number, type(request).__name__.lower(), exc_info=e)
            self._error("internal", f"the server failed on this request: {type(e).__name__}: {e}", rid, session)

    async def _open(self, request: Open) -> None:
        if request.session not in self.sessions and \
                len(self.sessions) + self.opening >= self.limits.sessions_per_connection:
            raise ProtocolError("limit", f"this connection already holds {len(self.sessions)} sessions "
                                         f"(the limit); close one first", request.id)
        if request.session not in self.sessions and self.server.sessions_held() >= self.limits.max_sessions:
            raise ProtocolError("limit", f"the server holds {self.limits.max_sessions} sessions (its limit); "
                                         "retry later", request.id)
        self.opening += 1  # counted as held while the engine opens it: concurrent opens see it
        try:
            if request.session is None:
                es = await self.engine.open(seed=request.seed)
                how = "opened"
            else:
                es = await self.engine.resume(request.session)
                await self._take_over(es)
                how = "resumed"
            held_before = es.owner is self
            es.owner = self
            self.sessions[es.id] = es
            fields = {}
            if request.since is not None:  # what the client missed (e.g. tokens lost with its last connection)
                try:
                    start, ids = await self._history(es, request.since)
                except BaseException:  # (e.g. no slot to read it into): the session is not kept
                    if not held_before:
                        self.sessions.pop(es.id, None)
                        es.owner = None
                    raise
                tok = self.engine.model.tokenizer
                text = tok.decode([i for i in ids if i < tok.vocab_size]) if tok is not None else ""
                fields["missed"] = {"from": start, "ids": ids, "text": text}
        finally:
            self.opening -= 1
        position = await self.engine.position(es)  # (held here, generating: only tokens sent count)
        log.info("connection %d: session %s %s at position %d", self.number, log_id(es.id), how, position)
        self._flush_tokens(es.id)
        self.send(event("opened", request.id, session=es.id, position=position,
                        state_bytes=self.server.state_bytes, **fields))

    async def _history(self, es: SessionRecord, since: int) -> tuple[int, list[int]]:
        """(start, ids) consumed by `es` from `since` on (or later: a session keeps its last 1024 ids)."""
        contents = await self.engine.capture(es)
        recent, position = contents.extra["recent_ids"], contents.position
        start = min(max(since, position - len(recent)), position)
        return start, [int(i) for i in recent[len(recent) - (position - start):]]

    async def _take_over(self, es: SessionRecord) -> None:
        """Wait until no other connection holds `es`: one that is ending lets
        go once its generation has ended (so the position is exact)."""
        owner = es.owner
        if owner is None or owner is self:
            return
        # (a connection whose websocket closed is ending, though it may not have begun to release)
        if not owner.ending and owner.ws.state is State.OPEN:
            raise EngineError("session_busy", "another connection holds this session")
        with anyio.move_on_after(RELEASE_WAIT_S):
            await owner.released.wait()
        if es.owner is not None and es.owner is not self:
            raise EngineError("session_busy", "another connection holds this session")

    async def _discard(self, request: Close) -> None:
        """`close` of a session this connection does not hold: detached, only
        in the store, or one whose snapshot is damaged. It is deleted."""
        es = self.engine.sessions.get(request.session)
        if es is not None:
            await self._take_over(es)
        await self.engine.discard(request.session)
        log.info("connection %d: session %s closed (not open here)", self.number, log_id(request.session))
        self.send(event("closed", request.id, session=request.session))

    def _acknowledge_append(self, session_id: str, request_id: Any, pending: PendingInput) -> None:
        """Answer an append once it is consumed (called by the engine's tick)."""
        if pending.error is not None:
            self._request_failed(pending.error, Append(request_id, session_id))
        else:
            self._flush_tokens(session_id)
            self.send(event("appended", request_id, session=session_id, position=pending.position))

    def _flush_tokens(self, session_id: str) -> None:
        """Send the tokens a coalesced stream of the session still holds, so a
        position sent next counts only tokens the client already has
        (docs/protocol.md: "after its last appended, plus one per token received since")."""
        outgoing = self._outgoing.get(session_id)
        if outgoing is not None:
            self.server.pump.flush(outgoing)

    async def _generate(self, es: SessionRecord, request: Generate) -> None:
        try:
            stream = await self.engine.generate(es, request.params)
        except Exception as e:  # noqa: BLE001 - answered with its code
            self._request_failed(e, Generate(request.id, es.id))
            return
        finally:
            cancel_requested = self._starting.pop(es.id, False)
        if cancel_requested:
            self.engine.cancel(es)
        # A token's "id" is the token id; the request id comes back on "done".
        outgoing = self._outgoing[es.id] = Outgoing(self, stream, TokenFrames(es.id), request.id, request.coalesce)
        self._streaming += 1
        try:
            await self.server.pump.stream(outgoing)
        finally:
            self._streaming -= 1
            if self._outgoing.get(es.id) is outgoing:
                del self._outgoing[es.id]
            await stream.aclose()  # cancels the generation if it has not ended (e.g. the connection closed)
