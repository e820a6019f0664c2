"""Fuzz: random and mutated protocol frames and handshakes against a server
in this process; what the server answered, by code. A run fails on any
`internal` error, HTTP 500 or connection closed with 1011 (the server's
own failure), and on engine books that no longer add up.

Frames are, in turn: valid requests of every type; valid ones mutated (a
field dropped, retyped or set to an extreme: huge and negative integers,
seeds past 2**64, floats that float32 turns into 0 or infinity, lone
surrogates, long strings, nested containers); arbitrary JSON values; broken
JSON and binary frames. Handshakes mutate the path and the headers
(duplicate and undecodable Authorization, missing or bad websocket headers).
The test suite runs a seeded 10,000-frame pass (tests/test_fuzz.py).

    streamgemma bench fuzz                            # 100,000 frames, 2,000 handshakes, demo model
    streamgemma bench fuzz --frames 1000000 --seed 7
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import socket
import string
from collections.abc import Iterator

import anyio
import websockets
from websockets.asyncio.client import connect

TYPES = ("open", "append", "generate", "cancel", "snapshot", "close")
EXTREME_INTS = (0, 1, -1, 2, 255, 256, 4095, 4096, 2**31 - 1, 2**31, 2**32, 2**53, 2**62 - 1, 2**62, 2**63 - 1,
                2**63, 2**64 - 1, 2**64, -2**63, -2**63 - 1, 10**24, -10**24, 10**400)
EXTREME_FLOATS = (0.0, -0.0, 1e-46, 1e-300, 1.4e-45, 1e-38, 1e-7, 0.5, 1.0, 1.0000001, 2.0, 3.5e38, 1e39, 1e300,
                  -1.0, -1e-46, 1e308)
STRINGS = ("", "a", "\ud800", "\udc00x", "x\ud83d", "😀", "\x00", "\u2028", "é" * 50, "x" * 300, "\\", '"',
           "<end_of_turn>", "the quick brown fox")
SAMPLING = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
            "stop", "stop_token_ids", "seed", "coalesce")


class FrameMaker:
    """Frames from a seeded random source (see the module docstring).
    sessions: ids the server handed out, so requests can name real ones."""

    def __init__(self, rng: random.Random, vocab: int = 256):
        self.rng = rng
        self.vocab = vocab
        self.sessions: list[str] = []

    def value(self, depth: int = 0):
        r = self.rng
        kind = r.randrange(9 if depth < 3 else 6)
        if kind == 0:
            return None
        if kind == 1:
            return r.random() < 0.5
        if kind == 2:
            return r.choice(EXTREME_INTS)
        if kind == 3:
            return r.choice(EXTREME_FLOATS)
        if kind == 4:
            return r.choice(STRINGS)
        if kind == 5:
            return "".join(r.choice(string.printable) for _ in range(r.randrange(20)))
        if kind == 6:
            return [self.value(depth + 1) for _ in range(r.randrange(4))]
        if kind == 7:
            return {self.key(): self.value(depth + 1) for _ in range(r.randrange(4))}
        return r.randrange(-5, self.vocab + 5)

    def key(self) -> str:
        r = self.rng
        return r.choice(("type", "id", "session", "seed", "text", "tokens", *SAMPLING, "x", "", "\ud800",
                         "k" * 100))

    def session(self):
        r = self.rng
        if self.sessions and r.random() < 0.8:
            return r.choice(self.sessions)
        return r.choice(("no-such-session", "", "..", "a/b", "x" * 201, 5, None))

    def valid(self) -> dict:
        r = self.rng
        kind = r.choice(TYPES)
        msg: dict = {"type": kind}
        if r.random() < 0.7:
            msg["id"] = r.choice((r.randrange(10**6), f"r{r.randrange(1000)}"))
        if kind != "open" and r.random() < 0.95 and self.sessions:
            msg["session"] = r.choice(self.sessions[-16:])  # mostly those this connection still holds
        if kind == "open":
            if r.random() < 0.3 and self.sessions:
                msg["session"] = r.choice(self.sessions)
            elif len(self.sessions) >= 12 and r.random() < 0.9:  # room for more: close one instead
                msg = {"type": "close", "session": r.choice(self.sessions[-16:])}
            if r.random() < 0.5:
                msg["seed"] = r.randrange(-2**63, 2**64)
        elif kind == "append":
            if r.random() < 0.5:
                msg["text"] = " ".join(r.choice(("the", "quick", "fox", "café", "😀", "\n")) for _ in range(5))
            else:
                msg["tokens"] = [r.randrange(self.vocab) for _ in range(r.randrange(1, 40))]
        elif kind == "generate":
            msg.update({"max_tokens": r.randrange(1, 5), "stop_token_ids": []})
            for field, make in (("temperature", lambda: r.choice((0, 0.7, 1.0))), ("top_k", lambda: r.randrange(50)),
                                ("top_p", lambda: r.choice((0.5, 0.9, 1.0))), ("seed", lambda: r.randrange(2**64)),
                                ("coalesce", lambda: r.random() < 0.5), ("stop", lambda: ["fox"])):
                if r.random() < 0.3:
                    msg[field] = make()
        return msg

    def mutated(self) -> dict:
        msg, r = self.valid(), self.rng
        for _ in range(1 if r.random() < 0.7 else r.randrange(2, 4)):
            choice = r.randrange(5)
            if choice == 0 and len(msg) > 1:
                msg.pop(r.choice([k for k in msg if k != "type"] or ["type"]), None)
            elif choice == 1:
                msg[r.choice(list(msg))] = self.value()
            elif choice == 2:
                msg[self.key()] = self.value()
            elif choice == 3:
                msg["session"] = self.session()
            else:
                msg[r.choice(SAMPLING)] = self.value()
        return msg

    def frame(self) -> str | bytes:
        r, roll = self.rng, self.rng.random()
        if roll < 0.3:
            return self.dumps(self.valid())
        if roll < 0.75:
            return self.dumps(self.mutated())
        if roll < 0.85:
            return self.dumps(self.value())
        if roll < 0.97:  # broken JSON: truncated, or a character added
            text = json.dumps(self.mutated())
            cut = r.randrange(len(text) + 1)
            return text[:cut] + (r.choice(string.printable + "é\\") if r.random() < 0.5 else "")
        return bytes(r.randrange(256) for _ in range(r.randrange(30)))

    def dumps(self, value) -> str:
        """JSON text, raw UTF-8 or escaped; lone surrogates always escaped
        (a text frame must be valid UTF-8: only the escape reaches the parser)."""
        if self.rng.random() < 0.5:
            text = json.dumps(value, ensure_ascii=False)
            try:
                text.encode("utf-8")
                return text
            except UnicodeEncodeError:
                pass
        return json.dumps(value)

    def frames(self, n: int) -> Iterator[str | bytes]:
        for _ in range(n):
            yield self.frame()


class Outcome:
    """What the server answered: events by type, errors by code, closes by code."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.internal: list[dict] = []
        self.examples: dict[str, str] = {}  # an error message of each code
        self.sent = 0  # frames sent (fewer than asked if the server closed a connection)

    def add(self, event: dict) -> None:
        kind = event.get("type")
        key = f"error:{event.get('code')}" if kind == "error" else kind
        self.counts[key] += 1
        if kind == "error":
            self.examples.setdefault(key, str(event.get("message"))[:200])
            if event.get("code") == "internal":
                self.internal.append(event)


