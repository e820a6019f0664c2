"""The websocket adapter: `Server` puts an `Engine` behind the protocol of
docs/protocol.md (websockets on asyncio, driven through anyio).

Access model: with a token, every connection must present
`Authorization: Bearer <token>` or is refused with HTTP 401 before the
websocket opens. A session id (secrets.token_urlsafe, 128 bits) is a
capability: whoever knows it (and the token) may resume the session, from any
connection, but only one connection holds a session at a time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hmac
import logging
import math
import time
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import websockets
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.protocol import State

from ..errors import SnapshotError, StoppedError
from .engine import Engine
from .protocol import (
    PATH,
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
from .record import EngineError, SessionRecord
from .streams import TokenStream

log = logging.getLogger("streamgemma.serve.server")

# Bytes a connection may be sent without waiting for its socket to drain; beyond
# that, frames queue (Limits.send_queue) behind the writer's backpressure.
WRITE_BUDGET = 1 << 16


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-server limits (defaults in parentheses).

    max_message_bytes: largest frame a client may send (1 MiB); a larger one
    closes the connection with code 1009. sessions_per_connection: sessions one
    connection may hold (16). max_tokens: largest max_tokens of a generation
    (4096); default_max_tokens: when a generate omits it (256).
    send_queue: events queued for one connection (4096 frames); a client
    that reads so slowly that it fills up is disconnected (code 1008) so it
    never slows other sessions. ping_interval / ping_timeout: websocket
    keepalive (20 s / 20 s). idle_timeout: a connection that sends nothing for
    this long while none of its sessions generates is closed (300 s).
    coalesce_interval: for a generation that asked for coalescing, the least
    time between two of its frames (0.02 s, at most 0.1 s): each frame
    carries every token ready by then, so a token waits at most this long and
    the server sends at most 1/coalesce_interval frames per second per
    generation however fast the model decodes. 0: send whatever is ready
    whenever the connection's writer gets to it.
    """

    max_message_bytes: int = 1 << 20
    sessions_per_connection: int = 16
    max_tokens: int = 4096
    default_max_tokens: int = 256
    send_queue: int = 4096
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    idle_timeout: float = 300.0
    coalesce_interval: float = 0.02

    def __post_init__(self):
        if not 0 <= self.coalesce_interval <= 0.1:
            raise ValueError(f"coalesce_interval must be in [0, 0.1] seconds (it adds latency), "
                             f"got {self.coalesce_interval!r}")


