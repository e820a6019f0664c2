"""The token pump's frame budget (serve/pump.py), on a fake clock without a
model: coalesced streams that fall due together are spread over the interval,
never get two frames closer than it, and lose no token; ends and plain
streams are never held back."""

from __future__ import annotations

import json
import math

import anyio
import anyio.lowlevel

from streamgemma.serve.protocol import TokenFrames
from streamgemma.serve.pump import Outgoing, TokenPump
from streamgemma.serve.record import Done
from streamgemma.serve.streams import TokenQueue, TokenStream
from streamgemma.types import Token

INTERVAL, TICK = 0.020, 0.005


class Clock:
    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


class Conn:
    """A connection that records (time, frame) of every event it is sent."""

    def __init__(self, clock: Clock):
        self.clock, self.sent = clock, []

    def send(self, frame: str) -> None:
        self.sent.append((self.clock.now, json.loads(frame)))


def _ids(sent) -> list[int]:
    ids = []
    for _, event in sent:
        if event["type"] in ("token", "tokens"):
            ids += event["ids"] if event["type"] == "tokens" else [event["id"]]
    return ids


async def _pumped(streams: int, ticks: int, monkeypatch, plain: int = 0):
    """`streams` coalesced (and `plain` uncoalesced) streams started in the same
    tick, a token each per tick of TICK seconds: (the pump, conns, frames per pump)."""
    clock = Clock()
    monkeypatch.setattr("streamgemma.serve.pump.time", clock)
    pump = TokenPump(engine=None, interval=INTERVAL)
    queues, outs, per_pump = [], [], []
    async with anyio.create_task_group() as tg:
        for i in range(streams + plain):
            queue = TokenQueue()
            queue.put(Token(id=0, text="a"))
            out = Outgoing(Conn(clock), TokenStream(queue, lambda: None), TokenFrames(f"s{i}"), i,
                           coalesce=i < streams)
            queues.append(queue)
            outs.append(out)
            tg.start_soon(pump.stream, out)  # registers it; its first token goes out at once
        await anyio.wait_all_tasks_blocked()
        for t in range(1, ticks + 1):
            clock.now = t * TICK
            for queue in queues:
                queue.put(Token(id=t, text="a"))
            before = sum(len(out.conn.sent) for out in outs)
            pump.pump()
            per_pump.append(sum(len(out.conn.sent) for out in outs) - before)
        clock.now += TICK
        for queue in queues:
            queue.put(Done("length", ticks + 1))
        pump.pump()  # the ends go out at once, with every token still held
    return pump, [out.conn for out in outs], per_pump


def test_streams_that_fall_due_together_are_spread_over_the_interval(monkeypatch):
    streams, ticks = 40, 60
    pump, conns, per_pump = anyio.run(_pumped, streams, ticks, monkeypatch)
    budget = math.ceil(TokenPump.HEADROOM * streams * TICK / INTERVAL)
    assert max(per_pump[1:]) <= budget < streams  # once the time between pumps is known
    assert pump.deferred > 0
    # without the budget every fourth pump would write all 40 frames and the others none
    late = per_pump[len(per_pump) // 2:]
    assert sum(w > 0 for w in late) >= len(late) * 3 // 4
    for conn in conns:
        frames = [t for t, event in conn.sent if event["type"] != "done"][:-1]  # (the last goes with the end)
        gaps = [b - a for a, b in zip(frames, frames[1:])]
        assert min(gaps) >= INTERVAL - 1e-9  # never closer than the interval
        # held back by a pump or a few while they spread (one interval at most), by a tick or two after
        assert max(gaps) <= 2 * INTERVAL + 1e-9 and max(gaps[len(gaps) // 2:]) <= INTERVAL + 2 * TICK + 1e-9
        assert _ids(conn.sent) == list(range(ticks + 1)) and conn.sent[-1][1]["type"] == "done"


def test_uncoalesced_streams_are_never_held_back(monkeypatch):
    streams, plain, ticks = 40, 3, 12
    _, conns, _ = anyio.run(lambda: _pumped(streams, ticks, monkeypatch, plain=plain))
    for conn in conns[streams:]:
        times = [t for t, event in conn.sent if event["type"] == "token"]
        assert times == [t * TICK for t in range(ticks + 1)]  # a frame a token, every tick


def test_a_delivery_while_the_pump_yields_is_not_missed():
    """The engine signals deliveries (a tick's tokens, a generation's end); one that lands after a
    pump looked at its streams but before it waits again (its task yielded in between) must wake it:
    the last tokens and the `done` of a generation go out even if no tick ever follows."""
    import streamgemma as sg
    from streamgemma.serve.engine import Engine

    model = sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0, device="cpu", dtype="float32")

    async def trial(hops: int) -> bool:
        engine = Engine(model, max_active=1)
        pump = TokenPump(engine, interval=INTERVAL)
        queue, conn = TokenQueue(), Conn(Clock())
        out = Outgoing(conn, TokenStream(queue, lambda: None), TokenFrames("s"), 1, coalesce=False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump.run)
            tg.start_soon(pump.stream, out)
            await anyio.wait_all_tasks_blocked()
            queue.put(Token(id=1, text="a"))
            engine.deliveries.signal()  # what a tick (or the journal's committer) calls
            for _ in range(hops):  # the second delivery lands at each point of the pump's round
                await anyio.lowlevel.checkpoint()
            queue.put(Token(id=2, text="b"))
            queue.put(Done("length", 2))
            engine.deliveries.signal()
            with anyio.move_on_after(2):
                await out.finished.wait()
            tg.cancel_scope.cancel()
        return out.finished.is_set() and _ids(conn.sent) == [1, 2]

    for hops in range(6):
        assert anyio.run(trial, hops, backend="asyncio"), f"the second delivery, {hops} loop turns later, was missed"
