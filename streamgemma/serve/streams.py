"""Token delivery from the engine to its readers: one `TokenQueue` per
generation, read as a `TokenStream`."""

from __future__ import annotations

import collections
from collections.abc import Callable

import anyio
import anyio.lowlevel

from ..types import Token
from .record import Done


class TokenQueue:
    """One generation's tokens, then its `Done`: a deque, and an event made
    only while the reader waits (anyio's memory streams cost a scheduling
    round per item, a large share of a server with hundreds of streams).
    Unbounded, but a generation puts at most max_tokens + 1 items."""

    def __init__(self):
        self.items: collections.deque = collections.deque()
        self.reader_gone = False
        self._wakeup: anyio.Event | None = None

    def put(self, item: Token | Done) -> bool:
        """Queue `item`; False (and nothing queued) if the reader has gone."""
        if self.reader_gone:
            return False
        self.items.append(item)
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None
        return True

    async def get(self) -> Token | Done | None:
        """The next item; None once the reader has gone (`close`) and none is left."""
        while not self.items:
            if self.reader_gone:
                return None
            self._wakeup = anyio.Event()
            await self._wakeup.wait()
        return self.items.popleft()

    def close(self) -> None:
        """The reader has gone: nothing more is queued, and a `get` waiting ends."""
        self.reader_gone = True
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None


class TokenStream:
    """The tokens of one generation, as an async iterator of `Token`; after
    it ends, `done` holds the `Done`. Closing it early (aclose, or leaving an
    `async for`) cancels the generation through `cancel`."""

    def __init__(self, queue: TokenQueue, cancel: Callable[[], object]):
        self._queue = queue
        self._cancel = cancel
        self.done: Done | None = None

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> Token:
        if self.done is not None or self._queue.reader_gone:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is None:  # (closed by another task)
            raise StopAsyncIteration
        if isinstance(item, Done):
            self._end(item)
            raise StopAsyncIteration
        return item

    @property
    def queued(self) -> int:
        """Items (tokens and the end) produced and not yet taken."""
        return len(self._queue.items)

    @property
    def ready(self) -> bool:
        """Whether tokens (or the end) are waiting to be taken."""
        return self.done is None and bool(self._queue.items)

    @property
    def ending(self) -> bool:
        """Whether the generation's end is among the items waiting."""
        items = self._queue.items
        return self.done is None and bool(items) and isinstance(items[-1], Done)

    def take_ready(self) -> list[Token]:
        """The tokens already produced and not yet taken, without waiting
        (possibly none); when the end is among them, `done` is set. Lets a
        writer send every ready token in one frame."""
        tokens: list[Token] = []
        items = self._queue.items
        while self.done is None and items:
            item = items.popleft()
            if isinstance(item, Done):
                self._end(item)
                break
            tokens.append(item)
        return tokens

    def _end(self, done: Done) -> None:
        self.done = done
        self._queue.reader_gone = True

    async def aclose(self) -> None:
        """Stop consuming: the generation is cancelled (if still running)."""
        if self.done is None:
            self._cancel()
        self._queue.close()
        await anyio.lowlevel.checkpoint()


class Deliveries:
    """Ticks delivering tokens, or generations ending outside a tick: a
    consumer of many streams (the server's pump) waits for the next one and
    then looks at all its streams at once, instead of a wake-up per token.
    `count` says how many there were, so none is missed between looking and
    waiting: `wait(seen)` returns at once if one came after `seen`."""

    def __init__(self):
        self.count = 0
        self._event = anyio.Event()

    def signal(self) -> None:
        self.count += 1
        event, self._event = self._event, anyio.Event()
        event.set()

    async def wait(self, seen: int | None = None) -> None:
        if seen is None or seen == self.count:
            await self._event.wait()
