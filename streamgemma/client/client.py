"""`Client`: the protocol of docs/protocol.md from an async application, so
nobody has to write JSON frames by hand.

    async with sg.Client("ws://127.0.0.1:8765/v1/stream", token=T) as client:
        session = await client.open()
        await session.append("Hello")
        async for token in session.generate(max_tokens=20):
            print(token.text, end="")

One connection carries many sessions; a background task reads events and
routes them to the request or generation waiting for them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import anyio
import anyio.from_thread
import websockets
from websockets.asyncio.client import ClientConnection, connect

from ..serve.auth import RedactingLogger, bearer_subprotocols, header_value
from ..types import Token
from .events import ConnectionClosedError, GenerationRoute, Reply, ServerError, refusal
from .portal import Feed, daemon_portal
from .session import ClientSession


class Client:
    """An async connection to a streamgemma server. Use as `async with`.

    url: ws://host:port/v1/stream. token: sent as `Authorization: Bearer`
    (token_via="header"), or as the subprotocol `bearer.<base64url(token)>`
    beside `streamgemma.v1` (token_via="subprotocol", as browsers do; see
    docs/protocol.md); a refused one raises ServerError with code "unauthorized".
    timeout: seconds to wait for the reply to one request. coalesce: ask the
    server to send the tokens of a generation that are ready at once in one
    `tokens` frame (docs/protocol.md); `generate` still yields one `Token` per
    token. Set it False for a server that predates the field. Further keyword
    arguments go to `websockets.asyncio.client.connect` (e.g. max_size)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0, coalesce: bool = True,
                 token_via: str = "header", **connect_options: Any):
        self.url = url
        self.timeout = timeout
        self.coalesce = coalesce
        if token_via not in ("header", "subprotocol"):
            raise ValueError(f"token_via must be 'header' or 'subprotocol', got {token_via!r}")
        if token and token_via == "subprotocol":
            connect_options["subprotocols"] = bearer_subprotocols(token)
        elif token:
            headers = dict(connect_options.get("additional_headers") or {})
            connect_options["additional_headers"] = {**headers, "Authorization": header_value(token)}
        # websockets' debug log writes every handshake header: not the credentials.
        connect_options.setdefault("logger", RedactingLogger(logging.getLogger("websockets.client")))
        self._connect = connect(url, **connect_options)
        self._ws: ClientConnection | None = None
        self._ids = itertools.count(1)
        self._replies: dict[int, Reply] = {}
        self._unawaited: dict[int, Callable[[ServerError], object]] = {}  # send_unawaited: id -> refused
        self._streams: dict[str, GenerationRoute] = {}  # session id -> its running generation
        # The sessions opened here, whose `position` the reader keeps in the order events arrive.
        self._sessions: weakref.WeakValueDictionary[str, ClientSession] = weakref.WeakValueDictionary()
        self._generations: dict[int, str] = {}  # generate requests in flight: request id -> session id
        self._abandoned: dict[str, int] = {}  # session id -> a generation given up on, until its done
        self._tasks: anyio.abc.TaskGroup | None = None
        self._exit: contextlib.AsyncExitStack | None = None
        self._closed_error: BaseException | None = None

    async def __aenter__(self) -> Client:
        async with contextlib.AsyncExitStack() as stack:
            try:
                self._ws = await stack.enter_async_context(self._connect)
            except websockets.InvalidStatus as e:  # refused before the websocket opened
                raise refusal(e.response.status_code, e.response.body) from e
            self._tasks = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(self._tasks.cancel_scope.cancel)  # on exit: stop the reader, then close
            self._tasks.start_soon(self._read)
            self._exit = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info) -> bool | None:
        return await self._exit.__aexit__(*exc_info)

    @classmethod
    def connect_sync(cls, url: str, token: str | None = None, **options: Any) -> SyncClient:
        """A blocking client for scripts and notebooks, connected (arguments
        as `Client`): its own event loop runs in a background thread. Close
        it with `close()` or a `with` block.

            with sg.Client.connect_sync(url, token=T) as client:
                print(client.open().complete("Hello", max_tokens=20))
        """
        return SyncClient(cls(url, token=token, **options))

    async def open(self, session: str | ClientSession | None = None, seed: int | None = None,
                   since: int | None = None) -> ClientSession:
        """A new session (session None) or the stored session `session` (an
        id, or a ClientSession of an earlier connection: then `since`
        defaults to its `position`). With `since`, the last position the
        client saw, the returned session's `missed` holds what the session
        consumed after it (e.g. tokens lost with a dropped connection), so a
        transcript can be made equal to the session's history."""
        msg: dict[str, Any] = {"type": "open"}
        if isinstance(session, ClientSession):
            since = session.position if since is None else since
            session = session.id
        if session is not None:
            msg["session"] = session
        if seed is not None:
            msg["seed"] = seed
        if since is not None:
            msg["since"] = since
        reply = await self.request(msg)
        held = self._sessions.get(reply["session"])
        if held is not None:  # (one object a session: a second one's position would go stale, or the first's)
            held.position, held.missed = reply["position"], reply.get("missed")
            return held
        opened = ClientSession(self, reply["session"], reply["position"])
        opened.missed = reply.get("missed")
        self._sessions[opened.id] = opened
        return opened

    async def request(self, msg: dict) -> dict:
        """Send `msg` with a fresh id and return the server's reply event;
        an `error` reply raises ServerError."""
        request_id = next(self._ids)
        reply = Reply()
        self._replies[request_id] = reply
        try:
            await self.send({**msg, "id": request_id})
            with anyio.fail_after(self.timeout):
                await reply.ready.wait()
        finally:
            self._replies.pop(request_id, None)
        return reply.result()

    async def send_unawaited(self, msg: dict, refused: Callable[[ServerError], object]) -> None:
        """Send `msg` with a fresh id without waiting for its reply; if that
        is an error, `refused(ServerError)` is called (from the reader)."""
        request_id = next(self._ids)
        self._unawaited[request_id] = refused
        try:
            await self.send({**msg, "id": request_id})
        except BaseException:
            del self._unawaited[request_id]
            raise

    async def send(self, msg: dict) -> None:
        """Send `msg` without waiting for a reply (e.g. a cancel)."""
        if self._closed_error is not None:
            raise ConnectionError(f"the connection is closed: {self._closed_error}")
        # allow_nan=False: the server refuses NaN/Infinity as bad_json, an error that cannot carry the id.
        frame = json.dumps(msg, allow_nan=False)
        try:
            await self._ws.send(frame)
        except websockets.ConnectionClosed as e:  # (before the reader saw it): one type for a dropped connection
            raise ConnectionError(f"the connection is closed: {e}") from e

    @property
    def closed_error(self) -> BaseException | None:
        """Why the connection closed, once it has."""
        return self._closed_error

    @contextlib.contextmanager
    def generation_events(self, session_id: str) -> Iterator[GenerationRoute]:
        """Route the events of one generation on `session_id` (tokens, done, or
        an error answering the request) to the yielded route, whose
        `request_id` the generate request must carry. One generation per
        session at a time; the route ends with its `done`."""
        if session_id in self._streams:
            raise ServerError("generating", "a generation is already running on this session: read it to its "
                                            "end, or close its iterator (contextlib.aclosing) or cancel() first")
        route = GenerationRoute(next(self._ids))
        self._streams[session_id] = route
        self._generations[route.request_id] = session_id
        try:
            with route.events:
                yield route
        finally:
            self.end_route(session_id, route)

    def end_route(self, session_id: str, route: GenerationRoute, abandoned: bool = False) -> None:
        """Stop routing events to `route`: its generation ended, or (abandoned)
        was given up on before its `done`; then its late tokens, up to that
        `done`, are dropped rather than reach the session's next generation."""
        if abandoned and not route.ended.is_set():
            self._abandoned[session_id] = route.request_id
        route.close()
        if self._streams.get(session_id) is route:
            del self._streams[session_id]
        if self._abandoned.get(session_id) != route.request_id:  # (else its done still comes)
            self._generations.pop(route.request_id, None)

    async def _read(self) -> None:
        try:
            async for frame in self._ws:
                msg = json.loads(frame)
                if not isinstance(msg, dict):
                    raise ValueError("not a JSON object")
                self._route(msg)
        except websockets.ConnectionClosed as e:
            self._closed_error = e
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # not a protocol event
            self._closed_error = ConnectionError(f"the server sent a frame outside the protocol: {e}")
            with contextlib.suppress(Exception):
                await self._ws.close(1002, "protocol error")
        else:
            code, reason = self._ws.close_code, self._ws.close_reason
            self._closed_error = ConnectionError(f"closed by the server (code {code}{f': {reason}' if reason else ''})")
        finally:
            if self._closed_error is None:  # the reader was cancelled: the client is being closed
                self._closed_error = ConnectionError("the client was closed")
            for reply in self._replies.values():
                reply.fail(ConnectionClosedError(str(self._closed_error)))
            self._unawaited.clear()
            for route in self._streams.values():
                route.close()

    def _route(self, msg: dict) -> None:
        kind, session, request_id = msg.get("type"), msg.get("session"), msg.get("id")
        self._track_position(kind, session, msg)
        if kind == "error" and request_id in self._generations:
            # A refused generate request: its error may name no session (e.g. a malformed request).
            session = self._generations[request_id]
        if kind in ("token", "tokens", "done") or (kind == "error" and request_id in self._generations):
            stale = self._abandoned.get(session)
            ends_stale = kind in ("done", "error") and request_id == stale
            if stale is not None and (kind in ("token", "tokens") or ends_stale):
                if ends_stale:  # what follows is the next generation's
                    del self._abandoned[session]
                    self._generations.pop(stale, None)
                return
            route = self._streams.get(session)
            # A token's "id" is its token id; done and error carry the generate request's id.
            if route is not None and (kind in ("token", "tokens") or request_id == route.request_id):
                route.deliver(msg)
                if route.ended.is_set():  # the session may start its next generation now
                    self.end_route(session, route)
            return
        reply = self._replies.get(request_id)
        if reply is not None:
            reply.set(msg)
        elif (refused := self._unawaited.pop(request_id, None)) is not None and kind == "error":
            refused(ServerError(msg.get("code", "?"), msg.get("message", "")))
        # Other events answer requests sent without an id (cancel): nothing waits for them.

    def _track_position(self, kind: str | None, session: str | None, msg: dict) -> None:
        """A session's position as its events arrive: each token adds one (the
        session consumed it), an event with a position sets it. The server
        sends every token before a position that counts it, so this is the
        position of what the client has received, whenever it is read."""
        opened = self._sessions.get(session) if session is not None else None
        if opened is None:
            return
        if kind == "token":
            opened.position += 1
        elif kind == "tokens":
            opened.position += len(msg.get("ids", ()))
        elif kind == "snapshot" and isinstance(msg.get("position"), int):
            # The stored state's: mid-generation, tokens after it may have come first.
            opened.position = max(opened.position, msg["position"])
        elif isinstance(msg.get("position"), int):
            opened.position = msg["position"]


