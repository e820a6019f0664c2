"""Nothing acknowledged is lost by a real `streamgemma serve` on a directory
store (issue #19): after a SIGTERM during a generation the restarted server's
session holds exactly the tokens the client received (the server ends the
generations and sends their last frames before closing connections); after
a SIGKILL during a generation it holds at least every acknowledged input and
every token the client received (the journal), the client gets what it
missed with `open(..., since=...)`, and the continuation is token-identical
to a plain session that never stopped."""

from __future__ import annotations

import signal

import anyio
import websockets
from test_serve_cli import Running, free_port, serve_command
from textfixtures import saved_model_dir  # noqa: F401 (fixture)

import streamgemma as sg

PROMPT = "the quick brown fox jumps over the lazy dog"
SEED = 5


def reference_tokens(model_dir, n: int) -> list[int]:
    """The first `n` tokens a never-stopped session generates (unseeded
    generations continue the session's stream, seeded with SEED at open)."""
    session = sg.load(model_dir, device="cpu").session(seed=SEED)
    session.feed(PROMPT)
    return [t.id for t in session.generate(max_tokens=n, stop_token_ids=[])]


async def generate_until_signal(url: str, session: str | None, proc, signum: int, after: int):
    """Open (or reopen) the session, generate, send `signum` to the server
    after `after` tokens; returns (session, tokens received, appended position)."""
    received: list[int] = []
    async with sg.Client(url) as client:
        s = await client.open(session, seed=None if session else SEED)
        appended = await s.append(PROMPT) if session is None else s.position
        try:
            async for token in s.generate(max_tokens=4000, stop_token_ids=[]):
                received.append(token.id)
                if len(received) == after:
                    proc.send_signal(signum)
        except (ConnectionError, websockets.ConnectionClosed):
            pass  # SIGKILL: the connection drops
    return s, received, appended


def test_no_acknowledged_token_is_lost_on_sigterm_or_sigkill(saved_model_dir, tmp_path):  # noqa: F811
    store = tmp_path / "store"

    def start() -> Running:
        port = free_port()
        server = Running(serve_command(saved_model_dir, "--port", str(port), "--store", str(store)), port)
        server.wait_listening()
        return server

    # 1. SIGTERM during a generation: the client gets every token and the final done.
    server = start()
    s, first, appended = anyio.run(generate_until_signal, server.url, None, server.proc, signal.SIGTERM, 30,
                                   backend="asyncio")
    assert server.proc.wait(60) == 0
    assert s.last_done is not None and s.last_done["reason"] == "cancelled"
    assert s.last_done["position"] == appended + len(first)

    # 2. The restarted server has exactly that; SIGKILL it during a generation.
    server = start()
    try:
        s2, second, position = anyio.run(generate_until_signal, server.url, s.id, server.proc, signal.SIGKILL, 25,
                                         backend="asyncio")
        assert position == appended + len(first)
        server.proc.wait(60)
    finally:
        server.proc.kill()
        server.proc.communicate()

    # 3. After the crash: every token received is there, the missed ones come with `open`.
    server = start()
    try:
        async def reopen():
            async with sg.Client(server.url) as client:
                s3 = await client.open(s2.id, since=s2.position - 5)  # 5 before its last position
                tail = [t.id async for t in s3.generate(max_tokens=10, stop_token_ids=[])]
                return s3, tail

        s3, tail = anyio.run(reopen, backend="asyncio")
    finally:
        code, err = server.stop()
    assert code == 0, err
    seen = first + second
    assert s3.position - 10 >= appended + len(seen)
    assert s2.position == appended + len(seen)
    assert s3.missed["from"] == s2.position - 5 and s3.missed["ids"][:5] == seen[-5:]
    missed = s3.missed["ids"][5:]  # generated, not received (none if the kill came between two frames)
    assert len(missed) == s3.position - 10 - s2.position
    assert seen + missed + tail == reference_tokens(saved_model_dir, len(seen) + len(missed) + 10)