class Server:
    """Serves `engine` at ws://host:port/v1/stream.

    token: the bearer token every connection must present (None: no auth).
    `await server.serve()` runs the engine's scheduler and the websocket
    server until `stop()` (or cancellation); on the way out it closes every
    connection and suspends every live session to the engine's store, so a
    new server on the same store resumes them exactly.
    """

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                 limits: Limits = Limits()):
        self.engine = engine
        self.host = host
        self.port = port
        self.token = token or None
        self.limits = limits
        self._stop = anyio.Event()
        self.pump = _TokenPump(engine, limits.coalesce_interval)
        # Monitoring: frames written straight to a socket / through a writer task.
        self.frames_direct = 0
        self.frames_queued = 0

    @property
    def pump_seconds(self) -> float:
        """Seconds spent building and writing token frames (monitoring;
        with `frames_direct` / `frames_queued`: frames written straight to a
        socket / handed to a connection's writer task for a lagging client)."""
        return self.pump.seconds

    @property
    def url(self) -> str:
        """The websocket URL clients connect to (the bound port once serving)."""
        return f"ws://{self.host}:{self.port}{PATH}"

    def stop(self) -> None:
        """Ask `serve` to shut down (call from the server's event loop)."""
        self._stop.set()

    async def serve(self, *, task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until `stop()`. Reports the bound port through task_status
        (port 0 picks a free one)."""
        limits = self.limits
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.engine.run)
                tg.start_soon(self.pump.run)
                async with serve(self._handle, self.host, self.port, process_request=self._check_request,
                                 max_size=limits.max_message_bytes, ping_interval=limits.ping_interval,
                                 ping_timeout=limits.ping_timeout, close_timeout=5,
                                 # Token frames are tens of bytes: deflating them costs more
                                 # server CPU than it saves on the wire.
                                 compression=None) as ws_server:
                    self.port = ws_server.sockets[0].getsockname()[1]
                    log.info("listening on %s", self.url)
                    task_status.started(self.port)
                    await self._stop.wait()
                # Leaving `serve` closed every connection (their generations are cancelled).
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                stored = await self.engine.suspend_all()
                log.info("suspended %d sessions to %r", len(stored), self.engine.store)

    def _check_request(self, connection: ServerConnection, request: websockets.http11.Request):
        """Before the handshake: the path and the bearer token."""
        if request.path.split("?", 1)[0] != PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, f"not found: the websocket endpoint is {PATH}\n")
        if self.token is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                reason = "wrong bearer token" if given else "missing Authorization: Bearer <token> header"
                response = connection.respond(HTTPStatus.UNAUTHORIZED, f"unauthorized: {reason}\n")
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        await _Connection(self, ws).run()


class _Connection:
    """One client connection: reads requests, writes events through a bounded
    queue, and holds the sessions it opened until they are closed or it ends."""

    def __init__(self, server: Server, ws: ServerConnection):
        self.server = server
        self.engine = server.engine
        self.limits = server.limits
        self.ws = ws
        self.sessions: dict[str, SessionRecord] = {}
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

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tasks = tg
                tg.start_soon(self._write)
                await self._read()
                tg.cancel_scope.cancel()
        finally:
            # Sessions outlive the connection (resumable by id); their generations do not.
            for es in self.sessions.values():
                self.engine.cancel(es)
                es.owner = None
            self._outbox_closed = True
            if self._overflowed:
                with anyio.move_on_after(5, shield=True):
                    await self.ws.close(1008, "send queue full: the client reads too slowly")

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
        while True:
            with anyio.move_on_after(self.limits.idle_timeout) as idle:
                try:
                    frame = await self.ws.recv()
                except websockets.ConnectionClosed:
                    return
            if idle.cancelled_caught:
                if any(es.generation is not None for es in self.sessions.values()) or self._starting:
                    continue
                await self.ws.close(1000, "idle timeout")
                return
            try:
                request = parse_request(frame, self.limits.max_tokens, self.limits.default_max_tokens)
                await self._dispatch(request)
            except ProtocolError as e:
                self._error(e.code, str(e), e.request_id, e.session)

    def _error(self, code: str, message: str, request_id: Any = None, session: str | None = None) -> None:
        fields = {"code": code, "message": message}
        if session is not None:
            fields["session"] = session
        self.send(event("error", request_id, **fields))

    def _session_of(self, request: Request) -> SessionRecord:
        if request.session is None:
            if len(self.sessions) == 1:
                return next(iter(self.sessions.values()))
            raise ProtocolError("bad_message", "name the session (\"session\": ID): this connection holds "
                                               f"{len(self.sessions)} sessions", request.id)
        es = self.sessions.get(request.session)
        if es is None or es.closed:
            raise ProtocolError("unknown_session", f"this connection has no session {request.session!r}; "
                                                   "open it first", request.id, request.session)
        return es

    async def _dispatch(self, request: Request) -> None:
        rid = request.id
        try:
            if isinstance(request, Open):
                await self._open(request)
                return
            es = self._session_of(request)
            if isinstance(request, Append):
                pending = self.engine.append(es, request.text if request.text is not None else request.tokens)
                self._tasks.start_soon(self._acknowledge_append, es, pending, rid)
            elif isinstance(request, Generate):
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
                self.send(event("snapshot", rid, session=es.id, position=position))
            elif isinstance(request, Close):
                self.engine.cancel(es)
                await self.engine.close(es)
                self.sessions.pop(es.id, None)
                self.send(event("closed", rid, session=es.id))
        except EngineError as e:
            self._error(e.code, str(e), rid, request.session)
        except (ValueError, TypeError, StoppedError) as e:
            code = "snapshot_error" if isinstance(e, SnapshotError) else "invalid"
            self._error(code, str(e), rid, request.session)
        except ProtocolError:
            raise
        except Exception as e:  # noqa: BLE001 - one failed request must not end the connection
            log.exception("request %r failed", request)
            self._error("internal", f"the server failed on this request: {type(e).__name__}: {e}", rid,
                        request.session)

    async def _open(self, request: Open) -> None:
        if len(self.sessions) >= self.limits.sessions_per_connection:
            raise ProtocolError("limit", f"this connection already holds {len(self.sessions)} sessions "
                                         f"(the limit); close one first", request.id)
        if request.session is None:
            es = await self.engine.open(seed=request.seed)
        else:
            es = await self.engine.resume(request.session)
            if es.owner is not None and es.owner is not self:
                raise EngineError("session_busy", "another connection holds this session")
        es.owner = self
        self.sessions[es.id] = es
        self.send(event("opened", request.id, session=es.id, position=es.position))

    async def _acknowledge_append(self, es: SessionRecord, pending, request_id: Any) -> None:
        try:
            position = await self.engine.consumed(pending)
        except EngineError as e:
            self._error(e.code, str(e), request_id, es.id)
        except (ValueError, TypeError) as e:
            self._error("invalid", str(e), request_id, es.id)
        else:
            self.send(event("appended", request_id, session=es.id, position=position))

    async def _generate(self, es: SessionRecord, request: Generate) -> None:
        try:
            stream = await self.engine.generate(es, request.params)
        except EngineError as e:
            self._error(e.code, str(e), request.id, es.id)
            return
        except (ValueError, TypeError, StoppedError) as e:
            self._error("invalid", str(e), request.id, es.id)
            return
        finally:
            cancel_requested = self._starting.pop(es.id, False)
        if cancel_requested:
            self.engine.cancel(es)
        # A token's "id" is the token id; the request id comes back on "done".
        outgoing = _Outgoing(self, stream, TokenFrames(es.id), request.id, request.coalesce)
        try:
            await self.server.pump.stream(outgoing)
        finally:
            await stream.aclose()  # cancels the generation if it has not ended (e.g. the connection closed)


class _Outgoing:
    """One generation's way to its client: its token stream, how its frames
    are made and sent, and when the last frame went out."""

    __slots__ = ("conn", "stream", "frames", "request_id", "coalesce", "last_sent", "finished")

    def __init__(self, conn: _Connection, stream: TokenStream, frames: TokenFrames, request_id: Any,
                 coalesce: bool):
        self.conn, self.stream, self.frames = conn, stream, frames
        self.request_id, self.coalesce = request_id, coalesce
        self.last_sent = -math.inf
        self.finished = anyio.Event()

    def send_ready(self, now: float) -> None:
        """Queue frames for every token ready now, then the `done` event if
        the generation ended."""
        tokens = self.stream.take_ready()
        conn, frames = self.conn, self.frames
        if tokens:
            if self.coalesce:
                conn.send(frames.tokens(tokens))
            else:
                for token in tokens:
                    conn.send(frames.token(token))
            self.last_sent = now
        done = self.stream.done
        if done is not None:
            fields = {"session": frames.session_id, "reason": done.reason, "position": done.position}
            if done.text:
                fields["text"] = done.text
            conn.send(event("done", self.request_id, **fields))
            self.finished.set()


class _TokenPump:
    """Moves tokens from the engine to the connections' send queues for
    every generation of the server, in one pass after each engine tick.

    With a task per generation, each token (or coalesced frame) cost a
    wake-up of that task, a timer and a few event objects: at 256 streams,
    most of the event loop's time. Here a tick's tokens cost one wake-up of
    this task and a look at each stream. A coalesced stream gets a frame when
    `interval` has passed since its last one (each frame takes every token
    ready by then); the others get one frame per token, every tick; a
    generation's end is sent at once, with any tokens before it.
    """

    def __init__(self, engine: Engine, interval: float):
        self.engine = engine
        self.interval = interval
        self.seconds = 0.0  # spent in pump(): building and writing frames (monitoring)
        self._streams: dict[int, _Outgoing] = {}
        self._added = anyio.Event()

    async def stream(self, outgoing: _Outgoing) -> None:
        """Send `outgoing`'s tokens, then its `done`, returning once the
        generation has ended; leaving early (cancellation) stops sending."""
        key = id(outgoing)
        self._streams[key] = outgoing
        self._added.set()
        try:
            outgoing.send_ready(time.monotonic())  # tokens ready before it was registered
            if not outgoing.finished.is_set():
                await outgoing.finished.wait()
        finally:
            self._streams.pop(key, None)

    async def run(self) -> None:
        next_due = math.inf
        while True:
            if not self._streams:
                self._added = anyio.Event()
                await self._added.wait()
            # Wake at the next tick, or when a coalesced frame falls due without one.
            with anyio.move_on_after(next_due):
                await self.engine.wait_tick()
            next_due = self.pump()
            await anyio.lowlevel.checkpoint()

    def pump(self) -> float:
        """Queue the frames due now (see the class docstring). Returns the
        seconds until a stream still holding tokens is due a frame (inf: none)."""
        now, interval, next_due = time.monotonic(), self.interval, math.inf
        for out in list(self._streams.values()):
            stream = out.stream
            if not stream.ready:
                continue
            if out.coalesce and now - out.last_sent < interval and not stream.ending:
                next_due = min(next_due, out.last_sent + interval - now)
            else:
                try:
                    out.send_ready(now)
                except Exception as e:  # noqa: BLE001 - one broken stream must not stop the others
                    log.exception("sending tokens of session %s failed", out.frames.session_id)
                    out.conn.send(event("error", out.request_id, code="internal", session=out.frames.session_id,
                                        message=f"the server failed to send tokens: {type(e).__name__}: {e}"))
                    self._streams.pop(id(out), None)
                    out.finished.set()  # its generate task ends, which cancels the generation
        self.seconds += time.monotonic() - now
        return next_due


@contextlib.contextmanager
def serve_in_thread(server: Server) -> Iterator[str]:
    """Run `server` on an event loop in a background thread; yields its URL.
    Leaving the block stops it (sessions are suspended to the store, as on
    SIGTERM). For tests, examples and notebooks."""
    with anyio.from_thread.start_blocking_portal(backend="asyncio") as portal:
        future, _port = portal.start_task(server.serve)
        try:
            yield server.url
        finally:
            portal.call(server.stop)
            future.result(timeout=60)
