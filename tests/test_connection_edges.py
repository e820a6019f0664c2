"""Websocket connections at their edges (found by a review, each failed before its fix): positions
reported by `snapshot`, sessions an ending or failed `open` leaves behind, a `close` the store
refused, the per-connection and server limits on a session already held, byte rates, stop strings, the
position of `opened` mid-generation, and requests no session can answer."""

from __future__ import annotations

import contextlib
import json
import time

import anyio
import pytest
from textfixtures import text_model
from websockets.asyncio.client import connect

from streamgemma.errors import StoreUnavailable
from streamgemma.serve.engine import Engine
from streamgemma.serve.offload import MemoryStore
from streamgemma.serve.server import Limits, Server, serve_in_thread
from streamgemma.session import journal as journal_module
from streamgemma.session.store import DirectorySnapshotStore

PROMPT = "the quick brown fox jumps over the lazy dog"


def run(main, *args):
    return anyio.run(main, *args, backend="asyncio")


@contextlib.contextmanager
def server(max_active=4, limits=None, **engine_options):
    srv = Server(Engine(text_model(), max_active=max_active, **engine_options), port=0,
                 **({"limits": limits} if limits else {}))
    with serve_in_thread(srv) as url:
        yield srv, url


async def send(ws, msg):
    await ws.send(json.dumps(msg))


async def recv(ws, timeout=20):
    with anyio.fail_after(timeout):
        return json.loads(await ws.recv())


async def until(ws, done, timeout=20):
    seen = []
    with anyio.fail_after(timeout):
        while not seen or not done(seen[-1]):
            seen.append(json.loads(await ws.recv()))
    return seen


async def opened_with_input(ws) -> str:
    await send(ws, {"type": "open"})
    session = (await recv(ws))["session"]
    await send(ws, {"type": "append", "text": PROMPT})
    await recv(ws)
    return session


def test_a_snapshots_position_counts_only_tokens_already_sent(tmp_path, monkeypatch):
    """With a journal, tokens of a tick whose commit is in flight are not sent yet: `snapshot` waits
    for them (it reported a position past the tokens the client had)."""
    append = journal_module.DirectoryJournal.append

    def slow(self, batch):
        time.sleep(0.05)
        return append(self, batch)

    monkeypatch.setattr(journal_module.DirectoryJournal, "append", slow)
    with server(store=DirectorySnapshotStore(tmp_path)) as (srv, url):
        async def main():
            async with connect(url) as ws:
                await send(ws, {"type": "open"})
                await recv(ws)
                await send(ws, {"type": "append", "text": PROMPT})
                position = (await recv(ws))["position"]
                await send(ws, {"type": "generate", "id": "g", "max_tokens": 300, "stop_token_ids": []})
                events = await until(ws, lambda e: e["type"] == "token")
                for i in range(5):
                    await send(ws, {"type": "snapshot", "id": i})
                    events += await until(ws, lambda e: e["type"] in ("snapshot", "done"))
                    assert events[-1]["position"] == position + sum(e["type"] == "token" for e in events)
                await send(ws, {"type": "cancel"})

        run(main)


def test_an_open_right_after_the_holder_closed_waits_for_it():
    """The holder's websocket closed but its connection had not begun to release: `session_busy`."""
    with server() as (srv, url):
        async def main():
            replies = []
            for trial in range(6):
                other = await connect(url)
                ws = await connect(url)
                session = await opened_with_input(ws)
                if trial % 2 == 0:
                    await send(ws, {"type": "generate", "max_tokens": 2000, "stop_token_ids": []})
                    await until(ws, lambda e: e["type"] == "token")
                await ws.close()
                await send(other, {"type": "open", "id": 1, "session": session})
                replies.append((await recv(other, 40)).get("code", "opened"))
                await other.close()
            assert replies == ["opened"] * 6

        run(main)


def test_a_failed_open_with_since_does_not_keep_the_session():
    """`since` reads the session into a slot; with none free the open fails (capacity) and must not leave
    the session held by that connection (every other open of it was `session_busy`)."""
    with server(max_active=1) as (srv, url):
        async def main():
            async with connect(url) as ws:
                detached = await opened_with_input(ws)
            async with connect(url) as busy:  # takes the only slot, generating
                await opened_with_input(busy)
                await send(busy, {"type": "generate", "max_tokens": 4000, "stop_token_ids": []})
                await until(busy, lambda e: e["type"] == "token")
                async with connect(url) as ws:
                    await send(ws, {"type": "open", "id": 1, "session": detached, "since": 0})
                    assert (await recv(ws))["code"] == "capacity"
                    async with connect(url) as again:
                        await send(again, {"type": "open", "id": 2, "session": detached})
                        assert (await recv(again))["type"] == "opened"

        run(main)


class FlakyStore(MemoryStore):
    fail_deletes = 0

    def delete(self, session_id):
        if self.fail_deletes:
            self.fail_deletes -= 1
            raise StoreUnavailable("the store is down (test)")
        return super().delete(session_id)