class SyncClient:
    """`Client` for code without an event loop (from `Client.connect_sync`):
    the same methods, blocking; sessions are `SyncSession`s. Its event loop
    runs in a daemon thread, so a client never closed does not keep the
    interpreter from exiting (its connection just drops)."""

    def __init__(self, client: Client):
        self.client = client
        self._portal, self._thread = daemon_portal()
        try:
            # The connection's task group lives in one task of the portal's loop.
            self._connection = self._portal.wrap_async_context_manager(client)
            self._connection.__enter__()
        except BaseException:
            self._stop_loop()
            raise

    def open(self, session: str | SyncSession | ClientSession | None = None, seed: int | None = None,
             since: int | None = None) -> SyncSession:
        """A new session (session None) or a stored one: arguments as `Client.open`
        (a SyncSession of an earlier connection counts as its ClientSession)."""
        if isinstance(session, SyncSession):
            session = session.session
        return SyncSession(self._portal, self._portal.call(lambda: self.client.open(session, seed, since)))

    def close(self) -> None:
        """Close the connection and stop the background event loop."""
        if self._connection is not None:
            connection, self._connection = self._connection, None
            try:
                connection.__exit__(None, None, None)
            finally:
                self._stop_loop()

    def _stop_loop(self) -> None:
        self._portal.call(self._portal.stop)
        self._thread.join()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class SyncSession:
    """`ClientSession`, blocking (`generate` is an iterator)."""

    def __init__(self, portal, session: ClientSession):
        self._portal = portal
        self.session = session

    @property
    def id(self) -> str:
        return self.session.id

    @property
    def position(self) -> int:
        return self.session.position

    @property
    def missed(self) -> dict | None:
        return self.session.missed

    @property
    def last_done(self) -> dict | None:
        return self.session.last_done

    def __repr__(self) -> str:
        return f"SyncSession({self.id!r}, position={self.position})"

    def append(self, text_or_tokens: str | Sequence[int]) -> int:
        return self._portal.call(self.session.append, text_or_tokens)

    def send_append(self, text_or_tokens: str | Sequence[int]) -> None:
        self._portal.call(self.session.send_append, text_or_tokens)

    def generate(self, **sampling: Any) -> Iterator[Token]:
        """Tokens as they arrive; leaving the loop early (Ctrl-C included) cancels the generation."""
        feed = Feed(self.session.generate(**sampling))
        try:
            self._portal.start_task_soon(feed.run)
            while True:
                try:
                    token = feed.get()
                except StopIteration:
                    return
                yield token
        finally:
            # (A generator finalized after the client closed has nothing left to stop.)
            with contextlib.suppress(RuntimeError):
                self._portal.call(feed.stop)
                feed.finished.wait(self.session.client.timeout)  # (the server's `done`, at most that long)

    def complete(self, text_or_tokens: str | Sequence[int], **sampling: Any) -> str:
        return self._portal.call(lambda: self.session.complete(text_or_tokens, **sampling))

    def cancel(self) -> None:
        self._portal.call(self.session.cancel)

    def snapshot(self) -> int:
        return self._portal.call(self.session.snapshot)

    def close(self) -> None:
        self._portal.call(self.session.close)
