"""Token delivery to the clients: `TokenPump` moves every generation's
tokens from the engine to its connection's send queue, in one pass after
each engine tick; `Outgoing` is one generation's way to its client."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Protocol

import anyio
import anyio.lowlevel

from .engine import Engine
from .protocol import TokenFrames, event
from .streams import TokenStream

log = logging.getLogger("streamgemma.serve.server")


class Sender(Protocol):
    def send(self, frame: str) -> None:
        """Send an event, or queue it; never waits."""


class Outgoing:
    """One generation's way to its client: its token stream, how its frames
    are made and sent, and when the last frame went out."""

    __slots__ = ("conn", "stream", "frames", "request_id", "coalesce", "last_sent", "finished")

    def __init__(self, conn: Sender, stream: TokenStream, frames: TokenFrames, request_id: Any,
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


class TokenPump:
    """Moves tokens from the engine to the connections' send queues for
    every generation of the server, in one pass after each engine tick.

    With a task per generation, each token (or coalesced frame) cost a
    wake-up of that task, a timer and a few event objects: at 256 streams,
    most of the event loop's time. Here a tick's tokens cost one wake-up of
    this task and a look at each stream. A coalesced stream gets a frame when
    `interval` has passed since its last one (each frame takes every token
    ready by then); the others get one frame per token, every tick; a
    generation's end is sent at once, with any tokens before it.

    Streams that started together fall due together: left alone, every
    interval one pump would write all their frames (256 streams: ~5 ms of
    the event loop in one tick, the device idle meanwhile) and the pumps
    between would write none. So a pump writes at most `HEADROOM` times its
    share of the coalesced streams' frames (their number x the mean time
    between pumps / interval), the longest-waiting first; the rest go out at
    the next pump, which spreads the streams over the interval for good.
    """

    HEADROOM = 1.25  # > 1: the frames that fall due never outgrow what the pumps may write
    _SMOOTHING = 0.1  # weight of the last gap between pumps in their running mean

    def __init__(self, engine: Engine, interval: float):
        self.engine = engine
        self.interval = interval
        self.seconds = 0.0  # spent in pump(): building and writing frames (monitoring)
        self.deferred = 0  # frames held for a later pump by the per-pump budget (monitoring)
        self._streams: dict[int, Outgoing] = {}
        self._added = anyio.Event()
        self._last_pump: float | None = None
        self._period = 0.0  # running mean of the time between pumps (0: not known yet)

    async def stream(self, outgoing: Outgoing) -> None:
        """Send `outgoing`'s tokens, then its `done`, returning once the
        generation has ended; leaving early (cancellation) stops sending."""
        key = id(outgoing)
        self._streams[key] = outgoing
        self._added.set()
        try:
            self._send(outgoing, time.monotonic())  # tokens ready before it was registered
            if not outgoing.finished.is_set():
                await outgoing.finished.wait()
        finally:
            self._streams.pop(key, None)

    def flush(self, outgoing: Outgoing) -> None:
        """Send `outgoing`'s ready tokens now, coalesced or not: before an event
        that reports its session's position (`appended`, `snapshot`), so that on
        the wire every token comes before a position that counts it."""
        if id(outgoing) in self._streams and outgoing.stream.ready:
            self._send(outgoing, time.monotonic())

    async def run(self) -> None:
        next_due, seen = math.inf, self.engine.deliveries.count
        while True:
            if not self._streams:
                self._added = anyio.Event()
                await self._added.wait()
            # Wake at the next tick, or when a coalesced frame falls due without one; a delivery
            # made since the last pump (e.g. while this task yielded) wakes it at once.
            with anyio.move_on_after(next_due):
                await self.engine.deliveries.wait(seen)
            seen = self.engine.deliveries.count
            next_due = self.pump()
            await anyio.lowlevel.checkpoint()

    def pump(self) -> float:
        """Queue the frames due now (see the class docstring). Returns the
        seconds until a stream still holding tokens is due a frame (inf: none)."""
        now, interval, next_due = time.monotonic(), self.interval, math.inf
        if self._last_pump is not None:
            gap = min(now - self._last_pump, interval)  # (an idle spell says nothing of the tick)
            self._period = gap if not self._period else self._period + self._SMOOTHING * (gap - self._period)
        self._last_pump = now
        due, coalesced = [], 0
        for out in list(self._streams.values()):
            coalesced += out.coalesce
            stream = out.stream
            if not stream.ready:
                continue
            if out.coalesce and not stream.ending:
                wait = out.last_sent + interval - now
                if wait > 0:
                    next_due = min(next_due, wait)
                else:
                    due.append(out)
            else:
                self._send(out, now)
        budget = self._budget(coalesced)
        if len(due) > budget:
            due.sort(key=lambda out: out.last_sent)
            self.deferred += len(due) - budget
            due = due[:budget]
            next_due = min(next_due, self._period)  # at the next tick, or after as long without one
        for out in due:
            self._send(out, now)
        self.seconds += time.monotonic() - now
        return next_due

    def _budget(self, coalesced: int) -> int:
        """The most coalesced frames one pump writes: HEADROOM x their share of
        the streams' frames over the time between pumps (all, until that is known)."""
        if not self._period:
            return coalesced
        return max(1, math.ceil(self.HEADROOM * coalesced * self._period / self.interval))

    def _send(self, out: Outgoing, now: float) -> None:
        try:
            out.send_ready(now)
        except Exception as e:  # noqa: BLE001 - one broken stream must not stop the others
            log.exception("sending tokens of session %s failed", out.frames.session_id)
            out.conn.send(event("error", out.request_id, code="internal", session=out.frames.session_id,
                                message=f"the server failed to send tokens: {type(e).__name__}: {e}"))
            self._streams.pop(id(out), None)
            out.finished.set()  # its generate task ends, which cancels the generation
