"""sg.Client at its edges: values JSON cannot carry, a request that never left, frames outside the
protocol, sampling keywords that clash with the protocol's fields, a generation given up on by asyncio."""

from __future__ import annotations

import contextlib

import anyio
import pytest
from test_client import NO_STOP, run, server  # noqa: F401 (server: a fixture)

import streamgemma as sg

PROMPT = "the quick brown fox jumps over the lazy dog"


def test_a_nan_sampling_value_raises_instead_of_hanging(server):
    """json.dumps writes NaN, the server answers bad_json with no id: the generation waits forever."""
    async def main():
        async with sg.Client(server.url, timeout=2) as client:
            session = await client.open()
            await session.append(PROMPT)
            with anyio.fail_after(5):
                with pytest.raises((sg.ServerError, ValueError)):
                    async for _ in session.generate(max_tokens=5, temperature=float("nan")):
                        pass

    run(main)


def test_open_with_a_nan_seed_raises_at_once(server):
    async def main():
        async with sg.Client(server.url, timeout=30) as client:
            with anyio.fail_after(5):
                with pytest.raises((sg.ServerError, ValueError)):
                    await client.open(seed=float("nan"))

    run(main)


def test_a_generate_that_could_not_be_sent_fails_at_once_and_leaves_the_session_usable(server):
    """A sampling value json cannot encode (a set): the generate never leaves the client."""
    async def main():
        async with sg.Client(server.url, timeout=1) as client:
            session = await client.open()
            await session.append(PROMPT)
            with anyio.fail_after(0.5):  # nothing to wait for: the request never went out
                with pytest.raises(TypeError):
                    async for _ in session.generate(max_tokens=5, stop={"x"}):
                        pass
            return session

    run(main)


def test_after_an_unsendable_generate_the_next_generation_yields_its_tokens(server):
    async def main():
        async with sg.Client(server.url, timeout=0.5) as client:
            session = await client.open()
            await session.append(PROMPT)
            with contextlib.suppress(TypeError, TimeoutError):
                async for _ in session.generate(max_tokens=5, stop={"x"}):
                    pass
            with anyio.fail_after(10):
                tokens = [t async for t in session.generate(max_tokens=5, stop_token_ids=NO_STOP)]
            return len(tokens), session.last_done

    n, done = run(main)
    assert n == 5, (n, done)


def test_generate_after_the_connection_dropped_is_a_connection_error_at_once(server):
    async def main():
        async with sg.Client(server.url, timeout=3) as client:
            session = await client.open()
            await session.append(PROMPT)
            await client._ws.close()
            with anyio.fail_after(10):
                while client.closed_error is None:
                    await anyio.sleep(0.01)
            with anyio.fail_after(1):
                with pytest.raises(ConnectionError):
                    async for _ in session.generate(max_tokens=5):
                        pass

    run(main)


@pytest.mark.parametrize("bad", ["not json", "[1, 2]", "null"])
def test_a_malformed_server_frame_is_a_connection_error_not_a_crash(bad):
    from websockets.asyncio.server import serve

    async def scripted(ws):
        async for _frame in ws:
            await ws.send(bad)

    async def main():
        async with serve(scripted, "127.0.0.1", 0) as srv:
            port = srv.sockets[0].getsockname()[1]
            with anyio.fail_after(5):
                async with sg.Client(f"ws://127.0.0.1:{port}", timeout=2) as client:
                    with pytest.raises((ConnectionError, sg.ServerError)):
                        await client.open()

    run(main)


def test_asyncio_wait_for_around_a_generation_leaves_the_session_usable(server):
    import asyncio

    async def main():
        async with sg.Client(server.url, timeout=10) as client:
            session = await client.open()
            await session.append(PROMPT)

            async def consume():
                async for _ in session.generate(max_tokens=4000, stop_token_ids=NO_STOP):
                    await asyncio.sleep(0.001)

            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(consume(), 0.2)
            tokens = [t async for t in session.generate(max_tokens=3, stop_token_ids=NO_STOP)]
            assert len(tokens) == 3
            assert session.position == server.engine.sessions[session.id].position

    run(main)


def test_a_sampling_keyword_named_like_a_protocol_field_does_not_hang(server):
    async def main():
        async with sg.Client(server.url, timeout=2) as client:
            session = await client.open()
            await session.append(PROMPT)
            with anyio.fail_after(5):
                with pytest.raises((TypeError, ValueError, sg.ServerError)):
                    async for _ in session.generate(max_tokens=3, id="mine"):
                        pass

    run(main)


def test_a_refused_send_append_is_raised_by_the_sessions_next_call():
    """The server refuses a send_append (here `capacity`: the one slot generates): the error came
    with no id and the client dropped it, so the app went on as if the input were in the session."""
    from textfixtures import text_model

    from streamgemma.serve.engine import Engine
    from streamgemma.serve.server import Server, serve_in_thread

    srv = Server(Engine(text_model(), max_active=1), port=0)

    async def main():
        async with sg.Client(srv.url) as client:
            busy, other = await client.open(), await client.open()
            await busy.append(PROMPT)
            async with contextlib.aclosing(busy.generate(max_tokens=4000, stop_token_ids=NO_STOP)) as tokens:
                await tokens.__anext__()  # the only slot generates
                await other.send_append(PROMPT)
                with anyio.fail_after(10):
                    while not srv.engine.stats.dropped_inputs:  # refused, its error sent...
                        await anyio.sleep(0.01)
                await busy.snapshot()  # ... and routed: this reply was sent after it
                with pytest.raises(sg.ServerError, match="send_append was refused") as refused:
                    await other.append(" more")
                assert refused.value.code == "capacity"
            assert await other.append(PROMPT) > 0  # raised once; the session is usable

    with serve_in_thread(srv):
        run(main)


def test_a_dropped_connection_is_a_connection_error_whatever_the_call_and_says_why():
    """A request waiting when the server closes (1001, "going away"), and a send after it: each a
    ConnectionError (they were a ServerError and websockets' ConnectionClosedOK), with the reason."""
    import json

    from websockets.asyncio.server import serve

    async def scripted(ws):
        async for frame in ws:
            msg = json.loads(frame)
            if msg["type"] == "open":
                await ws.send(json.dumps({"type": "opened", "id": msg["id"], "session": "s", "position": 0}))
            else:
                await ws.close(1001, "going away")

    async def main():
        async with serve(scripted, "127.0.0.1", 0) as srv:
            port = srv.sockets[0].getsockname()[1]
            with anyio.fail_after(5):
                async with sg.Client(f"ws://127.0.0.1:{port}", timeout=3) as client:
                    session = await client.open()
                    with pytest.raises(ConnectionError, match="1001: going away") as waiting:
                        await session.append("x")
                    assert isinstance(waiting.value, sg.ServerError) and waiting.value.code == "connection_closed"
                    with pytest.raises(ConnectionError):
                        await session.send_append("y")

    run(main)
