"""What the `Client`'s reader hands to those waiting: `ServerError`, the
events of one generation (`GenerationRoute`) and the reply to one request
(`Reply`), and how frames and refusals become them."""

from __future__ import annotations

import contextlib
import math

import anyio

from ..errors import StreamgemmaError


class ServerError(StreamgemmaError):
    """The server answered a request with an `error` event: `code` and message
    as sent (see docs/protocol.md)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


class ConnectionClosedError(ServerError, ConnectionError):
    """A request's answer lost with its connection: a ServerError with code
    "connection_closed", and a ConnectionError like every other way a
    dropped connection shows (sending on it, a generation cut off)."""

    def __init__(self, message: str):
        super().__init__("connection_closed", message)


class GenerationRoute:
    """The events of one generation, as the Client routes them to it: tokens,
    then `done` (or an `error` answering its request), after which `ended`
    is set and `events` ends once drained."""

    def __init__(self, request_id: int):
        self.request_id = request_id
        # Unbounded: the server bounds a generation (max_tokens), and a token dropped here would be lost.
        self.send, self.events = anyio.create_memory_object_stream[dict](math.inf)
        self.ended = anyio.Event()
        self.cancel_sent = False

    def deliver(self, msg: dict) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.send.send_nowait(msg)
        if msg.get("type") in ("done", "error"):
            self.close()

    def close(self) -> None:
        self.send.close()
        self.ended.set()


def scored_fields(logprob: float, top: list) -> tuple:
    """A token frame's logprobs as `Token`'s last two fields."""
    return logprob, tuple((int(i), float(lp)) for i, lp in top)


def refusal(status: int, body: bytes | None) -> ServerError:
    """The ServerError for an HTTP status that refused the websocket."""
    code = "unauthorized" if status in (401, 403) else f"http_{status}"
    text = (body or b"").decode("utf-8", "replace").strip().removeprefix(f"{code}:").strip()
    return ServerError(code, text or f"the server refused the connection (HTTP {status})")


class Reply:
    def __init__(self):
        self.ready = anyio.Event()
        self.msg: dict | None = None
        self.error: BaseException | None = None

    def set(self, msg: dict) -> None:
        if self.msg is None:
            self.msg = msg
            self.ready.set()

    def fail(self, error: BaseException) -> None:
        """No reply will come (the connection closed): `result` raises `error`."""
        if self.msg is None:
            self.error = error
            self.set({"type": "error"})

    def result(self) -> dict:
        if self.error is not None:
            raise self.error
        if self.msg.get("type") == "error":
            raise ServerError(self.msg.get("code", "?"), self.msg.get("message", ""))
        return self.msg
