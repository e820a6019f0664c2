"""Regression tests of issue #23: one client must never hurt another. One
test (or a few) per numbered finding, each failing on the server before the
fix: bad values, floods, the store's failures, authentication, parsing."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import threading
import time

import anyio
import pytest
import websockets
from textfixtures import text_model
from websockets.asyncio.client import connect

import streamgemma as sg
from streamgemma.errors import InvalidValueError, SnapshotFormatError, StoreError
from streamgemma.sampling.params import SamplingParams
from streamgemma.serve.engine import Engine
from streamgemma.serve.inputs import INLINE_TEXT_BYTES
from streamgemma.serve.offload import MemoryStore
from streamgemma.serve.protocol import ProtocolError, parse_request
from streamgemma.serve.server import Limits, Server, serve_in_thread
from streamgemma.session import snapshot as snapshot_format
from streamgemma.session.store import DirectorySnapshotStore
from streamgemma.validate import MAX_POSITION, check_seed

PROMPT = "the quick brown fox jumps over the lazy dog"


def run(main, *args):
    return anyio.run(main, *args, backend="asyncio")


async def ask(ws, frame) -> dict:
    await ws.send(frame if isinstance(frame, str) else json.dumps(frame))
    return json.loads(await ws.recv())


def parse(msg: dict):
    return parse_request(json.dumps(msg), 4096, 256)


class BrokenStore(MemoryStore):
    """A disk store whose writes fail (full, or read-only)."""

    durable = True

    def put(self, session_id: str, blob: bytes) -> None:
        raise OSError(28, "No space left on device")


# -- 1. seeds the snapshot format cannot hold ---------------------------------------------------
@pytest.mark.parametrize("seed", [2**64, -2**63 - 1, 10**24])
def test_a_seed_the_snapshot_format_cannot_hold_is_invalid_everywhere(seed):
    for kind in ("open", "generate"):
        with pytest.raises(ProtocolError) as refused:
            parse({"type": kind, "seed": seed})
        assert (refused.value.code, refused.value.field) == ("invalid", "seed")
    with pytest.raises(InvalidValueError) as refused:
        check_seed(seed)
    assert refused.value.field == "seed" and "2**64" in str(refused.value)
    model = text_model()
    for make in (lambda: model.session(seed=seed), lambda: SamplingParams(seed=seed)):
        with pytest.raises(InvalidValueError) as refused:  # the Python API: a clear error, not OverflowError
            make()
        assert refused.value.field == "seed"

    async def main():
        with pytest.raises(InvalidValueError):
            await Engine(text_model(), max_active=1).open(seed=seed)

    run(main)


def test_the_extreme_seeds_the_format_holds_are_accepted_and_snapshotted():
    async def main():
        engine = Engine(text_model(), max_active=1)
        for seed in (2**64 - 1, -2**63):
            es = await engine.open(seed=seed)
            assert parse({"type": "open", "seed": seed}).seed == seed
            await engine.snapshot(es)  # packs (the bug: OverflowError in the writer)

    run(main)


def test_rejected_seeds_leave_the_store_working_for_everyone(tmp_path):
    store = DirectorySnapshotStore(tmp_path / "store")
    server = Server(Engine(text_model(), max_active=2, store=store, max_unwritten=2), port=0)

    async def main(url):
        async with connect(url) as ws:
            for _ in range(40):
                e = await ask(ws, {"type": "open", "seed": 2**64})
                assert (e["code"], e["field"]) == ("invalid", "seed")
        # Every other client's sessions go on being suspended and stored.
        async with sg.Client(url) as client:
            sessions = [await client.open(seed=i) for i in range(6)]
            for s in sessions:
                await s.append(PROMPT)
            return [s.id for s in sessions]

    with serve_in_thread(server) as url:
        ids = run(main, url)
    assert server.lost == [] and sorted(ids) == store.list()


# -- 2. appends: O(1) each, consumed in chunks that span many of them ---------------------------
def test_many_small_appends_are_consumed_in_a_few_prefill_calls():
    async def main():
        engine = Engine(text_model(), max_active=1, idle_step_input_tokens=0, input_chunk=64)
        async with anyio.create_task_group() as tg:
            es = await engine.open()
            started = time.perf_counter()
            pending = [engine.append(es, [10 + i % 200]) for i in range(2000)]
            queued = time.perf_counter() - started
            assert engine.inputs.tokens == es.queued_tokens == 2000
            tg.start_soon(engine.run)
            assert await engine.consumed(pending[-1]) == 2000
            tg.cancel_scope.cancel()
        return engine, pending, queued

    engine, pending, queued = run(main)
    assert engine.stats.prefill_calls == 2000 // 64 + 1  # not one per append
    assert [p.position for p in pending] == list(range(1, 2001))  # each append's own position
    assert engine.inputs.tokens == 0 and queued < 1.0


def test_input_takes_at_most_its_share_while_another_session_generates():
    model = text_model()
    long_input = model.tokenizer.encode(" ".join([PROMPT] * 40))

    async def main():
        engine = Engine(model, max_active=2, input_chunk=16, input_share=0.2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            talker, flooder = await engine.open(), await engine.open()
            await engine.consumed(engine.append(talker, PROMPT))
            stream = await engine.generate(talker, SamplingParams(max_tokens=4000, stop_token_ids=()))
            await stream.__anext__()
            prefill0, started = engine.stats.phase_seconds["prefill"], time.monotonic()
            pending = engine.append(flooder, long_input)
            tokens = 0
            while time.monotonic() - started < 1.5 and not pending.consumed.is_set():
                await stream.__anext__()
                tokens += 1
            spent = engine.stats.phase_seconds["prefill"] - prefill0
            elapsed = time.monotonic() - started
            await stream.aclose()
            tg.cancel_scope.cancel()
        return spent, elapsed, tokens

    spent, elapsed, tokens = run(main)
    # At most the share, plus the one turn that may end the window.
    assert spent <= 0.2 * elapsed + 0.1, (spent, elapsed)
    assert tokens > 0


# -- 3. global bounds ---------------------------------------------------------------------------
def test_queued_input_is_bounded_across_sessions():
    async def main():
        engine = Engine(text_model(), max_active=2, max_pending_tokens=100, max_queued_tokens=150)
        a, b = await engine.open(), await engine.open()
        engine.append(a, [10] * 100)
        with pytest.raises(sg.EngineError) as refused:
            engine.append(a, [10])  # this session's bound
        assert refused.value.code == "limit"
        with pytest.raises(sg.EngineError) as refused:
            engine.append(b, [10] * 60)  # the engine's bound
        assert refused.value.code == "limit" and "server" in str(refused.value)
        engine.append(b, [10] * 50)
        assert engine.inputs.tokens == 150

    run(main)


def test_long_text_waits_as_text_and_is_tokenized_in_an_input_turn():
    model = text_model()
    text = " ".join([PROMPT] * (2 * INLINE_TEXT_BYTES // len(PROMPT)))
    size = len(text.encode())

    async def main():
        engine = Engine(model, max_active=2, max_queued_text_bytes=size + 10)
        async with anyio.create_task_group() as tg:
            es, other = await engine.open(), await engine.open()
            pending = engine.append(es, text)
            assert pending.ids is None and engine.inputs.text_bytes == size  # not tokenized on the loop
            with pytest.raises(sg.EngineError) as refused:
                engine.append(other, text)  # bytes of text waiting: bounded
            assert refused.value.code == "limit"
            tg.start_soon(engine.run)
            position = await engine.consumed(pending)
            tg.cancel_scope.cancel()
        return engine, position

    engine, position = run(main)
    assert position == len(model.tokenizer.encode(text, add_bos=True))
    assert engine.inputs.text_bytes == 0 and engine.inputs.tokens == 0


def test_connections_beyond_the_limit_are_refused_with_503():
    server = Server(Engine(text_model(), max_active=2), port=0, limits=Limits(max_connections=2))

    async def main(url):
        async with connect(url), connect(url):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with connect(url):
                    pass
            assert refused.value.response.status_code == 503
        with anyio.fail_after(5):
            while server.connections:
                await anyio.sleep(0.01)
        async with connect(url) as ws:  # room again
            assert (await ask(ws, {"type": "open"}))["type"] == "opened"

    with serve_in_thread(server) as url:
        run(main, url)


def test_sessions_beyond_the_server_limit_get_limit():
    server = Server(Engine(text_model(), max_active=4), port=0, limits=Limits(max_sessions=2))

    async def main(url):
        async with connect(url) as a, connect(url) as b:
            assert (await ask(a, {"type": "open"}))["type"] == "opened"
            assert (await ask(b, {"type": "open"}))["type"] == "opened"
            assert (await ask(b, {"type": "open"}))["code"] == "limit"

    with serve_in_thread(server) as url:
        run(main, url)


def test_opens_at_the_same_moment_do_not_exceed_the_server_limit():
    """An open counts against the limit while the engine opens it (which waits for the model while a
    generation runs): eight connections opening at once get two `opened` (the limit of three, less the
    one held) and six `limit`."""
    server = Server(Engine(text_model(), max_active=4), port=0, limits=Limits(max_sessions=3))

    async def main(url):
        async with connect(url) as g:
            sid = (await ask(g, {"type": "open"}))["session"]
            await ask(g, {"type": "append", "session": sid, "text": "the quick brown fox"})
            await ask(g, {"type": "generate", "id": 1, "session": sid, "max_tokens": 4000, "stop_token_ids": []})
            conns = [await connect(url).__aenter__() for _ in range(8)]
            try:
                for ws in conns:
                    await ws.send(json.dumps({"type": "open"}))
                replies = [json.loads(await ws.recv()) for ws in conns]
            finally:
                for ws in conns:
                    await ws.close()
            return sorted(r["type"] if r["type"] == "opened" else r["code"] for r in replies)

    with serve_in_thread(server) as url:
        assert run(main, url) == ["limit"] * 6 + ["opened"] * 2
    assert server.sessions_held() == 0


def test_a_connection_over_its_message_rate_is_read_more_slowly():
    server = Server(Engine(text_model(), max_active=2), port=0, limits=Limits(messages_per_second=50))

    async def main(url):
        async with connect(url) as ws:
            await ask(ws, {"type": "open"})
            started = time.monotonic()
            for i in range(100):
                await ws.send(json.dumps({"type": "append", "tokens": [10 + i]}))
            replies = [json.loads(await ws.recv()) for _ in range(100)]
            return time.monotonic() - started, replies

    with serve_in_thread(server) as url:
        elapsed, replies = run(main, url)
    assert {r["type"] for r in replies} == {"appended"}  # slowed down, nothing refused
    assert elapsed >= 0.9  # 100 frames at 50 a second, after a second's worth (50) at once


def test_a_connection_that_stays_over_its_rate_is_closed_with_a_reason():
    server = Server(Engine(text_model(), max_active=2), port=0,
                    limits=Limits(messages_per_second=20, rate_grace=0.5))

    async def main(url):
        async with connect(url, ping_interval=None) as ws:
            await ask(ws, {"type": "open"})
            with anyio.fail_after(20):
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    for i in range(10_000):
                        await ws.send(json.dumps({"type": "append", "tokens": [10 + i % 100]}))
                    while True:
                        await ws.recv()
            return closed.value.rcvd

    with serve_in_thread(server) as url:
        rcvd = run(main, url)
    assert rcvd.code == 1008 and "rate limit" in rcvd.reason


def test_a_detached_sessions_queued_input_is_dropped_and_its_position_is_exact():
    model = text_model()
    engine = Engine(model, max_active=2, input_chunk=4, input_share=0.05)
    server = Server(engine, port=0)

    async def main(url):
        async with connect(url) as ws:
            await ask(ws, {"type": "open"})
            await ask(ws, {"type": "append", "text": PROMPT})
            sid = (await ask(ws, {"type": "generate", "max_tokens": 4000, "stop_token_ids": []}))["session"]
            await ws.send(json.dumps({"type": "append", "tokens": [10] * 50_000}))
        es = engine.sessions[sid]
        with anyio.fail_after(10):
            while es.owner is not None:
                await anyio.sleep(0.01)
        assert engine.inputs.tokens == 0 and not es.inputs and es.generation is None
        async with connect(url) as ws:
            opened = await ask(ws, {"type": "open", "session": sid})
        return es, opened

    with serve_in_thread(server) as url:
        es, opened = run(main, url)
    assert opened["position"] == es.position < 50_000
    assert engine.stats.dropped_inputs >= 1


def test_idle_sessions_expire_with_their_snapshots(tmp_path):
    store = DirectorySnapshotStore(tmp_path)

    async def main():
        engine = Engine(text_model(), max_active=2, store=store, session_ttl=0.2)
        held, left = await engine.open(), await engine.open()
        held.owner = object()  # a connection holds it
        await engine.snapshot(left)
        store.put("from-an-earlier-process", store.get(left.id))
        old = time.time() - 3600
        os.utime(store.path("from-an-earlier-process"), (old, old))
        assert await engine.expire() == 1  # only the stored one is old enough yet
        await anyio.sleep(0.3)
        assert await engine.expire() == 1
        return engine, held, left

    engine, held, left = run(main)
    assert held.id in engine.sessions and left.id not in engine.sessions
    # (a session is stored when opened: the base its journal is replayed on after a crash)
    assert store.list() == [held.id] and engine.stats.expired_sessions == 2


def test_expiry_leaves_the_prefix_caches_entries_to_the_cache(tmp_path):
    """A prefix-cache entry shares the store but is no session: a hit reads it without rewriting it, so
    expiry deleted hot entries once their file was older than the ttl (and counted them as sessions)."""
    store = DirectorySnapshotStore(tmp_path)

    async def main():
        engine = Engine(text_model(), max_active=2, store=store, session_ttl=0.2)
        es = await engine.open()
        await engine.snapshot(es)
        old = time.time() - 3600
        for key in ("prefix.0123abcd", "abandoned"):
            store.put(key, store.get(es.id))
            os.utime(store.path(key), (old, old))
        assert await engine.expire() == 1
        return engine

    engine = run(main)
    assert "prefix.0123abcd" in store.list() and "abandoned" not in store.list()
    assert engine.stats.expired_sessions == 1


def test_the_connection_limit_stays_below_the_file_limit(monkeypatch):
    resource = pytest.importorskip("resource")
    from streamgemma.serve import server as server_module
    from streamgemma.serve.http_listen import REFUSED_AT_ONCE

    monkeypatch.setattr(resource, "getrlimit", lambda which: (512, 512))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: None)
    # (the connections refused while they wait for their 503 hold descriptors too, on each port)
    assert server_module._connections_allowed(1024) == 512 - server_module.RESERVED_FDS - 2 * REFUSED_AT_ONCE
    monkeypatch.setattr(resource, "getrlimit", lambda which: (512, 4096))
    assert server_module._connections_allowed(1024) == 1024  # raised the soft limit


# -- 4. authentication --------------------------------------------------------------------------
@pytest.mark.parametrize("token", ["", "  "])
def test_an_empty_token_is_an_error_not_no_authentication(token):
    with pytest.raises(ValueError, match="empty"):
        Server(Engine(text_model(), max_active=1), token=token)


def test_auth_is_logged_at_start_and_no_token_beyond_loopback_warns(caplog):
    with caplog.at_level(logging.INFO, logger="streamgemma.serve.server"):
        with serve_in_thread(Server(Engine(text_model(), max_active=1), host="0.0.0.0", port=0)):
            pass
        assert any(r.levelno == logging.WARNING and "authentication: off" in r.message for r in caplog.records)
        caplog.clear()
        with serve_in_thread(Server(Engine(text_model(), max_active=1), port=0, token="t")):
            pass
        assert "a bearer token is required" in caplog.text and not any(r.levelno >= logging.WARNING
                                                                         for r in caplog.records)


def raw_http(port: int, headers: list[bytes]) -> int:
    """The status of a websocket handshake with these extra header lines."""
    request = (b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               + b"".join(h + b"\r\n" for h in headers) + b"\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        return int(s.recv(4096).split(b" ", 2)[1])


def test_odd_authorization_headers_are_4xx_never_500():
    server = Server(Engine(text_model(), max_active=1), port=0, token="s3cret")
    with serve_in_thread(server):
        port = server.port
        assert raw_http(port, [b"Authorization: Bearer s3cret"]) == 101
        assert raw_http(port, [b"Authorization: Bearer s3cret", b"Authorization: Bearer s3cret"]) == 400
        assert raw_http(port, [b"Authorization: Bearer x", b"Authorization: Bearer y"]) == 400
        assert raw_http(port, [b"Authorization: Bearer \xff\xfe"]) == 401
        assert raw_http(port, []) == 401


# -- 5. parsing never raises anything but a protocol error ------------------------------------------
@pytest.fixture
def server():
    srv = Server(Engine(text_model(), max_active=4), port=0)
    with serve_in_thread(srv):
        yield srv


def test_a_type_that_is_not_a_string_is_an_error_and_the_connection_lives(server):
    async def main():
        async with connect(server.url) as ws:
            for kind in (["open"], {"a": 1}, 5, None, True):
                e = await ask(ws, {"type": kind, "id": 1})
                assert (e["type"], e["code"], e["id"]) == ("error", "unknown_type", 1)
            assert (await ask(ws, {"type": "open"}))["type"] == "opened"

    run(main)


def test_text_the_tokenizer_cannot_take_is_invalid(server):
    async def main():
        async with connect(server.url) as ws:
            await ask(ws, {"type": "open"})
            e = await ask(ws, '{"type": "append", "text": "a\\ud800b"}')
            assert (e["code"], e["field"]) == ("invalid", "text")
            e = await ask(ws, '{"type": "generate", "stop": ["\\udc00"]}')
            assert (e["code"], e["field"]) == ("invalid", "stop")
            e = await ask(ws, '{"type": "open", "id": "\\ud800"}')
            assert e["code"] == "bad_message"
            assert (await ask(ws, {"type": "append", "text": PROMPT}))["type"] == "appended"

    run(main)


# -- 6. a sick store is found at start, not at shutdown ----------------------------------------------
def test_an_unwritable_store_refuses_to_start(tmp_path, monkeypatch):
    store = DirectorySnapshotStore(tmp_path)

    def read_only(path, data):  # (tests run as root, whom file modes do not stop)
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("streamgemma.session.store.write_file_atomic", read_only)
    with pytest.raises(StoreError, match="not writable: Read-only file system"):
        store.prepare()
    with pytest.raises(StoreError):
        with serve_in_thread(Server(Engine(text_model(), max_active=1, store=store), port=0)):
            pass


def test_write_failures_are_counted_and_shutdown_names_the_sessions_it_lost(caplog):
    engine = Engine(text_model(), max_active=1, store=BrokenStore())
    server = Server(engine, port=0)

    async def main(url):
        async with sg.Client(url) as client:
            a, b = await client.open(), await client.open()  # b's open suspends a: its write fails
            return [a.id, b.id]

    with caplog.at_level(logging.INFO):
        with serve_in_thread(server) as url:
            ids = run(main, url)
    assert engine.stats.write_failures >= 1
    assert sorted(server.lost) == sorted(ids)
    assert all(sid in caplog.text for sid in ids) and "could not be saved" in caplog.text


def test_store_reads_are_bounded_and_refuse_what_is_not_a_regular_file(tmp_path):
    store = DirectorySnapshotStore(tmp_path, max_bytes=1000)
    store.put("small", b"x" * 1000)
    assert store.get("small") == b"x" * 1000
    store.put("large", b"x" * 1001)
    with pytest.raises(SnapshotFormatError, match="larger than it can be"):
        store.get("large")
    os.mkdir(store.path("folder"))
    with pytest.raises(SnapshotFormatError, match="not a regular file"):
        store.get("folder")
    os.mkfifo(store.path("fifo"))
    done = []
    reader = threading.Thread(target=lambda: done.append(pytest.raises(SnapshotFormatError, store.get, "fifo")))
    reader.start()
    reader.join(5)
    assert done, "reading a FIFO blocked"
    # The default bound is the largest snapshot any preset's model makes.
    biggest = max(snapshot_format.max_file_bytes(sg.GriffinConfig.preset(n)) for n in sg.GriffinConfig.presets())
    assert DirectorySnapshotStore(tmp_path).max_bytes == biggest


def test_stale_temp_files_are_removed_at_start(tmp_path):
    store = DirectorySnapshotStore(tmp_path)
    stale, fresh = tmp_path / ".a.sgsnap.x1.tmp", tmp_path / ".b.sgsnap.x2.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"being written by another process")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    notes = store.prepare()
    assert not stale.exists() and fresh.exists() and "removed 1" in notes


def test_closing_a_damaged_session_deletes_it(tmp_path):
    store = DirectorySnapshotStore(tmp_path)
    store.put("damaged-session", b"\x28\xb5\x2f\xfd not really zstd")

    async def main(url):
        async with connect(url) as ws:
            e = await ask(ws, {"type": "open", "session": "damaged-session"})
            assert e["code"] == "snapshot_error"
            e = await ask(ws, {"type": "close", "id": 3, "session": "damaged-session"})
            assert e == {"type": "closed", "id": 3, "session": "damaged-session"}
            e = await ask(ws, {"type": "close", "session": "damaged-session"})
            assert e["code"] == "unknown_session"

    with serve_in_thread(Server(Engine(text_model(), max_active=1, store=store), port=0)) as url:
        run(main, url)
    assert store.list() == []


# -- 7. small holes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("temperature", 1e-46), ("temperature", 1e-300), ("top_p", 1e-50),
                                          ("min_p", 1e-50), ("repetition_penalty", 1e-50),
                                          ("presence_penalty", 1e39), ("presence_penalty", -3e38),
                                          ("top_k", 2**40),
                                          ("stop_token_ids", [2**40])])
def test_numbers_the_float32_sampler_cannot_honour_are_invalid(field, value):
    with pytest.raises(ProtocolError) as refused:
        parse({"type": "generate", field: value})
    assert (refused.value.code, refused.value.field) == ("invalid", field)
    kwargs = {field: tuple(value) if isinstance(value, list) else value}
    with pytest.raises(InvalidValueError) as refused:  # the Python API refuses the same values
        SamplingParams(**kwargs)
    assert refused.value.field == field
    session = text_model().session(seed=0)
    with pytest.raises(InvalidValueError) as refused:
        next(session.generate(max_tokens=1, **kwargs))
    assert refused.value.field == field and session.position == 0


def test_a_session_near_the_position_bound_refuses_what_would_pass_it(tmp_path):
    model = text_model()
    session = model.session()
    session.feed(list(range(10, 30)))  # past the attention window: the ring is full
    contents = dataclasses.replace(session.capture(), position=MAX_POSITION - 2)
    with pytest.raises(SnapshotFormatError, match="2\\*\\*62"):  # refused on write as on read
        snapshot_format.encode_contents(dataclasses.replace(contents, position=MAX_POSITION))
    store = DirectorySnapshotStore(tmp_path)
    store.put("near-the-end", snapshot_format.encode_contents(contents))

    async def main():
        engine = Engine(model, max_active=1, store=store)
        es = await engine.resume("near-the-end")
        assert es.position == MAX_POSITION - 2
        with pytest.raises(InvalidValueError) as refused:
            engine.append(es, [10, 11])
        assert refused.value.field == "tokens"
        with pytest.raises(InvalidValueError) as refused:
            await engine.generate(es, SamplingParams(max_tokens=2))
        assert refused.value.field == "max_tokens"

    run(main)


def test_opening_a_session_whose_owner_dropped_waits_for_the_cancelled_generation():
    engine = Engine(text_model(), max_active=2)
    server = Server(engine, port=0)
    decode = engine.executor.run

    async def slow_decode(*args):  # slow ticks: the cancelled generation has a token in flight
        await anyio.sleep(0.1)
        return await decode(*args)

    engine.executor.run = slow_decode

    async def main(url):
        ws = await connect(url)
        await ask(ws, {"type": "open"})
        await ask(ws, {"type": "append", "text": PROMPT})
        first = await ask(ws, {"type": "generate", "max_tokens": 4000, "stop_token_ids": []})
        await ws.close()  # mid-generation
        async with connect(url) as other:
            opened = await ask(other, {"type": "open", "session": first["session"]})
            es = engine.sessions[first["session"]]
            assert opened["position"] == es.position and es.generation is None
            e = await ask(other, {"type": "generate", "max_tokens": 1, "stop_token_ids": []})
            assert e["type"] == "token"  # not `generating`

    with serve_in_thread(server) as url:
        run(main, url)


def test_error_messages_never_echo_long_untrusted_values(server):
    async def main():
        async with connect(server.url) as ws:
            for frame in ({"type": "open", "session": "a" * 5000}, {"type": "x" * 5000},
                          {"type": "open", "b" * 5000: 1}, {"type": "open", "seed": "c" * 5000},
                          {"type": "append", "session": "d" * 150, "text": "x"}):
                e = await ask(ws, frame)
                assert e["type"] == "error" and len(e["message"]) < 300, e
            e = await ask(ws, {"type": "open", "session": "no-such-session"})
            assert e["code"] == "unknown_session" and "no-such" not in e["message"]

    run(main)


def test_a_generate_without_max_tokens_takes_the_default_cut_to_the_limit():
    generate = {"type": "generate", "session": "s"}
    assert parse_request(json.dumps(generate), 100, 256).params.max_tokens == 100
    assert parse_request(json.dumps(generate), 4096, 256).params.max_tokens == 256


def test_the_largest_presence_penalty_keeps_logprobs_finite():
    """At the bound (and the least temperature) a penalized logit over the temperature stays finite:
    no infinite logits, no NaN logprobs (a penalty near float32's largest gave both)."""
    from streamgemma.validate import MAX_PRESENCE, MIN_DIVISOR

    session = text_model().session(seed=0)
    session.feed("the quick brown fox")
    for presence in (-MAX_PRESENCE, MAX_PRESENCE):
        for token in session.fork().generate(max_tokens=4, stop_token_ids=[], presence_penalty=presence,
                                             temperature=MIN_DIVISOR, logprobs=3):
            assert math.isfinite(token.logprob) and all(math.isfinite(lp) for _, lp in token.top_logprobs)