def test_a_close_the_store_refused_can_be_retried():
    """The retry was `unknown_session` and the snapshot was never deleted."""
    store = FlakyStore()
    with server(store=store) as (srv, url):
        async def main():
            async with connect(url) as ws:
                session = await opened_with_input(ws)
                await send(ws, {"type": "snapshot"})
                await recv(ws)
                store.fail_deletes = 1
                await send(ws, {"type": "close", "id": 1, "session": session})
                assert (await recv(ws))["code"] == "store_unavailable"
                await send(ws, {"type": "close", "id": 2, "session": session})
                assert (await recv(ws))["type"] == "closed"
                assert session not in store.list()

        run(main)


@pytest.mark.parametrize("limit", [{"sessions_per_connection": 1}, {"max_sessions": 1}])
def test_reopening_a_session_the_connection_holds_is_not_a_new_one(limit):
    """Neither the connection's limit nor the server's counts a session already held here."""
    with server(limits=Limits(**limit)) as (srv, url):
        async def main():
            async with connect(url) as ws:
                await send(ws, {"type": "open"})
                session = (await recv(ws))["session"]
                await send(ws, {"type": "open", "id": 2, "session": session, "since": 0})
                assert (await recv(ws))["type"] == "opened"  # (it was `limit`)

        run(main)


def test_the_byte_rate_counts_bytes_not_characters():
    """Frames of 4-byte characters were charged a quarter of their size."""
    size = 100_000

    async def blast(url, char):
        async with connect(url, max_size=None) as ws:
            pad = char * (size // len(char.encode()))
            start = time.monotonic()
            for i in range(5):  # cheap frames: an unknown field, answered bad_message
                await ws.send(json.dumps({"type": "cancel", "id": i, "pad": pad}, ensure_ascii=False))
            for _ in range(5):
                assert (await recv(ws, 30))["code"] == "bad_message"
            return time.monotonic() - start

    with server(limits=Limits(bytes_per_second=size, max_message_bytes=size + 1000)) as (srv, url):
        # 5 frames of `size` bytes at `size` bytes a second, the first from what was saved up: the last
        # is read ~3 s after the first (it was ~0.75 s when a 4-byte character was charged as one)
        assert run(blast, url, "\U0001F600") > 2.5


def test_at_most_sixteen_stop_strings():
    """Each is matched on every token in the tick all sessions share: 70,000 of them slowed every
    other session about five times."""
    with server() as (srv, url):
        async def main():
            async with connect(url) as ws:
                await opened_with_input(ws)
                await send(ws, {"type": "generate", "id": 1, "max_tokens": 2, "stop": [f"s{i}" for i in range(17)]})
                reply = await recv(ws)
                assert reply["code"] == "invalid" and reply["field"] == "stop"
                await send(ws, {"type": "generate", "id": 2, "max_tokens": 2, "stop": [f"s{i}" for i in range(16)],
                                "stop_token_ids": []})
                assert (await until(ws, lambda e: e["type"] == "done"))[-1]["reason"] == "length"

        run(main)


def test_reopening_a_generating_session_reports_only_tokens_already_sent(tmp_path, monkeypatch):
    """`opened` counted tokens still held for the next coalesced frame, or whose commit was in flight, so a
    client that trusted it and reconnected with `since` never got them in `missed`."""
    append = journal_module.DirectoryJournal.append

    def slow(self, batch):
        time.sleep(0.02)
        return append(self, batch)

    monkeypatch.setattr(journal_module.DirectoryJournal, "append", slow)
    with server(store=DirectorySnapshotStore(tmp_path), limits=Limits(coalesce_interval=0.1)) as (srv, url):
        async def main():
            async with connect(url) as ws:
                session = await opened_with_input(ws)
                await send(ws, {"type": "open", "session": session})
                position = (await recv(ws))["position"]
                await send(ws, {"type": "generate", "max_tokens": 400, "stop_token_ids": [], "coalesce": True})
                received = 0
                for i in range(5):
                    await anyio.sleep(0.07)
                    await send(ws, {"type": "open", "id": i, "session": session})
                    events = await until(ws, lambda e: e["type"] in ("opened", "done"))
                    received += sum(len(e["ids"]) if e["type"] == "tokens" else e["type"] == "token" for e in events)
                    assert events[-1]["type"] == "opened" and events[-1]["position"] == position + received
                await send(ws, {"type": "cancel"})

        run(main)


def test_requests_that_cannot_be_answered_as_asked_say_why():
    with server(limits=Limits(max_sessions=4), max_pending_tokens=10) as (srv, url):
        async def main():
            async with connect(url) as ws:
                await send(ws, {"type": "append", "id": 1, "text": "hello"})  # no session held yet
                reply = await recv(ws)
                assert reply["code"] == "unknown_session", reply  # (bad_message before)
                await send(ws, {"type": "open"})
                session = (await recv(ws))["session"]
                await send(ws, {"type": "append", "id": 2, "tokens": list(range(2, 14))})  # 12 > 10, alone
                reply = await recv(ws)
                assert reply["code"] == "limit" and "send it in parts" in reply["message"], reply
                await send(ws, {"type": "open", "id": 3, "session": session, "seed": 5})  # (ignored before)
                reply = await recv(ws)
                assert reply["code"] == "invalid" and reply["field"] == "seed", reply
                await send(ws, {"type": "open", "id": 4, "session": session, "since": 2**80})
                reply = await recv(ws)
                assert reply["code"] == "invalid" and reply["field"] == "since", reply

        run(main)
