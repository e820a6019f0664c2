"""`ClientSession`: one session held by a `Client`'s connection: input,
generations (their tokens, cancellation, the `done` that ends them),
snapshots, and the position of what the client has received."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import anyio
import websockets

from ..types import Token
from .events import GenerationRoute, ServerError, scored_fields


class Connection(Protocol):
    """What a session needs of its `Client`."""

    timeout: float
    coalesce: bool

    @property
    def closed_error(self) -> BaseException | None: ...

    async def request(self, msg: dict) -> dict: ...

    async def send(self, msg: dict) -> None: ...

    async def send_unawaited(self, msg: dict, refused: Callable[[ServerError], object]) -> None: ...

    def generation_events(self, session_id: str) -> contextlib.AbstractContextManager[GenerationRoute]: ...

    def end_route(self, session_id: str, route: GenerationRoute, abandoned: bool = False) -> None: ...


class ClientSession:
    """A session on the server, seen from a `Client`: `id` (keep it to resume
    later) and `position`: what the session has consumed as of the last event
    the client received for it (a reply, a token, a generation's end), so
    after a dropped connection it is what `open(session)` sends as `since`.
    Tokens count when they arrive, before the loop over `generate` reads them."""

    def __init__(self, client: Connection, session_id: str, position: int):
        self.client = client
        self.id = session_id
        self.position = position
        self.last_done: dict | None = None  # the `done` event of the last generation
        # After open(..., since=P): {"from": position, "ids": [...], "text": str}, what came after P.
        self.missed: dict | None = None
        # The generation started last: (a weak reference to its iterator, its route).
        self._running: tuple[weakref.ref, GenerationRoute] | None = None
        self._refused: ServerError | None = None  # a send_append's error, for the next call to raise

    def __repr__(self) -> str:
        return f"ClientSession({self.id!r}, position={self.position})"

    async def append(self, text_or_tokens: str | Sequence[int]) -> int:
        """Send input; returns the position once the server consumed it."""
        self._check_refused()
        reply = await self.client.request(_append(self.id, text_or_tokens))
        return reply["position"]

    async def complete(self, text_or_tokens: str | Sequence[int], **sampling: Any) -> str:
        """Append the prompt, generate (arguments as `generate`) and return
        the generated text in one call."""
        await self.append(text_or_tokens)
        return "".join([t.text async for t in self.generate(**sampling)])

    async def send_append(self, text_or_tokens: str | Sequence[int]) -> None:
        """Send input without waiting for it to be consumed (e.g. while a
        generation streams: it is consumed before the next token). If the
        server refuses it (e.g. `capacity`, `limit`), the next `append`,
        `send_append` or `generate` of this session raises that ServerError."""
        self._check_refused()
        await self.client.send_unawaited(_append(self.id, text_or_tokens), self._note_refused)

    def _note_refused(self, error: ServerError) -> None:
        self._refused = self._refused or error

    def _check_refused(self) -> None:
        """Raise the error a send_append got, once: the input it sent is not in the session."""
        if self._refused is not None:
            error, self._refused = self._refused, None
            raise ServerError(error.code, f"an input sent with send_append was refused ({error})")

    def generate(self, **sampling: Any) -> AsyncIterator[Token]:
        """Start a generation (arguments as `Session.generate`: max_tokens,
        temperature, top_k, top_p, min_p, repetition_penalty,
        presence_penalty, stop, stop_token_ids, seed, logprobs) and yield its tokens.
        Tokens arrive as the server sends them; the last one carries
        finish_reason "stop" or "length". Afterwards `last_done` holds the
        `done` event (reason, position; reason "cancelled" after `cancel`). A
        generation cancelled while text was held back as the possible start
        of a stop string releases it in `last_done["text"]`, not in a token.

        Leaving the loop early cancels the generation: at once inside
        `contextlib.aclosing(session.generate(...))`, else when the next
        generation on this session starts. Either waits (up to the client's
        timeout, shielded from cancellation) for the server's `done`, so the
        session is ready for the next request and `position` counts every
        token the session consumed, the ones never read included."""
        self._check_refused()
        clash = {"type", "session", "id"} & sampling.keys()
        if clash:
            raise TypeError(f"generate() got protocol fields as sampling arguments: {', '.join(sorted(clash))}")
        if isinstance(sampling.get("stop"), str):  # (Session.generate takes one stop string; the protocol a list)
            sampling = {**sampling, "stop": [sampling["stop"]]}
        me: list[weakref.ref] = []
        tokens = self._tokens(sampling, me)
        me.append(weakref.ref(tokens))
        return tokens

    async def _tokens(self, sampling: dict, me: list[weakref.ref]) -> AsyncIterator[Token]:
        await self._settle()
        client = self.client
        with client.generation_events(self.id) as route:
            self._running = (me[0], route)
            try:
                msg = {**sampling, "type": "generate", "session": self.id, "id": route.request_id}
                if client.coalesce:
                    msg["coalesce"] = True
                try:
                    await client.send(msg)
                except (TypeError, ValueError, ConnectionError):  # it never left: no done will come
                    route.close()
                    raise
                async for msg in route.events:
                    if self._note_end(msg):
                        return
                    if msg["type"] == "tokens":  # several tokens in one frame: the last may finish
                        last = len(msg["ids"]) - 1
                        scores = zip(msg["logprobs"], msg["top_logprobs"]) if "logprobs" in msg else None
                        for k, (token_id, text) in enumerate(zip(msg["ids"], msg["texts"])):
                            scored = scored_fields(*next(scores)) if scores is not None else ()
                            yield Token(token_id, text, msg.get("finish_reason") if k == last else None, *scored)
                    else:
                        scored = scored_fields(msg["logprob"], msg["top_logprobs"]) if "logprob" in msg else ()
                        yield Token(msg["id"], msg["text"], msg.get("finish_reason"), *scored)
                raise ConnectionError(f"the connection closed during the generation: {client.closed_error}")
            finally:
                await self._stop(route)

    def _note_end(self, msg: dict) -> bool:
        """True if `msg` ends the generation (`done` is recorded; an error raises)."""
        if msg["type"] == "error":
            raise ServerError(msg.get("code", "?"), msg.get("message", ""))
        if msg["type"] == "done":
            self.last_done = msg
            return True
        return False

    async def _settle(self) -> None:
        """Before a generation starts: if the last one's loop was left without
        closing its iterator (a plain `break`; Python finalizes it later, if
        ever), stop that generation now. One that is still being read is left
        alone: starting another then fails with "generating", as it should."""
        if self._running is not None:
            reader, route = self._running
            if reader() is None:
                await self._stop(route)

    async def _stop(self, route: GenerationRoute) -> None:
        """Cancel `route`'s generation unless it ended, and read its events up
        to the server's `done` (recording its position): shielded, and for at
        most the client's timeout."""
        client = self.client
        with anyio.CancelScope(shield=True):
            if not route.ended.is_set() and not route.cancel_sent and client.closed_error is None:
                route.cancel_sent = True
                # A connection closing meanwhile ends the route too (the reader closes every route).
                with contextlib.suppress(ConnectionError, websockets.ConnectionClosed):
                    await client.send({"type": "cancel", "session": self.id})
            with anyio.move_on_after(client.timeout) as waited:
                with contextlib.suppress(anyio.ClosedResourceError, anyio.EndOfStream, ServerError):
                    async for msg in route.events:
                        self._note_end(msg)
        if waited.cancelled_caught:
            client.end_route(self.id, route, abandoned=True)  # the session may start another generation
            raise TimeoutError(f"the server did not end the cancelled generation on session {self.id} within "
                               f"{client.timeout} s")

    async def cancel(self) -> None:
        """Cancel the running generation: its iterator ends, and `last_done`
        has reason "cancelled" (unless it ended first). No-op when none runs."""
        await self.client.send({"type": "cancel", "session": self.id})

    async def snapshot(self) -> int:
        """Store the session on the server; returns its position."""
        reply = await self.client.request({"type": "snapshot", "session": self.id})
        return reply["position"]

    async def close(self) -> None:
        """End the session on the server for good (its stored snapshot is deleted)."""
        await self.client.request({"type": "close", "session": self.id})


def _append(session_id: str, text_or_tokens: str | Sequence[int]) -> dict[str, Any]:
    if isinstance(text_or_tokens, str):
        return {"type": "append", "session": session_id, "text": text_or_tokens}
    return {"type": "append", "session": session_id, "tokens": list(text_or_tokens)}
