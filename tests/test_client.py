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


def test_a_refused_generate_request_raises_instead_of_hanging(server):
    """The server answers a malformed generate (an unknown field) with an error that names no session:
    the generation's iterator raises it (it used to wait forever)."""
    async def main():
        async with sg.Client(server.url, timeout=10) as client:
            session = await client.open()
            await session.append(PROMPT)
            with anyio.fail_after(10), pytest.raises(sg.ServerError) as refused:
                async for _ in session.generate(max_token=5):  # (a typo of max_tokens)
                    pass
            return refused.value.code

    assert run(main) == "bad_message"


@pytest.mark.parametrize("coalesce", [True, False])
def test_position_counts_input_sent_during_a_generation(server, coalesce):
    """`send_append` mid-generation: its `appended` (no request id) still moves `position`, which
    never goes backwards and ends at the server's; resuming from 10 before it returns the last 10."""
    async def main():
        async with sg.Client(server.url, coalesce=coalesce) as client:
            s = await client.open(seed=1)
            await s.append(PROMPT)
            seen, positions = [], []
            async for t in s.generate(max_tokens=40, stop_token_ids=NO_STOP):
                seen.append(t.id)
                positions.append(s.position)
                if len(seen) == 3:
                    await s.send_append(" and the cat")
            assert s.position == s.last_done["position"] == server.engine.sessions[s.id].position
            assert all(b >= a for a, b in zip(positions, positions[1:]))
        s.position -= 10  # a client that missed the last 10 tokens
        async with sg.Client(server.url) as client:
            again = await client.open(s)
            return seen, again.missed

    seen, missed = run(main)
    assert missed["ids"] == seen[-10:]


def test_on_the_wire_every_token_comes_before_a_position_that_counts_it(server):
    """The protocol's rule for `since` (after the last `appended`, plus one per token received since)
    holds with coalesced frames too: input appended mid-generation is acknowledged only after the
    tokens generated before it went out."""
    import json

    from websockets.asyncio.client import connect

    async def main():
        async with connect(server.url) as ws:
            async def ask(msg):
                await ws.send(json.dumps(msg))
                return json.loads(await ws.recv())

            sid = (await ask({"type": "open", "id": 1, "seed": 1}))["session"]
            position = (await ask({"type": "append", "id": 2, "session": sid, "text": PROMPT}))["position"]
            await ws.send(json.dumps({"type": "generate", "id": 3, "session": sid, "max_tokens": 400,
                                      "stop_token_ids": [], "coalesce": True}))
            inputs, checked = 0, []
            while True:
                e = json.loads(await ws.recv())
                if e["type"] in ("token", "tokens"):
                    position += len(e["ids"]) if e["type"] == "tokens" else 1
                    if position > 30 and inputs < 3:  # input mid-generation, a few times
                        inputs += 1
                        await ws.send(json.dumps({"type": "append", "id": 10 + inputs, "session": sid,
                                                  "tokens": [20, 21, 22, 23, 24]}))
                elif e["type"] == "appended":
                    checked.append((e["position"], position + 5))
                    position = e["position"]
                elif e["type"] == "done":
                    checked.append((e["position"], position))
                    return checked

    checked = run(main)
    assert len(checked) == 4 and all(got == want for got, want in checked), checked


def test_after_the_client_exits_a_request_is_a_connection_error(server):
    async def main():
        async with sg.Client(server.url) as client:
            session = await client.open()
        assert isinstance(client.closed_error, ConnectionError)
        with pytest.raises(ConnectionError, match="the client was closed"):
            await session.append("more")

    run(main)


def test_late_tokens_of_a_generation_given_up_on_do_not_reach_the_next_one():
    """A server that ends a cancelled generation only after the client's timeout: the client gives up
    (TimeoutError), and the tokens and `done` of that generation that arrive later are dropped, so the
    session's next generation yields its own tokens only."""
    import json

    from websockets.asyncio.server import serve

    async def scripted(ws):
        held = None  # the generate request whose cancel is answered late
        async for frame in ws:
            msg = json.loads(frame)
            if msg["type"] == "open":
                await ws.send(json.dumps({"type": "opened", "id": msg["id"], "session": "s", "position": 0}))
            elif msg["type"] == "generate" and held is None:
                held = msg["id"]
                await ws.send(json.dumps({"type": "token", "session": "s", "id": 7, "text": "a"}))
            elif msg["type"] == "generate":
                late = [{"type": "token", "session": "s", "id": held, "text": "late"},  # (a token id equal
                        {"type": "tokens", "session": "s", "ids": [8, 8], "texts": ["b", "b"]},  # to the request's)
                        {"type": "done", "session": "s", "id": held, "reason": "cancelled", "position": 4},
                        {"type": "token", "session": "s", "id": 9, "text": "c", "finish_reason": "length"},
                        {"type": "done", "session": "s", "id": msg["id"], "reason": "length", "position": 5}]
                for event in late:
                    await ws.send(json.dumps(event))

    async def main():
        async with serve(scripted, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            async with sg.Client(f"ws://127.0.0.1:{port}", timeout=0.3) as client:
                session = await client.open()
                with pytest.raises(TimeoutError):
                    async with contextlib.aclosing(session.generate(max_tokens=10)) as it:
                        async for _ in it:
                            break  # cancel: the server does not answer within the timeout
                with anyio.fail_after(10):
                    tokens = [t.id async for t in session.generate(max_tokens=1)]
                assert tokens == [9] and session.last_done["reason"] == "length"
                assert session.position == 5

    run(main)


class SlowStore(sg.DirectorySnapshotStore):
    def put(self, session_id, blob):
        import time

        time.sleep(0.05)  # ticks go on meanwhile: the reply's position is behind the tokens sent
        super().put(session_id, blob)


def test_a_snapshot_mid_generation_never_moves_the_position_back(tmp_path):
    """The snapshot's position is the stored state's; tokens generated while the store wrote went out
    before the reply, and the client set its position back to it (a later `since` repeated them)."""
    srv = Server(Engine(text_model(), max_active=4, store=SlowStore(tmp_path)), port=0)

    async def main():
        async with sg.Client(srv.url) as client:
            s = await client.open(seed=1)
            await s.append(PROMPT)
            positions, snapshots = [], []
            async for _ in s.generate(max_tokens=60, stop_token_ids=NO_STOP):
                positions.append(s.position)
                if len(positions) % 10 == 0:
                    snapshots.append(await s.snapshot())
                    positions.append(s.position)
            assert s.position == s.last_done["position"]
            return positions, snapshots

    with serve_in_thread(srv):
        positions, snapshots = run(main)
    assert all(b >= a for a, b in zip(positions, positions[1:])), positions
    assert len(snapshots) == 6
