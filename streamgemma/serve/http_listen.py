"""The HTTP API's listening socket (aiohttp): connections past the server's
limit answered 503 at once, an idle timeout, and one log line (not a
traceback) for a request aiohttp cannot parse. Anyone who can reach the port
may open connections before any token is checked: without the cap, idle
ones could use up the file descriptors the store needs (docs/serving.md)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable

from aiohttp import web
from aiohttp.http import HttpProcessingError

log = logging.getLogger("streamgemma.serve.http")
# The addresses the server listens on: its own logger, so `serve --quiet` can still say them.
address_log = logging.getLogger("streamgemma.serve.address")

BUSY_WAIT_S = 2.0  # how long a connection refused for want of room may take to send its request
# Connections refused with an answer at once, beyond which one is closed unanswered (on each port: a flood
# of connections must not use up the file descriptors while they wait for their answer).
REFUSED_AT_ONCE = 64
BUSY_BODY = json.dumps({"error": {"message": "too many connections; retry later", "type": "server_error",
                                  "code": "too_many_connections", "param": None}}).encode()
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(BUSY_BODY)).encode() + b"\r\n\r\n" + BUSY_BODY)


def netloc(host: str | None, port: int) -> str:
    """host:port as a URL writes it: an IPv6 address in brackets."""
    host = host or ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_failure(e: Exception) -> str:
    """Why binding failed, without the call that raised it ("Address already in use")."""
    if isinstance(e, UnicodeError):  # (IDNA, e.g. "a..b")
        return "not a valid host name"
    errno = getattr(e, "errno", None)
    if isinstance(errno, int) and errno > 0:
        return os.strerror(errno)
    return getattr(e, "strerror", None) or str(e)


def runner(app: web.Application, idle_timeout: float, shutdown_timeout: float) -> web.AppRunner:
    """aiohttp's runner for `app`: a connection that sends no request for `idle_timeout` s is closed
    (aiohttp counts from the connection's start too), parse errors are logged on one line."""
    return web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout,
                         auto_decompress=False, keepalive_timeout=idle_timeout, logger=_ParseErrorLog(log))


async def listen(runner: web.AppRunner, host: str, port: int, room: Callable[[int], bool]) -> asyncio.Server:
    """Accept connections on host:port for `runner` (set up) while `room(n)`, n the connections
    accepted but not counted yet; others get a 503 and are closed. The caller closes the returned
    server before `runner.cleanup()`."""
    handler, loop = runner.server, asyncio.get_running_loop()
    # aiohttp counts a connection once asyncio calls its connection_made, a loop step after the
    # factory; one accept round makes up to `backlog` (100) handlers before any of them is counted.
    # A handler is counted here until it has a transport, for two loop steps at most (the transport
    # made after the factory schedules connection_made): a closed one has no transport either, and
    # kept as "not connected yet" it held a place for a second.
    made: set[web.RequestHandler] = set()
    busy: set[_Busy] = set()

    def protocol() -> asyncio.Protocol:
        if not room(sum(1 for h in made if h.transport is None)):
            return _Busy(busy)
        made.add(h := handler())
        loop.call_soon(loop.call_soon, made.discard, h)
        return h

    return await loop.create_server(protocol, host, port)


def connections(runner: web.AppRunner | None) -> int:
    """Connections open on `runner` now."""
    return len(runner.server.connections) if runner is not None and runner.server is not None else 0


class _Busy(asyncio.Protocol):
    """Answers a request's first bytes with BUSY, ends its side, and reads (discarding) what the client
    still sends until it ends its own or BUSY_WAIT_S pass: a socket closed with a request body unread
    is reset, and the client may never read the answer."""

    transport: asyncio.Transport | None = None
    timer: asyncio.TimerHandle | None = None
    answered = False

    def __init__(self, busy: set[_Busy]):
        self.busy = busy  # those waiting for their answer now

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(BUSY_WAIT_S, transport.close)
        if len(self.busy) >= REFUSED_AT_ONCE:
            transport.abort()
        else:
            self.busy.add(self)

    def data_received(self, data: bytes) -> None:
        if not self.answered:
            self.answered = True
            self.transport.write(BUSY)
            if self.transport.can_write_eof():
                self.transport.write_eof()

    def eof_received(self) -> bool:
        return False  # (the transport closes)

    def connection_lost(self, exc) -> None:
        self.timer.cancel()
        self.busy.discard(self)


class _ParseErrorLog(logging.LoggerAdapter):
    """aiohttp's logger: a request it could not parse (anyone may send one) is a one-line warning."""

    def __init__(self, logger: logging.Logger):
        super().__init__(logger, {})

    def exception(self, msg, *args, exc_info=True, **kwargs) -> None:
        if isinstance(exc_info, HttpProcessingError):
            detail = f"{type(exc_info).__name__}: {exc_info}"
            self.warning(msg + ": %s", *args, detail[:200])
        else:
            self.logger.exception(msg, *args, exc_info=exc_info, **kwargs)
