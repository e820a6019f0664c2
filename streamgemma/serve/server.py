"""The websocket adapter: `Server` puts an `Engine` behind the protocol of
docs/protocol.md (websockets on asyncio, driven through anyio).

Access model: with a token, every connection must present it (the header
`Authorization: Bearer <token>`, or from a browser the subprotocols
`streamgemma.v1` and `bearer.<base64url(token)>`; see `auth`) or is refused
with HTTP 401 before the websocket opens. The web page at `/` (`static`) is
served to anyone: it holds no secret, and its websocket needs the token.
A session id (secrets.token_urlsafe, 128 bits) is a capability: whoever
knows it (and the token) may resume the session, from any connection, but
only one connection holds a session at a time.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import itertools
import logging
import urllib.parse
from collections.abc import Callable, Iterator
from http import HTTPStatus

import anyio
import anyio.from_thread
import anyio.to_thread
import websockets
import websockets.headers
from websockets.asyncio.server import ServerConnection, serve

from ..errors import ServeError
from . import auth
from .connection import WRITE_BUDGET, Connection
from .engine import Engine
from .http import HttpApi, HttpConfig
from .http_listen import REFUSED_AT_ONCE, address_log, bind_failure, netloc
from .limits import DEFAULT_LIMITS, Limits
from .protocol import PATH
from .pump import TokenPump
from .static import WebPage

__all__ = ["HttpConfig", "Limits", "Server", "serve_in_thread", "WRITE_BUDGET"]

log = logging.getLogger("streamgemma.serve.server")

# File descriptors kept free for the store, the model's files and logs: a server
# at its connection limit must still be able to write snapshots.
RESERVED_FDS = 64
# Frames websockets buffers for a connection whose reader is behind (its
# high-water mark; reading from the socket pauses above it): with 1 MiB frames,
# what a client that sends faster than its rate holds in server memory.
RECEIVE_QUEUE_FRAMES = 4
# At shutdown, how long generations' last frames may take to be sent before connections close.
SHUTDOWN_DRAIN_S = 5.0


class Server:
    """Serves `engine` at ws://host:port/v1/stream.

    token: the bearer token every connection must present (None: no auth;
    an empty token is an error, not "no auth"). `await server.serve()` checks
    the engine's store (StoreError if it cannot be written), runs the
    engine's scheduler and the websocket server until `stop()` (or
    cancellation); on the way out it closes every connection and suspends
    every live session to the engine's store, so a new server on the same
    store resumes them exactly. `lost` then lists the sessions that did not
    reach a durable store. web_page: serve the page of docs/browser.md at
    `/` (GET; no token needed for the page itself). http: also serve the
    OpenAI HTTP API (`http` module, docs/openai.md) on its port, same host,
    token and engine (`self.http` once serving).
    """

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                 limits: Limits = DEFAULT_LIMITS, web_page: bool = True, http: HttpConfig | None = None):
        if token is not None and not token.strip():
            raise ValueError("the token is empty: pass None for no authentication (an empty token usually "
                             "means a command substitution failed)")
        self.engine = engine
        self.host = host
        self.port = port
        self.token = token
        self.limits = limits
        self.web_page = WebPage() if web_page else None
        self.http_config = http
        self.http: HttpApi | None = None
        self.max_connections = limits.max_connections  # lowered at start if the file limit is lower
        self.connections: set[Connection] = set()
        self._accepted: set[_Counted] = set()  # the websocket port's sockets, handshakes included
        self.lost: list[str] = []  # after serve(): sessions not saved to a durable store
        self._numbers = itertools.count(1)
        self._stop = anyio.Event()
        self.pump = TokenPump(engine, limits.coalesce_interval)
        # Monitoring: frames written straight to a socket / through a writer task.
        self.frames_direct = 0
        self.frames_queued = 0

    def open_connections(self) -> int:
        """Connections open now, websocket and HTTP API together, those still in their handshake
        included (`max_connections` bounds them)."""
        return len(self._accepted) + (self.http.connections if self.http is not None else 0)

    @property
    def pump_seconds(self) -> float:
        """Seconds spent building and writing token frames (monitoring;
        with `frames_direct` / `frames_queued`: frames written straight to a
        socket / handed to a connection's writer task for a lagging client)."""
        return self.pump.seconds

    @property
    def frames_deferred(self) -> int:
        """Coalesced frames a pump left for the next one, to spread streams that
        fell due together, counted at each pump that holds one back
        (monitoring; `TokenPump`)."""
        return self.pump.deferred

    @functools.cached_property
    def state_bytes(self) -> int:
        """Bytes of model state one session holds (its slot of the state pool:
        recurrent state, conv buffer, attention ring), whatever its length."""
        return self.engine.model.pool.slot_bytes()

    @property
    def url(self) -> str:
        """The websocket URL clients connect to (the bound port once serving)."""
        return f"ws://{netloc(self.host, self.port)}{PATH}"

    def sessions_held(self) -> int:
        """Sessions held by connections now, with those being opened."""
        return sum(len(conn.sessions) + conn.opening for conn in self.connections)

    def stop(self) -> None:
        """Ask `serve` to shut down (call from the server's event loop)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def serve(self, *, task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until `stop()`. Reports the bound port through task_status
        (port 0 picks a free one). Raises StoreError if the store cannot be
        written, ServeError if the address cannot be bound."""
        await self._check_before_listening()
        limits = self.limits
        started = False
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    ws_server = await stack.enter_async_context(serve(
                        self._handle, self.host, self.port, process_request=self._check_request,
                        select_subprotocol=_select_subprotocol, logger=auth.RedactingLogger(_WS_LOG),
                        max_size=limits.max_message_bytes, max_queue=RECEIVE_QUEUE_FRAMES,
                        ping_interval=limits.ping_interval, ping_timeout=limits.ping_timeout, close_timeout=5,
                        # Token frames are tens of bytes: deflating them costs more
                        # server CPU than it saves on the wire.
                        compression=None,
                        create_connection=functools.partial(_Counted, accepted=self._accepted,
                                                            refuse_at=lambda: self.max_connections + REFUSED_AT_ONCE)))
                # address in use, no such host, port out of range, a name IDNA cannot encode
                except (OSError, OverflowError, UnicodeError) as e:
                    raise ServeError(f"cannot listen on {netloc(self.host, self.port)}: {bind_failure(e)}") from None
                started = True
                self.port = ws_server.sockets[0].getsockname()[1]
                if self.http_config is not None:  # (ServeError here, before any task, if its port is taken)
                    self.http = HttpApi(self.engine, self.host, self.http_config, self.token, limits, self)
                    await self.http.start()
                    stack.push_async_callback(self.http.stop)  # (a no-op once stopped below)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.engine.run)
                    tg.start_soon(self.pump.run)
                    address_log.info("listening on %s", self.url)
                    if self.web_page is not None:
                        address_log.info("web page: http://%s/ (docs/browser.md)", netloc(self.host, self.port))
                    task_status.started(self.port)
                    await self._stop.wait()
                    self.engine.journal.shut_down()  # (a store gone for good must not hold the exit)
                    if self.http is not None:  # its requests end while the engine runs
                        await self.http.stop()
                    await self._end_generations()
                    # Close every connection while the engine runs: their generations end.
                    ws_server.close()
                    await ws_server.wait_closed()
                    tg.cancel_scope.cancel()
        finally:
            if started:
                with anyio.CancelScope(shield=True):
                    await self._save_sessions()

    async def _end_generations(self) -> None:
        """Shutdown, before the connections close: cancel every generation and
        let its last tokens and `done` reach the client (waiting at most
        SHUTDOWN_DRAIN_S), so no client misses a token its session consumed."""
        with anyio.move_on_after(SHUTDOWN_DRAIN_S):
            generating = [es for es in list(self.engine.sessions.values()) if es.generation is not None]
            for es in generating:
                self.engine.cancel(es)
            for es in generating:
                if es.generation is not None:
                    await es.generation.ended.wait()
            await self.engine.journal.drain()  # the last tokens and `done`s wait for their commit
            while any(conn.sending for conn in self.connections):
                await anyio.sleep(0.01)

    async def _check_before_listening(self) -> None:
        store = self.engine.store
        notes = await anyio.to_thread.run_sync(store.prepare)
        log.info("snapshot store: %s%s", store.describe(), f" ({notes})" if notes else "")
        if self.token is not None:
            log.info("authentication: a bearer token is required")
        elif _is_loopback(self.host):
            log.info("authentication: off (no token); only this machine can connect")
        else:
            log.warning("authentication: off, and listening on %s beyond this machine: anyone who can reach "
                        "the port can use this server (set STREAMGEMMA_TOKEN or --token)", self.host or "*")
        self.max_connections = _connections_allowed(self.limits.max_connections)

    async def _save_sessions(self) -> None:
        """Shutdown: suspend every session to the store and say what happened to them."""
        engine = self.engine
        stored = await engine.suspend_all()
        store = engine.store
        if store.durable:
            self.lost = list(engine.unsaved)
            log.info("shutdown: %d sessions saved to %s, %d could not be saved", len(stored), store.describe(),
                     len(self.lost))
            if self.lost:
                log.error("shutdown: sessions not saved (lost): %s", ", ".join(self.lost))
        else:
            self.lost = sorted(set(stored) | set(engine.unsaved))
            log.info("shutdown: %d sessions were kept in %s only (no store directory) and are lost at exit",
                     len(self.lost), store.describe())

    def _check_request(self, connection: ServerConnection, request: websockets.http11.Request):
        """Before the handshake: the path, the connection limit and the bearer
        token. Anything odd in the request is a 4xx, never a 500."""
        try:
            return self._refusal(connection, request)
        except Exception:  # noqa: BLE001 - a malformed request must not become an HTTP 500
            log.exception("refused a malformed request")
            return connection.respond(HTTPStatus.BAD_REQUEST, "bad request\n")

    def _refusal(self, connection: ServerConnection, request: websockets.http11.Request):
        if request.path.split("?", 1)[0] != PATH:
            page = self.web_page.response(request.path) if self.web_page is not None else None
            if page is not None and getattr(request, "method", "GET") != "GET":  # .method: websockets >= 14
                return connection.respond(HTTPStatus.METHOD_NOT_ALLOWED, "only GET\n")
            return page or connection.respond(HTTPStatus.NOT_FOUND, f"not found: the websocket endpoint is {PATH}\n")
        if self.stopping:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down\n")
        if self.open_connections() > self.max_connections:  # (this one is counted)
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections; retry later\n")
        origin = request.headers.get("Origin")  # (with a token, the token is what keeps other sites out)
        if self.token is None and origin is not None \
                and urllib.parse.urlsplit(origin).netloc.lower() != request.headers.get("Host", "").lower():
            return connection.respond(HTTPStatus.FORBIDDEN, "a page of another origin may not connect to a server "
                                                            "without a token\n")
        if self.token is not None:
            refused = self._unauthorized(connection, request)
            if refused is not None:
                return refused
        # (checked here, not by websockets: its refusal would quote the header, token included, in its
        # debug log and in the answer)
        try:
            for value in request.headers.get_all("Sec-WebSocket-Protocol"):
                websockets.headers.parse_subprotocol(value)
        except websockets.exceptions.InvalidHeader:
            return connection.respond(HTTPStatus.BAD_REQUEST, "malformed Sec-WebSocket-Protocol header\n")
        return None

    def _unauthorized(self, connection: ServerConnection, request: websockets.http11.Request):
        try:
            auth.check(self.token, request.headers.get_all("Authorization"),
                       auth.offered_subprotocols(request.headers.get_all("Sec-WebSocket-Protocol")))
        except auth.Refused as e:
            if e.status != HTTPStatus.UNAUTHORIZED:
                return connection.respond(e.status, f"{e}\n")
            response = connection.respond(HTTPStatus.UNAUTHORIZED, f"unauthorized: {e}\n")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        if self.open_connections() > self.max_connections:  # handshakes that raced past _check_request
            await ws.close(1013, "too many connections; retry later")
            return
        conn = Connection(self, ws, next(self._numbers))
        self.connections.add(conn)
        log.info("connection %d from %s", conn.number, _peer(ws))
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            log.info("connection %d closed (%s); %d sessions detached", conn.number, _close_reason(ws),
                     len(conn.sessions))


_WS_LOG = logging.getLogger("websockets.server")


class _Counted(ServerConnection):
    """A connection to the websocket port, counted from its accept to its close: one that never
    sends its request holds a file descriptor until websockets' open_timeout. Past the limit by
    REFUSED_AT_ONCE it is closed at once, unanswered (a flood must not use up the descriptors)."""

    def __init__(self, *args, accepted: set[_Counted], refuse_at: Callable[[], int], **kwargs):
        super().__init__(*args, **kwargs)
        self.accepted, self.refuse_at = accepted, refuse_at

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.accepted) >= self.refuse_at():
            transport.abort()
        else:
            self.accepted.add(self)

    def connection_lost(self, exc) -> None:
        self.accepted.discard(self)
        super().connection_lost(exc)


def _select_subprotocol(connection: ServerConnection, offered) -> str | None:
    return auth.select_subprotocol(offered)


def _is_loopback(host: str | None) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, or "" (every interface)
        return False


def _connections_allowed(wanted: int) -> int:
    """`wanted`, or fewer if the process may not open that many files (and
    the soft limit cannot be raised): past it, snapshot writes would fail."""
    try:
        import resource
    except ImportError:  # not POSIX
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + RESERVED_FDS + 2 * REFUSED_AT_ONCE  # (each port's refused connections wait for their 503)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        if soft < need:
            allowed = max(1, soft - RESERVED_FDS - 2 * REFUSED_AT_ONCE)
            log.warning("the file limit (%d) allows %d connections, not %d: raise it (ulimit -n) for more",
                        soft, allowed, wanted)
            return allowed
    return wanted


def _peer(ws: ServerConnection) -> str:
    address = getattr(ws, "remote_address", None)
    return netloc(address[0], address[1]) if address else "?"


def _close_reason(ws: ServerConnection) -> str:
    code = getattr(ws, "close_code", None)
    return f"code {code}" if code is not None else "no close frame"


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
