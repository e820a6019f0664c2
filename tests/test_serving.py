"""The engine and the websocket server: a real server on 127.0.0.1, real
websockets clients, a tiny model with a trained tokenizer."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
import websockets
from conftest import subprocess_env
from textfixtures import saved_model_dir, text_model  # noqa: F401 (fixture)
from websockets.asyncio.client import connect

import streamgemma as sg
from streamgemma.sampling.params import SamplingParams
from streamgemma.serve.engine import Engine
from streamgemma.serve.server import Limits, Server, serve_in_thread

PROMPT = "the quick brown fox jumps over the lazy dog"
NO_STOP = []  # stop_token_ids=[]: generations run to max_tokens, so lengths are known


def reference_ids(model: sg.Model, prompt: str, *lengths: int, seed: int, feed_between=None) -> list[list[int]]:
    """Token ids of consecutive generations on a plain Session (the first reseeded)."""
    session = model.session()
    session.feed(prompt)
    out = []
    for k, n in enumerate(lengths):
        if k and feed_between is not None:
            session.feed(feed_between)
        out.append([t.id for t in session.generate(max_tokens=n, seed=seed if k == 0 else None,
                                                    stop_token_ids=NO_STOP)])
    session.close()
    return out


@pytest.fixture
def server():
    srv = Server(Engine(text_model(), max_active=32), port=0)
    with serve_in_thread(srv):
        yield srv


def run(main, *args):
    return anyio.run(main, *args, backend="asyncio")


# -- engine ------------------------------------------------------------------------------
def test_engine_batches_sessions_and_suspends_least_recently_used():
    model, reference = text_model(), text_model()
    expected = {i: reference_ids(reference, PROMPT + f" {i}", 10, seed=i)[0] for i in range(6)}

    async def main():
        engine = Engine(model, max_active=3)
        got = {}
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            sessions = [await engine.open() for _ in range(6)]  # more than max_active: some are suspended
            assert engine.active == 3 and engine.stats.suspensions == 3
            for i, es in enumerate(sessions):
                await engine.consumed(engine.append(es, PROMPT + f" {i}"))

            async def generate(i, es):
                stream = await engine.generate(es, SamplingParams(max_tokens=10, seed=i, stop_token_ids=()))
                got[i] = [t.id async for t in stream]
                assert stream.done.reason == "length"

            async with anyio.create_task_group() as gens:
                for i, es in enumerate(sessions[:3]):
                    gens.start_soon(generate, i, es)
            async with anyio.create_task_group() as gens:
                for i, es in enumerate(sessions[3:], start=3):
                    gens.start_soon(generate, i, es)
            tg.cancel_scope.cancel()
        return engine, got

    engine, got = run(main)
    assert got == expected  # suspension and resumption do not change a single token
    assert engine.stats.resumptions > 0
    # 60 tokens in two waves of 3 sessions: about 20 decode calls, not 60.
    assert engine.stats.decoded_tokens == 60 and engine.stats.decode_calls <= 24


def test_long_append_is_interleaved_with_other_sessions_decoding():
    model = text_model()
    long_input = model.tokenizer.encode(" ".join([PROMPT] * 60))  # many prefill chunks

    async def main():
        engine = Engine(model, max_active=4, input_chunk=32)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            talker, listener = await engine.open(), await engine.open()
            await engine.consumed(engine.append(talker, PROMPT))
            stream = await engine.generate(talker, SamplingParams(max_tokens=4000, stop_token_ids=()))
            await stream.__anext__()
            chunks_before = engine.stats.prefill_calls
            pending = engine.append(listener, long_input)
            tokens_during = 0
            while not pending.consumed.is_set():
                await stream.__anext__()
                tokens_during += 1
            chunks = engine.stats.prefill_calls - chunks_before
            await stream.aclose()
            position = await engine.consumed(pending)
            tg.cancel_scope.cancel()
        return chunks, tokens_during, position

    chunks, tokens_during, position = run(main)
    assert position == len(long_input)
    assert chunks == -(-len(long_input) // 32)
    # One decode tick between consecutive chunks: the talker kept streaming all along.
    assert tokens_during >= chunks - 1


def test_capacity_error_when_every_slot_is_busy():
    async def main():
        engine = Engine(text_model(), max_active=1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            busy = await engine.open()
            await engine.consumed(engine.append(busy, PROMPT))
            stream = await engine.generate(busy, SamplingParams(max_tokens=4000, stop_token_ids=()))
            with pytest.raises(sg.EngineError) as refused:
                await engine.open()
            assert refused.value.code == "capacity"
            await stream.aclose()  # cancels; once it has ended the slot can be lent again
            with anyio.fail_after(10):
                while busy.generation is not None:
                    await anyio.sleep(0.01)
            second = await engine.open()
            assert busy.live is None and second.live is not None  # busy was suspended to make room
            tg.cancel_scope.cancel()

    run(main)


# -- the websocket server ------------------------------------------------------------------
def test_tokens_stream_and_match_a_plain_session(server):
    expected = reference_ids(text_model(), PROMPT, 12, 5, seed=3)

    async def main():
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"type": "open", "id": "o"}))
            opened = json.loads(await ws.recv())
            assert opened["type"] == "opened" and opened["id"] == "o" and opened["position"] == 0
            await ws.send(json.dumps({"type": "append", "text": PROMPT, "id": 1}))
            appended = json.loads(await ws.recv())
            assert appended["type"] == "appended" and appended["id"] == 1 and appended["position"] > 0
            await ws.send(json.dumps({"type": "generate", "id": 2, "max_tokens": 12, "seed": 3,
                                      "stop_token_ids": []}))
            events = []
            while not events or events[-1]["type"] != "done":
                events.append(json.loads(await ws.recv()))  # one frame per token: streamed
            done = events.pop()
            assert done == {"type": "done", "id": 2, "session": opened["session"], "reason": "length",
                            "position": appended["position"] + 12}
            assert [e["type"] for e in events] == ["token"] * 12
            assert events[-1]["finish_reason"] == "length"
            first = [e["id"] for e in events]
            # Without a seed the sampler continues where it was.
            await ws.send(json.dumps({"type": "generate", "max_tokens": 5, "stop_token_ids": []}))
            second = []
            while True:
                e = json.loads(await ws.recv())
                if e["type"] == "done":
                    break
                second.append(e["id"])
            text = "".join(e["text"] for e in events)
            return first, second, text

    first, second, text = run(main)
    assert [first, second] == expected
    assert text == text_model().tokenizer.decode(first)


def test_token_frames_are_the_json_of_the_events():
    from streamgemma.serve.protocol import TokenFrames

    frames = TokenFrames("s-1")
    one = sg.Token(7, 'say "hi"\\\n\u00e9\U0001F600', None)
    assert json.loads(frames.token(one)) == {"type": "token", "session": "s-1", "id": 7, "text": one.text}
    last = sg.Token(9, "", "length")
    assert json.loads(frames.tokens([last])) == {"type": "token", "session": "s-1", "id": 9, "text": "",
                                                 "finish_reason": "length"}
    assert json.loads(frames.tokens([one, last])) == {"type": "tokens", "session": "s-1", "ids": [7, 9],
                                                      "texts": [one.text, ""], "finish_reason": "length"}
    with pytest.raises(ValueError, match="coalesce_interval"):
        Limits(coalesce_interval=0.5)


def test_coalesced_and_plain_streams_deliver_the_same_tokens():
    model = text_model()
    session = model.session()
    session.feed(PROMPT)
    expected = [(t.id, t.text, t.finish_reason) for t in session.generate(max_tokens=40, seed=3, stop_token_ids=[])]
    # A long interval makes the engine produce several tokens per frame even on a fast CPU.
    srv = Server(Engine(text_model(), max_active=4), port=0, limits=Limits(coalesce_interval=0.05))

    async def stream(ws, sid, **fields):
        """(id, text, finish_reason) per token, and the frame types, of one generation."""
        await ws.send(json.dumps({"type": "generate", "id": "g", "session": sid, "max_tokens": 40, "seed": 3,
                                  "stop_token_ids": [], **fields}))
        tokens, kinds = [], []
        while True:
            e = json.loads(await ws.recv())
            kinds.append(e["type"])
            if e["type"] == "done":
                assert e["reason"] == "length" and e["id"] == "g"
                return tokens, kinds
            if e["type"] == "tokens":
                assert len(e["ids"]) == len(e["texts"]) > 1
                tokens += [(i, t, None) for i, t in zip(e["ids"], e["texts"])]
                tokens[-1] = (*tokens[-1][:2], e.get("finish_reason"))
            else:
                assert e["type"] == "token", e
                tokens.append((e["id"], e["text"], e.get("finish_reason")))

    async def main(url):
        async with connect(url) as ws:
            async def ask(msg):
                await ws.send(json.dumps(msg))
                return json.loads(await ws.recv())

            sids = []
            for _ in range(2):
                sid = (await ask({"type": "open"}))["session"]
                assert (await ask({"type": "append", "session": sid, "text": PROMPT}))["type"] == "appended"
                sids.append(sid)
            # Bad values of the field: an error, and the connection goes on.
            for bad in ("yes", 1, None, [True]):
                e = await ask({"type": "generate", "id": 5, "session": sids[0], "coalesce": bad})
                assert (e["type"], e["code"], e["id"]) == ("error", "bad_message", 5) and "coalesce" in e["message"]
            coalesced, kinds = await stream(ws, sids[0], coalesce=True)
            plain, plain_kinds = await stream(ws, sids[1])
            assert set(plain_kinds) == {"token", "done"} and len(plain_kinds) == 41
            async with sg.Client(url) as client:  # coalesces by default, yields one Token per token
                third = await client.open()
                await third.append(PROMPT)
                via_client = [(t.id, t.text, t.finish_reason)
                              async for t in third.generate(max_tokens=40, seed=3, stop_token_ids=NO_STOP)]
            return coalesced, kinds, plain, via_client

    with serve_in_thread(srv) as url:
        coalesced, kinds, plain, via_client = run(main, url)
    assert "tokens" in kinds and len(kinds) < 41  # fewer frames than tokens
    assert coalesced == plain == via_client == expected
    assert "".join(t[1] for t in coalesced) == model.tokenizer.decode([t[0] for t in expected])


def test_twenty_concurrent_sessions_share_decode_calls(server):
    reference = text_model()
    expected = {i: reference_ids(reference, PROMPT + f" {i}", 16, seed=i)[0] for i in range(20)}
    engine = server.engine
    calls0, tokens0 = engine.stats.decode_calls, engine.stats.decoded_tokens
    frames0, decode_s0 = server.frames_direct + server.frames_queued, engine.stats.phase_seconds["decode"]

    async def one(i, got):
        async with sg.Client(server.url) as client:
            session = await client.open()
            await session.append(PROMPT + f" {i}")
            got[i] = [t.id async for t in session.generate(max_tokens=16, seed=i, stop_token_ids=NO_STOP)]
            assert session.last_done["reason"] == "length"

    async def main():
        got = {}
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, i, got)
        return got

    got = run(main)
    assert got == expected
    calls, tokens = engine.stats.decode_calls - calls0, engine.stats.decoded_tokens - tokens0
    assert tokens == 20 * 16
    # Batched: each decode call advanced several sessions (one call per token would be 320).
    assert calls <= tokens / 4, (calls, tokens)
    # The monitoring counters moved: every token went out in some frame, decoding took time.
    assert server.frames_direct + server.frames_queued - frames0 >= 20
    assert engine.stats.phase_seconds["decode"] > decode_s0 and server.pump_seconds > 0


def test_append_during_generation_is_consumed_before_the_next_token(server):
    model = text_model()
    extra = model.tokenizer.encode(" hello world")
    prompt_len = len(model.tokenizer.encode(PROMPT, add_bos=True))
    total = 40

    async def main():
        async with sg.Client(server.url) as client:
            session = await client.open()
            await session.append(PROMPT)
            ids = []
            async for tok in session.generate(max_tokens=total, seed=9, stop_token_ids=NO_STOP):
                ids.append(tok.id)
                if len(ids) == 3:
                    await session.send_append(extra)
            return ids, session.position

    ids, position = run(main)
    assert len(ids) == total and position == prompt_len + total + len(extra)
    # Which token the input landed after depends on timing (at the earliest after the 3rd,
    # whose arrival triggered the append); find it by replaying the cuts in order.
    cut = next((k for k in range(3, total)
                if ids == sum(reference_ids(model, PROMPT, k, total - k, seed=9, feed_between=extra), [])), None)
    assert cut is not None
    # And it is not the stream of a generation that ignored the input.
    assert ids != reference_ids(model, PROMPT, total, seed=9)[0]


def test_cancel_stops_the_generation_and_keeps_the_session_usable(server):
    async def main():
        async with sg.Client(server.url) as client:
            session = await client.open()
            start = await session.append(PROMPT)
            got = []
            async for tok in session.generate(max_tokens=4000, seed=1, stop_token_ids=NO_STOP):
                got.append(tok)
                if len(got) == 3:
                    await session.cancel()
            done = session.last_done
            assert done["reason"] == "cancelled"
            # Every token the session consumed was delivered: the position says so.
            assert done["position"] == start + len(got) and len(got) < 50
            es = server.engine.sessions[session.id]
            assert es.generation is None
            more = [t async for t in session.generate(max_tokens=4, stop_token_ids=NO_STOP)]
            assert len(more) == 4 and session.position == done["position"] + 4
            # Leaving the loop early cancels too.
            async for _ in session.generate(max_tokens=4000, stop_token_ids=NO_STOP):
                break
            with anyio.fail_after(10):
                while es.generation is not None:
                    await anyio.sleep(0.01)
            await session.close()
            assert session.id not in server.engine.sessions

    run(main)


def test_bad_messages_get_errors_and_the_connection_survives(server):
    async def main():
        async with connect(server.url) as ws:
            async def ask(frame):
                await ws.send(frame if isinstance(frame, str) else json.dumps(frame))
                return json.loads(await ws.recv())

            e = await ask("{not json")
            assert (e["type"], e["code"]) == ("error", "bad_json")
            e = await ask({"type": "teleport", "id": 7})
            assert (e["type"], e["code"], e["id"]) == ("error", "unknown_type", 7)
            e = await ask([1, 2])
            assert e["code"] == "bad_message"
            e = await ask({"type": "append", "text": "x"})  # no session open
            assert e["code"] == "unknown_session"
            e = await ask({"type": "open", "session": "no-such-session"})
            assert e["code"] == "unknown_session"
            opened = await ask({"type": "open"})
            sid = opened["session"]
            e = await ask({"type": "generate", "max_tokens": 5})  # no prompt yet
            assert e["code"] == "invalid" and "prompt" in e["message"]
            e = await ask({"type": "generate", "max_tokens": 10**9})
            assert e["code"] == "limit"
            e = await ask({"type": "generate", "temperature": -1})  # out of range: invalid, the field named
            assert (e["code"], e["field"]) == ("invalid", "temperature") and "temperature" in e["message"]
            e = await ask({"type": "generate", "temperature": "hot"})  # a wrong type
            assert e["code"] == "bad_message" and "temperature" in e["message"]
            e = await ask({"type": "append", "tokens": [1, 10**9]})
            assert e["code"] == "invalid"
            e = await ask({"type": "append", "text": "hi", "colour": "red"})
            assert e["code"] == "bad_message" and "colour" in e["message"]
            e = await ask({"type": "cancel"})
            assert e["code"] == "not_generating"
            # Still alive and serving:
            e = await ask({"type": "append", "text": PROMPT, "session": sid})
            assert e["type"] == "appended"
            snap = await ask({"type": "snapshot", "id": "s"})
            assert snap == {"type": "snapshot", "id": "s", "session": sid, "position": e["position"]}
            assert sid in server.engine.store.list()
            assert (await ask({"type": "close"}))["type"] == "closed"
            # An oversized frame closes the connection with 1009 (message too big).
            await ws.send("x" * (server.limits.max_message_bytes + 1))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd.code == 1009

    run(main)


def test_token_is_required_when_set():
    srv = Server(Engine(text_model(), max_active=2), port=0, token="s3cret")

    async def main(url):
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with connect(url, additional_headers=headers):
                    pass
            assert refused.value.response.status_code == 401
        with pytest.raises(websockets.InvalidStatus) as missing:
            async with connect(url.replace("/v1/stream", "/elsewhere")):
                pass
        assert missing.value.response.status_code == 404
        async with sg.Client(url, token="s3cret") as client:
            session = await client.open()
            assert len(session.id) >= 22  # 128 random bits, url-safe

    with serve_in_thread(srv) as url:
        run(main, url)


def test_unconsumed_input_is_bounded():
    srv = Server(Engine(text_model(), max_active=2, max_pending_tokens=40), port=0)

    async def main(url):
        async with sg.Client(url) as client:
            session = await client.open()
            with pytest.raises(sg.ServerError) as refused:
                await session.append(list(range(10, 51)))  # 41 tokens
            assert refused.value.code == "limit"
            assert await session.append(list(range(10, 50))) == 40  # 40 fit

    with serve_in_thread(srv) as url:
        run(main, url)


def test_sessions_per_connection_limit():
    srv = Server(Engine(text_model(), max_active=4), port=0, limits=Limits(sessions_per_connection=2))

    async def main(url):
        async with sg.Client(url) as client:
            await client.open()
            await client.open()
            with pytest.raises(sg.ServerError) as e:
                await client.open()
            assert e.value.code == "limit"

    with serve_in_thread(srv) as url:
        run(main, url)


def test_disconnect_mid_generation_then_resume_elsewhere(server):
    async def main():
        async with sg.Client(server.url) as client:
            session = await client.open()
            start = await session.append(PROMPT)
            received = 0
            async for _ in session.generate(max_tokens=4000, seed=4, stop_token_ids=NO_STOP):
                received += 1
                if received == 2:
                    break
            sid = session.id
        # The connection is gone: its generation stops, the session stays resumable.
        es = server.engine.sessions[sid]
        with anyio.fail_after(10):
            while es.generation is not None or es.owner is not None:
                await anyio.sleep(0.01)
        async with sg.Client(server.url) as client:
            resumed = await client.open(sid)
            assert resumed.position == es.position >= start + received
            more = [t.id async for t in resumed.generate(max_tokens=5, stop_token_ids=NO_STOP)]
            assert len(more) == 5 and resumed.position == es.position
            # Exactly what a session that generated as many tokens without interruption does next.
            generated = resumed.position - 5 - start
            assert more == reference_ids(text_model(), PROMPT, generated, 5, seed=4)[1]
            # One connection at a time holds a session.
            async with sg.Client(server.url) as other:
                with pytest.raises(sg.ServerError) as busy:
                    await other.open(sid)
                assert busy.value.code == "session_busy"

    run(main)


def _start_cli_server(model_dir: Path, store: Path) -> tuple[subprocess.Popen, str]:
    env = subprocess_env(STREAMGEMMA_TOKEN="tok")
    proc = subprocess.Popen([sys.executable, "-m", "streamgemma.cli", "serve", "--model", str(model_dir),
                             "--port", "0", "--store", str(store), "--device", "cpu"],
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        match = re.search(r"listening on (ws://\S+)", line)
        if match:
            return proc, match.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the server did not start: {proc.stderr.read()}")


def _stop_cli_server(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err
    return err


def test_sigterm_snapshots_sessions_and_a_restarted_server_continues_exactly(saved_model_dir, tmp_path):  # noqa: F811
    store = tmp_path / "store"
    expected = reference_ids(sg.load(saved_model_dir, device="cpu"), PROMPT, 6, 6, seed=5)

    async def first_half(url):
        async with sg.Client(url, token="tok") as client:
            session = await client.open()
            await session.append(PROMPT)
            ids = [t.id async for t in session.generate(max_tokens=6, seed=5, stop_token_ids=NO_STOP)]
            return session.id, session.position, ids

    async def second_half(url, sid):
        async with sg.Client(url, token="tok") as client:
            session = await client.open(sid)
            position = session.position
            ids = [t.id async for t in session.generate(max_tokens=6, stop_token_ids=NO_STOP)]
            return position, ids

    proc, url = _start_cli_server(saved_model_dir, store)
    try:
        sid, position, first = run(first_half, url)
    finally:
        log = _stop_cli_server(proc)
    assert "1 sessions saved to directory" in log and "0 could not be saved" in log
    assert (store / f"{sid}.sgsnap").is_file()

    proc, url = _start_cli_server(saved_model_dir, store)
    try:
        resumed_at, second = run(second_half, url, sid)
    finally:
        _stop_cli_server(proc)
    assert resumed_at == position
    assert [first, second] == expected


def test_transcript_agent_example_runs(capsys):
    import runpy

    example = runpy.run_path(str(Path(__file__).parent.parent / "examples" / "transcript_agent.py"))
    for model in ("demo", "tiny"):
        assert example["main"](["--every", "7", "--max-tokens", "6", "--model", model]) == 0
        out = capsys.readouterr().out
        assert out.count("[summary after") == 2  # after lines 7 and 14
        assert "> Ada: Thanks. Let's wrap up; same time next week." in out
        assert "[stored at position" in out


def test_idle_connection_is_closed_and_its_session_stays_resumable():
    srv = Server(Engine(text_model(), max_active=2), port=0, limits=Limits(idle_timeout=0.3))

    async def main(url):
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "open"}))
            sid = json.loads(await ws.recv())["session"]
            with anyio.fail_after(10):
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await ws.recv()
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1000, "idle timeout")
        async with sg.Client(url) as client:
            assert (await client.open(sid)).id == sid

    with serve_in_thread(srv) as url:
        run(main, url)


def test_the_idle_timeout_waits_for_a_connections_queued_input():
    """A connection waiting for `appended` is not idle: it was closed mid-input (input dropped)."""
    srv = Server(Engine(text_model(), max_active=2, input_chunk=8), port=0, limits=Limits(idle_timeout=0.3))
    ids = [2] + [5 + i % 200 for i in range(3000)]

    async def main(url):
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "open"}))
            json.loads(await ws.recv())
            started = time.monotonic()
            await ws.send(json.dumps({"type": "append", "tokens": ids}))
            with anyio.fail_after(60):
                reply = json.loads(await ws.recv())
            assert reply["type"] == "appended" and reply["position"] == len(ids), reply
            return time.monotonic() - started

    with serve_in_thread(srv) as url:
        assert run(main, url) > 0.3  # (the input outlasted the idle timeout)


class _StalledSocket:
    """A websocket whose peer never reads: what the server writes directly
    piles up in a buffer nobody drains, and send() blocks for ever."""

    def __init__(self):
        from types import SimpleNamespace

        from websockets.protocol import State

        self.close_code = None
        self.sent = 0
        self.buffered = 0
        self.frames: list[str] = []
        self.state = State.OPEN
        self.send_in_progress = None
        self.protocol = SimpleNamespace(state=State.OPEN, send_text=self._buffer)

    def _buffer(self, data: bytes) -> None:
        self.buffered += len(data)

    def send_data(self) -> None:
        pass

    async def send(self, frame):
        self.sent += 1
        await anyio.sleep_forever()

    async def recv(self):
        if self.frames:
            return self.frames.pop(0)
        await anyio.sleep_forever()

    async def close(self, code=1000, reason=""):
        self.close_code = (code, reason)


def test_a_reader_that_stalls_is_disconnected_without_slowing_other_sessions():
    from streamgemma.serve.connection import Connection

    async def main():
        engine = Engine(text_model(), max_active=4)
        server = Server(engine, port=0, limits=Limits(send_queue=8))
        stalled = _StalledSocket()
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            tg.start_soon(server.pump.run)  # what Server.serve runs beside the connections
            opened = await engine.open()
            await engine.consumed(engine.append(opened, PROMPT))
            # The stalled client opens a session and asks for a long generation.
            stalled.frames = [json.dumps({"type": "open", "session": opened.id}),
                              json.dumps({"type": "generate", "max_tokens": 4000, "stop_token_ids": []})]
            with anyio.fail_after(20):
                await Connection(server, stalled).run()  # returns once it disconnected the client
            assert stalled.close_code[0] == 1008 and "slowly" in stalled.close_code[1]
            assert opened.generation is None or opened.generation.cancelled
            # Meanwhile and afterwards, another session generates at full speed.
            other = await engine.open()
            await engine.consumed(engine.append(other, PROMPT))
            stream = await engine.generate(other, SamplingParams(max_tokens=20, stop_token_ids=()))
            with anyio.fail_after(10):
                assert len([t async for t in stream]) == 20
            assert opened.generation is None  # the abandoned generation was ended, not left running
            tg.cancel_scope.cancel()

    run(main)


class _RecordingSocket:
    """A websocket that records every frame in the order it reaches the wire,
    whether written directly (websockets' broadcast) or through send()."""

    def __init__(self):
        from types import SimpleNamespace

        from websockets.protocol import State

        self.wire: list[str] = []
        self.send_started = anyio.Event()
        self.release = anyio.Event()
        self._pending: list[bytes] = []
        self.state = State.OPEN
        self.send_in_progress = None
        self.protocol = SimpleNamespace(state=State.OPEN, send_text=self._pending.append)

    def send_data(self) -> None:
        self.wire.extend(data.decode() for data in self._pending)
        self._pending.clear()

    async def send(self, frame):
        self.wire.append(frame)  # written before websockets' send waits to drain
        self.send_started.set()
        await self.release.wait()

    async def recv(self):
        await anyio.sleep_forever()

    async def close(self, code=1000, reason=""):
        pass


def test_frames_keep_their_order_between_direct_writes_and_the_queue():
    from streamgemma.serve.connection import WRITE_BUDGET, Connection

    async def main():
        server = Server(Engine(text_model(), max_active=1), port=0)
        ws = _RecordingSocket()
        conn = Connection(server, ws)
        async with anyio.create_task_group() as tg:
            tg.start_soon(conn.run)
            await anyio.sleep(0.01)
            big = "b" * WRITE_BUDGET
            conn.send("a")  # within the budget: straight to the socket
            conn.send(big)  # still direct; the budget is now spent
            conn.send("c")  # queued, for the writer task (whose send waits for the socket to drain)
            conn.send("d")  # the queue is not empty: d waits behind c
            assert ws.wire == ["a", big]
            await ws.send_started.wait()  # the writer put c on the wire and waits for it to drain
            conn.send("e")  # d is still queued: e goes behind it
            ws.release.set()
            with anyio.fail_after(5):
                while len(ws.wire) < 5:
                    await anyio.sleep(0.01)
            conn.send("f")  # the writer drained the socket: direct again
            assert ws.wire == ["a", big, "c", "d", "e", "f"]
            tg.cancel_scope.cancel()

    run(main)


def test_a_stream_whose_frames_fail_ends_with_an_error_and_the_others_go_on(server, monkeypatch):
    from streamgemma.serve.protocol import TokenFrames

    real = TokenFrames.token

    def token(self, tok):
        if self.session_id == broken[0]:
            raise RuntimeError("cannot encode")
        return real(self, tok)

    broken = [None]
    monkeypatch.setattr(TokenFrames, "token", token)

    async def main():
        async with sg.Client(server.url, coalesce=False) as a, sg.Client(server.url, coalesce=False) as b:
            sa, sb = await a.open(), await b.open()
            await sa.append(PROMPT)
            await sb.append(PROMPT)
            broken[0] = sa.id
            with pytest.raises(sg.ServerError, match="internal"):
                async for _ in sa.generate(max_tokens=8, stop_token_ids=NO_STOP):
                    pass
            got = [t.id async for t in sb.generate(max_tokens=8, stop_token_ids=NO_STOP)]
            assert len(got) == 8
            await sa.append(" and again")  # the failed stream's session is still usable

    run(main)


def test_closing_a_session_mid_generation_sends_its_done_then_closed(server):
    async def main():
        async with connect(server.url) as ws:
            async def ask(msg):
                await ws.send(json.dumps(msg))

            await ask({"type": "open"})
            sid = json.loads(await ws.recv())["session"]
            await ask({"type": "append", "text": PROMPT})
            assert json.loads(await ws.recv())["type"] == "appended"
            await ask({"type": "generate", "id": "g", "max_tokens": 4000, "stop_token_ids": [], "coalesce": True})
            first = json.loads(await ws.recv())
            assert first["type"] in ("token", "tokens")
            await ask({"type": "close", "id": "c", "session": sid})
            kinds = []
            with anyio.fail_after(10):
                while "closed" not in kinds:
                    e = json.loads(await ws.recv())
                    kinds.append(e["type"])
                    if e["type"] == "done":
                        assert e["reason"] == "cancelled" and e["id"] == "g"
            assert "done" in kinds

    run(main)


def test_a_generation_ended_outside_a_tick_wakes_the_token_pump():
    """close() ends a generation without a scheduler tick; whoever waits for
    delivered tokens (the server's pump) must still see its end."""

    async def main():
        engine = Engine(text_model(), max_active=2)  # no scheduler running: no ticks at all
        es = await engine.open()
        await anyio.to_thread.run_sync(es.live.feed, PROMPT)
        stream = await engine.generate(es, SamplingParams(max_tokens=50, stop_token_ids=()))
        woke = anyio.Event()

        async def waiter():
            await engine.deliveries.wait()
            woke.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.sleep(0.01)
            await engine.close(es)
            with anyio.fail_after(5):
                await woke.wait()
        assert stream.ending and stream.take_ready() == [] and stream.done.reason == "cancelled"

    run(main)