async def fuzz_connection(url: str, maker: FrameMaker, n: int, outcome: Outcome, token: str | None = None) -> None:
    """Send `n` frames on one connection, reading every event meanwhile;
    returns once the server answered a final marker (frames are handled in
    order) and the generations it started have ended."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with connect(url, max_size=None, additional_headers=headers) as ws:
        finished = anyio.Event()
        synced = {"marker": None, "event": anyio.Event()}

        async def read() -> None:
            try:
                async for frame in ws:
                    event = json.loads(frame)
                    if event.get("type") == "opened" and event.get("session") not in maker.sessions:
                        maker.sessions.append(event["session"])
                    elif event.get("type") == "closed" and event.get("session") in maker.sessions:
                        maker.sessions.remove(event["session"])
                    outcome.add(event)
                    if event.get("id") == "end-of-fuzz":
                        finished.set()
                    elif event.get("id") == synced["marker"]:
                        synced["event"].set()
            except websockets.ConnectionClosed as closed:
                outcome.counts[f"closed:{closed.rcvd.code if closed.rcvd else None}"] += 1
                finished.set()
                synced["event"].set()

        for _ in range(4):  # sessions to name from the start (the sender runs ahead of the replies)
            await ws.send(json.dumps({"type": "open"}))
            event = json.loads(await ws.recv())
            maker.sessions.append(event["session"])
            outcome.add(event)
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            try:
                for k, frame in enumerate(maker.frames(n)):
                    await ws.send(frame)
                    outcome.sent += 1
                    if k % 20 == 19:  # let the server catch up, so frames name the sessions it holds now
                        synced["marker"], synced["event"] = f"sync-{k}", anyio.Event()
                        await ws.send(json.dumps({"type": "sync", "id": synced["marker"]}))
                        with anyio.fail_after(60):
                            await synced["event"].wait()
                        if finished.is_set():  # the server closed the connection
                            break
                await ws.send(json.dumps({"type": "end-of-fuzz", "id": "end-of-fuzz"}))
            except websockets.ConnectionClosed:
                pass
            with anyio.fail_after(120):
                await finished.wait()
            await anyio.sleep(0.2)  # the last short generations' tokens
            tg.cancel_scope.cancel()


def handshake(port: int, rng: random.Random) -> int | None:
    """One mutated websocket handshake; the HTTP status (None: no answer)."""
    headers = [b"Host: 127.0.0.1", b"Upgrade: websocket", b"Connection: Upgrade",
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", b"Sec-WebSocket-Version: 13"]
    path = rng.choice((b"/v1/stream", b"/v1/stream?x=1", b"/", b"/v1/stream/..", b"/%00", b"/" + b"a" * 3000))
    extra = (b"Authorization: Bearer t", b"Authorization: Bearer x", b"Authorization: \xff\xfe",
             b"Authorization: Bearer " + b"t" * 5000, b"Authorization:", b"Sec-WebSocket-Version: 99",
             b"Upgrade: h2c", b"X: \x00", b"Connection: close", b"Sec-WebSocket-Key: !!", b": empty")
    for _ in range(rng.randrange(4)):
        if rng.random() < 0.5 and headers:
            headers.pop(rng.randrange(len(headers)))
        headers.append(rng.choice(extra))
    request = b"GET " + path + b" HTTP/1.1\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        try:
            reply = s.recv(4096)
        except OSError:
            return None
    try:
        return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else None
    except (IndexError, ValueError):
        return None


def fuzz_server(server, frames: int, connections: int, handshakes: int, seed: int) -> dict:
    """Fuzz a running `server` (in another thread); the outcome counts."""
    rng = random.Random(seed)
    outcome = Outcome()
    vocab = server.engine.model.config.vocab_size

    async def frames_pass() -> None:
        for _ in range(connections):
            maker = FrameMaker(random.Random(rng.random()), vocab)
            await fuzz_connection(server.url, maker, frames // connections, outcome, server.token)

    anyio.run(frames_pass, backend="asyncio")
    statuses = collections.Counter(handshake(server.port, rng) for _ in range(handshakes))
    engine = server.engine
    books = engine.inputs.tokens == sum(es.queued_tokens for es in engine.sessions.values()) >= 0
    return {"frames": outcome.sent, "events": dict(outcome.counts),
            "error_examples": outcome.examples,
            "internal": outcome.internal[:10], "handshakes": {str(k): v for k, v in statuses.items()},
            "books_add_up": books}


def failures(result: dict) -> list[str]:
    """What makes a fuzz run fail (empty: it passed)."""
    out = []
    if result["internal"] or result["events"].get("error:internal"):
        out.append(f"{result['events'].get('error:internal', 0)} internal errors, e.g. {result['internal'][:2]}")
    if result["events"].get("closed:1011"):
        out.append(f"{result['events']['closed:1011']} connections closed with 1011")
    if result["handshakes"].get("500"):
        out.append(f"{result['handshakes']['500']} handshakes answered HTTP 500")
    if not result["books_add_up"]:
        out.append("the engine's queued-input books do not add up")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(model="demo", device="cpu")
    parser.add_argument("--frames", type=int, default=100_000, help="frames in all (default 100000)")
    parser.add_argument("--connections", type=int, default=10, help="connections they are spread over, one "
                                                                    "after another (default 10)")
    parser.add_argument("--handshakes", type=int, default=2000, help="mutated handshakes (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def run(args: argparse.Namespace) -> dict:
    import streamgemma as sg
    from streamgemma.serve.server import serve_in_thread

    from . import common

    model = common.build_model(args)
    # Short generations, and no rate limit: the point is every frame, fast.
    limits = sg.Limits(max_tokens=4, default_max_tokens=4, messages_per_second=1e9, bytes_per_second=1e12)
    server = sg.Server(sg.Engine(model, max_active=8), port=0, token="t", limits=limits)
    with serve_in_thread(server):
        result = fuzz_server(server, args.frames, args.connections, args.handshakes, args.seed)
    result["model"] = common.describe(model)
    result["failures"] = failures(result)
    print(json.dumps({k: v for k, v in result.items() if k != "model"}, indent=1))
    return result
