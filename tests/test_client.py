"""`sg.Client` against a real in-process server: leaving a generation early
leaves the session ready at its true position, and a refused token is an
`sg` error."""

from __future__ import annotations

import contextlib

import anyio
import pytest
from textfixtures import text_model

import streamgemma as sg
from streamgemma.serve.engine import Engine
from streamgemma.serve.server import Server, serve_in_thread

PROMPT = "the quick brown fox jumps over the lazy dog"
NO_STOP = []  # stop_token_ids=[]: generations run to max_tokens


@pytest.fixture
def server():
    srv = Server(Engine(text_model(), max_active=4), port=0)
    with serve_in_thread(srv):
        yield srv


def run(main, *args):
    return anyio.run(main, *args, backend="asyncio")


@pytest.mark.parametrize("close", ["break", "aclosing"])
def test_leaving_a_generation_early_then_generating_again_works_at_once(server, close):
    async def main():
        async with sg.Client(server.url) as client:
            session = await client.open()
            await session.append(PROMPT)
            for _ in range(3):  # each time at once: no sleep between leaving and generating again
                if close == "break":
                    async for _ in session.generate(max_tokens=4000, stop_token_ids=NO_STOP):
                        break
                else:
                    async with contextlib.aclosing(session.generate(max_tokens=4000, stop_token_ids=NO_STOP)) as it:
                        async for _ in it:
                            break
                    # Closed: the server's done came, so the position counts what was never read.
                    assert session.last_done["reason"] in ("cancelled", "length")
                    assert session.position == server.engine.sessions[session.id].position
                before = session.position  # after a plain break: stale until the next request settles it
                more = [t async for t in session.generate(max_tokens=3, stop_token_ids=NO_STOP)]
                assert len(more) == 3 and session.last_done["reason"] == "length"
                assert session.position > before + 3 if close == "break" else session.position == before + 3
                # The client knows the true position: the tokens it never read are counted.
                assert session.position == server.engine.sessions[session.id].position

    run(main)


def test_a_generation_still_being_read_is_not_cancelled_by_another(server):
    async def main():
        async with sg.Client(server.url) as client:
            session = await client.open()
            await session.append(PROMPT)
            tokens = session.generate(max_tokens=4000, stop_token_ids=NO_STOP)
            await tokens.__anext__()  # held and being read: a second generation is refused
            with pytest.raises(sg.ServerError) as refused:
                await session.generate(max_tokens=2).__anext__()
            assert refused.value.code == "generating"
            await session.cancel()
            rest = [t async for t in tokens]
            assert session.last_done["reason"] == "cancelled" and len(rest) < 4000

    run(main)


def test_a_refused_token_is_a_server_error_with_code_unauthorized():
    srv = Server(Engine(text_model(), max_active=2), port=0, token="s3cret")

    async def main(url):
        for token in (None, "wrong"):
            with pytest.raises(sg.ServerError) as refused:
                async with sg.Client(url, token=token):
                    pass
            assert refused.value.code == "unauthorized" and "token" in str(refused.value)
        async with sg.Client(url, token="s3cret") as client:
            await client.open()

    with serve_in_thread(srv) as url:
        run(main, url)
