"""The OpenAI-compatible HTTP API against a real server on 127.0.0.1, with a
raw HTTP client: responses and streams, the chat template, stop strings,
logprobs, bad requests answered with OpenAI-shaped errors, auth, /health,
/metrics, and exact prefix reuse (across requests and across a restart with
a directory store)."""

from __future__ import annotations

import http.client
import json
import math
import threading

import pytest
from httpfixtures import MODEL, TOKEN, http_server, post, request

import streamgemma as sg
from streamgemma.session.chat_template import chat_prompt_ids

LIMITS = sg.Limits(max_message_bytes=1 << 16, max_tokens=512)
QUESTION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a list?"}]


@pytest.fixture(scope="module")
def model():
    return sg.load("demo")


@pytest.fixture(scope="module")
def server(model):
    with http_server(model, limits=LIMITS) as srv:
        yield srv


def complete(server, **body):
    reply = post(server, "/v1/completions", {"model": MODEL, **body})
    assert reply.status == 200, reply.body
    return reply.json()


def chat(server, messages, **body):
    reply = post(server, "/v1/chat/completions", {"model": MODEL, "messages": messages, **body})
    assert reply.status == 200, reply.body
    return reply.json()


# -- answers ---------------------------------------------------------------------------------
def test_models_lists_the_served_model_and_health_needs_no_token(server):
    reply = request(server, "GET", "/v1/models")
    assert reply.status == 200, reply.read()
    assert [m["id"] for m in reply.json()["data"]] == [MODEL]
    assert request(server, "GET", f"/v1/models/{MODEL}").json()["id"] == MODEL
    health = request(server, "GET", "/health", token=None)
    assert health.status == 200 and health.json()["status"] == "ok"


def test_a_greedy_completion_is_what_a_local_session_writes(server, model):
    body = complete(server, prompt="The Python", max_tokens=8, temperature=0)
    choice = body["choices"][0]
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert choice["text"] == model.session().complete("The Python", max_tokens=8, temperature=0)
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    prompt_tokens = len(model.tokenizer.encode("The Python", add_bos=True))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 8,
                             "total_tokens": prompt_tokens + 8, "prompt_tokens_details": {"cached_tokens": 0}}


def test_a_prompt_of_token_ids_is_consumed_as_given(server, model):
    ids = model.tokenizer.encode("The Python", add_bos=True)
    by_ids = complete(server, prompt=ids, max_tokens=6, temperature=0, return_token_ids=True)
    by_text = complete(server, prompt="The Python", max_tokens=6, temperature=0)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert len(by_ids["choices"][0]["token_ids"]) == 6


def test_chat_applies_gemma_turns_as_chat_from_messages_does(server, model):
    body = chat(server, QUESTION, max_tokens=10, temperature=0)
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    session = model.session()
    local = sg.Chat.from_messages(session, QUESTION)
    assert message == {"role": "assistant", "content": "".join(t.text for t in local.reply(max_tokens=10,
                                                                                             temperature=0)),
                       "refusal": None}
    expected = model.tokenizer.encode("<start_of_turn>user\nAnswer briefly.\n\nWhat is a list?<end_of_turn>\n"
                                      "<start_of_turn>model\n", add_bos=True)
    assert chat_prompt_ids(model.tokenizer, QUESTION) == expected
    assert body["usage"]["prompt_tokens"] == len(expected)


def test_a_stream_carries_the_same_text_then_usage_then_done(server):
    whole = chat(server, QUESTION, max_tokens=12, seed=7)
    reply = post(server, "/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "max_tokens": 12, "seed": 7,
                                                  "stream": True, "stream_options": {"include_usage": True}})
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/event-stream")
    events = reply.events()
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    plain = post(server, "/v1/completions", {"model": MODEL, "prompt": "The", "max_tokens": 5, "stream": True})
    events = plain.events()
    assert events[-1] == "[DONE]" and "usage" not in events[0]
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_a_stop_string_ends_the_text_before_it(server):
    free = complete(server, prompt="The Python", max_tokens=24, temperature=0)["choices"][0]["text"]
    stop = free[len(free) // 2:len(free) // 2 + 3]
    assert stop.strip(), free
    stopped = complete(server, prompt="The Python", max_tokens=24, temperature=0, stop=[stop, "zzzz"])
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["text"] == free[:free.index(stop)]


def test_logprobs_of_completions_and_chat(server, model):
    body = complete(server, prompt="The Python", max_tokens=5, temperature=0, logprobs=3)
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 3 and value <= 0
        assert math.isclose(max(top.values()), value, rel_tol=1e-6)  # greedy: the likeliest token
        assert top[token] == value
    assert lp["text_offset"][0] == 0
    session = model.session()
    session.feed(chat_prompt_ids(model.tokenizer, QUESTION))
    expected = list(session.generate(max_tokens=4, temperature=0.7, top_k=40, seed=5, logprobs=2))
    body = chat(server, QUESTION, max_tokens=4, temperature=0.7, top_k=40, seed=5, logprobs=True, top_logprobs=2)
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["logprob"] for c in content] == pytest.approx([t.logprob for t in expected], rel=1e-5)
    assert [[a["token"] for a in c["top_logprobs"]] for c in content] == \
        [[model.tokenizer.decode([i]) for i, _ in t.top_logprobs] for t in expected]
    assert content[0]["bytes"] == list(content[0]["token"].encode())


# -- refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize("body, status, code, param", [
    ({"model": "gpt-4", "prompt": "x"}, 404, "model_not_found", "model"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "invalid_value", "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "invalid_value", "top_p"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 513}, 400, "invalid_value", "max_tokens"),
    ({"model": MODEL, "prompt": "x", "seed": 2 ** 64}, 400, "invalid_value", "seed"),
    ({"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "invalid_value", "logprobs"),
    ({"model": MODEL, "prompt": "x", "n": 2}, 400, "unsupported", "n"),
    ({"model": MODEL, "prompt": ["a", "b"]}, 400, "unsupported", "prompt"),
    ({"model": MODEL, "prompt": [1, 99999]}, 400, "invalid_value", "prompt"),
    ({"model": MODEL, "prompt": ""}, 400, "invalid_value", "prompt"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "invalid_type", "temperature"),
    ({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "invalid_value",
     "stream_options"),
    ({"model": MODEL, "prompt": "x", "made_up": 1}, 400, "unknown_field", "made_up"),
    ({"model": MODEL, "prompt": "x", "n": True}, 400, "invalid_type", "n"),
    ({"model": MODEL, "prompt": "x", "best_of": True}, 400, "invalid_type", "best_of"),
    ({"model": MODEL, "prompt": "x", "stream_options": {}}, 400, "invalid_value", "stream_options"),
    ({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": False}}, 400, "invalid_value",
     "stream_options"),
    ({"model": MODEL, "prompt": "x", "\ud800": 1}, 400, "unknown_field", "\\ud800"),  # a lone surrogate
])
def test_bad_completion_requests_get_openai_shaped_errors(server, body, status, code, param):
    reply = post(server, "/v1/completions", body)
    assert reply.status == status, reply.body
    assert set(reply.error) == {"message", "type", "code", "param"}
    assert reply.error["code"] == code and reply.error["param"] == param
    assert reply.error["type"] == "invalid_request_error"


@pytest.mark.parametrize("messages", [
    [], [{"role": "tool", "content": "x"}], [{"role": "assistant", "content": "x"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    [{"role": "user", "content": "hi \ud800"}],  # a lone surrogate: not text a tokenizer can take
    [{"role": "user", "content": ""}], [{"role": "user", "content": " \n"}],
])
def test_bad_messages_are_400(server, messages):
    reply = post(server, "/v1/chat/completions", {"model": MODEL, "messages": messages})
    assert reply.status == 400 and reply.error["message"]


@pytest.mark.parametrize("max_tokens", ["junk", 0, 10**6])
def test_max_tokens_beside_max_completion_tokens_is_checked_too(server, max_tokens):
    reply = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                  "max_completion_tokens": 4, "max_tokens": max_tokens})
    assert reply.status == 400 and reply.error["param"] in ("max_tokens", None), reply.body


def test_the_default_max_tokens_is_never_above_the_server_limit(model):
    """A request that omits max_tokens gets min(default 256, the limit), not a 400 for a field it never sent."""
    with http_server(model, limits=sg.Limits(max_tokens=20)) as server:
        reply = post(server, "/v1/completions", {"model": MODEL, "prompt": "The", "stop": []})
        assert reply.status == 200, reply.body
        assert reply.json()["usage"]["completion_tokens"] <= 20


def test_the_bearer_scheme_is_any_case_and_the_token_compared_as_sent(model):
    import socket

    def status(port, authorization: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: "
                         + authorization + b"\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return data.split(b"\r\n", 1)[0].split(b" ")[1]

    with http_server(model, token="abc?") as server:
        port = server.http.port
        assert status(port, b"Bearer abc?") == b"200"
        assert status(port, b"bearer abc?") == b"200"
        assert status(port, b"Bearer abc\xff") == b"401"  # (a byte that is not UTF-8 is not "?")


def test_bad_json_unknown_routes_and_methods(server):
    for raw in (b"{", b"[1, 2]", b"\xff", b'{"prompt": NaN}'):
        reply = request(server, "POST", "/v1/completions", raw=raw)
        assert reply.status == 400 and reply.error["code"] == "invalid_json", raw
    assert request(server, "GET", "/v1/nothing").error["code"] == "not_found"
    reply = request(server, "GET", "/v1/completions")
    assert reply.status == 405 and reply.error["code"] == "method_not_allowed"
    assert request(server, "GET", "/v1/models/other").status == 404


def test_oversized_bodies_are_413_with_or_without_a_length(server):
    big = json.dumps({"model": MODEL, "prompt": "x" * (LIMITS.max_message_bytes + 10)}).encode()
    reply = request(server, "POST", "/v1/completions", raw=big)
    assert reply.status == 413 and reply.error["code"] == "request_too_large"
    conn = http.client.HTTPConnection("127.0.0.1", server.http.port, timeout=30)
    conn.request("POST", "/v1/completions", body=iter([big[:40000], big[40000:]]), encode_chunked=True,
                  headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 413 and json.loads(reply.read())["error"]["code"] == "request_too_large"
    conn.close()


def test_the_bearer_token_is_required(server):
    for token, reason in ((None, "missing"), ("wrong", "wrong bearer token")):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/metrics")):
            reply = request(server, method, path, {"model": MODEL, "prompt": "x"}, token=token)
            assert reply.status == 401 and reply.error["type"] == "authentication_error"
            assert reason in reply.error["message"]


def test_requests_beyond_max_requests_get_429(model):
    with http_server(model, limits=LIMITS, max_requests=1) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.http.port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps(
            {"model": MODEL, "prompt": "The", "max_tokens": 512, "stream": True, "stop": ["never-seen-text"]}),
            headers={"Authorization": f"Bearer {TOKEN}"})
        first = conn.getresponse()
        assert first.status == 200 and first.readline().startswith(b"data: ")
        reply = post(srv, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert reply.status == 429 and reply.error["type"] == "rate_limit_error"
        conn.close()  # the server cancels the generation when the client goes


# -- prefix reuse and monitoring -------------------------------------------------------------
def test_the_next_chat_turn_reuses_the_conversation_state(server, model):
    first = chat(server, QUESTION, max_tokens=12, temperature=0)
    reply = first["choices"][0]["message"]["content"]
    history = QUESTION + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And a dict?"}]
    second = chat(server, history, max_tokens=12, temperature=0, stream=False)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == first["usage"]["total_tokens"]
    # Exact: the reply a live session fed both turns gives.
    session = model.session()
    local = sg.Chat.from_messages(session, QUESTION)
    assert "".join(t.text for t in local.reply(max_tokens=12, temperature=0)) == reply
    session.feed(chat_prompt_ids(model.tokenizer, history)[session.position:])
    assert second["choices"][0]["message"]["content"] == "".join(
        t.text for t in session.generate(max_tokens=12, temperature=0))
    # A completion that extends an earlier completion's tokens hits too.
    a = complete(server, prompt="Lists are", max_tokens=4, temperature=0)
    b = complete(server, prompt="Lists are" + a["choices"][0]["text"] + " and", max_tokens=4, temperature=0)
    assert 0 < b["usage"]["prompt_tokens_details"]["cached_tokens"] <= a["usage"]["total_tokens"]


def test_prefix_reuse_survives_a_restart_with_a_directory_store(model, tmp_path):
    store = sg.DirectorySnapshotStore(tmp_path)
    with http_server(model, store=store, prefix_cache_memory_bytes=0) as srv:
        first = chat(srv, QUESTION, max_tokens=8, temperature=0)
    assert any(name.startswith("prefix.") for name in store.list())
    history = QUESTION + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                          {"role": "user", "content": "Why?"}]
    with http_server(model, store=sg.DirectorySnapshotStore(tmp_path)) as srv:
        second = chat(srv, history, max_tokens=8, temperature=0)
        metrics = request(srv, "GET", "/metrics").body.decode()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == first["usage"]["total_tokens"]
    assert "streamgemma_prefix_cache_hits_total 1.0" in metrics


def test_prefix_cache_bounds_its_bytes_least_recently_used_out(model, tmp_path):
    store = sg.DirectorySnapshotStore(tmp_path)
    entries = lambda: sorted(int(k.split(".")[1]) for k in store.list() if k.startswith("prefix."))  # noqa: E731
    with http_server(model, store=store, prefix_cache_memory_bytes=0, prefix_cache_bytes=1) as srv:
        complete(srv, prompt="The Python", max_tokens=2)
    assert entries() == []  # larger than the bound: never kept
    first = [2, 40, 41, 42]
    with http_server(model, store=store, prefix_cache_memory_bytes=0, prefix_cache_bytes=1 << 30) as srv:
        reply = complete(srv, prompt=first, max_tokens=2, return_token_ids=True)["choices"][0]["token_ids"]
    (entry,) = [k for k in store.list() if k.startswith("prefix.")]
    size = int(entry.split(".")[2])
    # Room for two entries: the third evicts the least recently used one.
    with http_server(model, store=store, prefix_cache_memory_bytes=0, prefix_cache_bytes=2 * size + size // 2) as srv:
        complete(srv, prompt=[2, 50, 51, 52, 53], max_tokens=2)  # a second entry (7 tokens)
        hit = complete(srv, prompt=first + reply + [60, 61, 62], max_tokens=2)  # uses the first entry again
        assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] == 6
    assert entries() == [6, 11]  # the 7-token entry was the least recently used


def test_metrics_report_sessions_tokens_ttft_and_cache(server):
    complete(server, prompt="The", max_tokens=3)
    text = request(server, "GET", "/metrics").body.decode()
    for name in ("streamgemma_sessions{state=\"live\"}", "streamgemma_generated_tokens_total",
                 "streamgemma_decoded_input_tokens_total",
                 "streamgemma_decode_batch_size", "streamgemma_queue_sessions",
                 "streamgemma_time_to_first_token_seconds_bucket", "streamgemma_prefix_cache_hits_total",
                 "streamgemma_prefix_cache_misses_total", "streamgemma_http_requests_total"):
        assert name in text, name
    assert 'streamgemma_time_to_first_token_seconds_count{endpoint="completion"}' in text

    import anyio

    def engine_first_tokens() -> int:
        text = request(server, "GET", "/metrics").body.decode()
        return int(float(text.split("streamgemma_engine_time_to_first_token_seconds_count ")[1].split()[0]))

    before = engine_first_tokens()

    async def websocket_generation():
        async with sg.Client(server.url, token=TOKEN) as client:
            session = await client.open()
            await session.append("The")
            assert len([t async for t in session.generate(max_tokens=2)]) == 2
            await session.close()  # (later tests expect no session left in the engine)

    anyio.run(websocket_generation, backend="asyncio")
    assert engine_first_tokens() == before + 1  # websocket generations count too


def test_engine_stats_bucket_the_time_to_first_token():
    from streamgemma.serve.record import FIRST_TOKEN_BUCKETS, EngineStats

    stats = EngineStats()
    for seconds in (0.001, 0.005, 0.3, 99.0):
        stats.observe_first_token(seconds)
    assert stats.first_token_count == 4 and stats.first_token_seconds == pytest.approx(99.306)
    assert stats.first_token_buckets[0] == 2  # <= 0.005 (the bound is inclusive, as Prometheus' "le")
    assert stats.first_token_buckets[FIRST_TOKEN_BUCKETS.index(0.5)] == 1
    assert sum(stats.first_token_buckets) == 3  # 99 s: only in +Inf


def test_a_cache_entry_cannot_be_opened_as_a_session(server):
    import anyio

    store_keys = [k for k in server.engine.store.list() if k.startswith("prefix.")]

    async def main():
        async with sg.Client(server.url, token=TOKEN) as client:
            with pytest.raises(sg.ServerError, match="bad_message"):
                await client.open(session=store_keys[0] if store_keys else "prefix.1.2.abc")

    anyio.run(main, backend="asyncio")


def test_stopping_the_server_ends_streams_in_flight(model):
    with http_server(model, limits=LIMITS) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.http.port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps(
            {"model": MODEL, "prompt": "The", "max_tokens": 512, "stream": True, "stop": ["never-seen-text"]}),
            headers={"Authorization": f"Bearer {TOKEN}"})
        reply = conn.getresponse()
        assert reply.readline().startswith(b"data: ")
        rest = []
        reader = threading.Thread(target=lambda: rest.append(reply.read()))
        reader.start()
    reader.join(30)
    events = rest[0].decode().strip().split("\n\n")
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["error"]["code"] == "unavailable"
    assert not srv.engine.sessions  # the request's session was closed


def test_a_client_that_leaves_a_stream_cancels_its_generation(server, caplog):
    import time

    before = set(server.engine.sessions)  # (sessions earlier tests' requests left held)
    conn = http.client.HTTPConnection("127.0.0.1", server.http.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"model": MODEL, "prompt": "The", "max_tokens": 512, "stream": True, "stop": ["never-seen-text"]}),
        headers={"Authorization": f"Bearer {TOKEN}"})
    reply = conn.getresponse()
    assert reply.readline().startswith(b"data: ")
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.monotonic() + 20
    while set(server.engine.sessions) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(server.engine.sessions) - before  # its session was closed, not held
    assert server.http.in_flight == 0
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_a_client_that_leaves_a_stream_whose_text_is_held_back_cancels_its_generation(server):
    """While the output may be the start of a stop string nothing is written, so no failed write tells
    the server the client left: it looks at the connection after every batch instead."""
    import time

    greedy = {"model": MODEL, "prompt": "The", "max_tokens": 300, "temperature": 0}
    text = post(server, "/v1/completions", greedy).json()["choices"][0]["text"]
    before, generated = set(server.engine.sessions), server.engine.stats.decoded_tokens
    conn = http.client.HTTPConnection("127.0.0.1", server.http.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps(
        {**greedy, "max_tokens": 512, "stream": True, "stop": [text + "\U00010000"]}),
        headers={"Authorization": f"Bearer {TOKEN}"})
    reply = conn.getresponse()
    assert reply.status == 200, reply.read()
    deadline = time.monotonic() + 20
    while not set(server.engine.sessions) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    conn.sock.shutdown(2)
    conn.close()
    while set(server.engine.sessions) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(server.engine.sessions) - before and server.http.in_flight == 0
    assert server.engine.stats.decoded_tokens - generated < 200  # cancelled, not run to max_tokens (512)


def test_a_client_that_leaves_before_a_whole_answer_cancels_its_generation(server, caplog):
    import socket
    import time

    before = set(server.engine.sessions)  # (sessions earlier tests' requests left held)
    body = json.dumps({"model": MODEL, "prompt": "The", "max_tokens": 512, "stop": ["never-seen-text"]}).encode()
    with socket.create_connection(("127.0.0.1", server.http.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 20
        while not set(server.engine.sessions) - before and time.monotonic() < deadline:
            time.sleep(0.01)
    generated = server.engine.stats.decoded_tokens
    while set(server.engine.sessions) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(server.engine.sessions) - before and server.http.in_flight == 0
    assert server.engine.stats.decoded_tokens - generated < 400  # cancelled, not run to max_tokens
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_logprobs_of_byte_tokens_carry_their_own_byte_and_keep_every_alternative():
    """A byte-fallback token (<0xFC>) decoded alone is U+FFFD: chat's `bytes` gave U+FFFD's three bytes,
    and completions' top_logprobs (keyed by text) lost the alternatives whose text collided."""
    from textfixtures import text_model

    with http_server(text_model()) as srv:
        tok = srv.engine.model.tokenizer
        body = post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}],
                                                  "max_tokens": 12, "seed": 1, "logprobs": True,
                                                  "return_token_ids": True}).json()
        choice, checked = body["choices"][0], 0
        for token_id, entry in zip(choice["token_ids"], choice["logprobs"]["content"]):
            piece = tok.piece(token_id)
            if piece.startswith("<0x") and int(piece[3:5], 16) >= 0x80:
                checked += 1
                assert entry["bytes"] == [int(piece[3:5], 16)] and entry["token"] == f"bytes:\\x{piece[3:5].lower()}"
        assert checked
        body = post(srv, "/v1/completions", {"prompt": "hello", "max_tokens": 12, "seed": 1, "logprobs": 5}).json()
        # temperature 1 and no top_k / top_p / min_p: nothing is filtered, so five alternatives each
        assert [len(t) for t in body["choices"][0]["logprobs"]["top_logprobs"]] == [5] * 12


def test_an_answer_cut_mid_character_ends_as_the_decode_of_its_ids():
    """max_tokens that ended a generation inside a character spelled by byte pieces dropped that character's
    bytes: the answer was shorter than the decode of its own ids (which gives U+FFFD a byte)."""
    from textfixtures import text_model

    with http_server(text_model()) as srv:
        tok = srv.engine.model.tokenizer
        prompt = tok.encode("hello", add_bos=True)
        ids = post(srv, "/v1/completions", {"prompt": "hello", "max_tokens": 16, "seed": 1,
                                            "return_token_ids": True}).json()["choices"][0]["token_ids"]
        cuts = [n for n in range(1, 17) if tok.unfinished(ids[:n])]
        assert cuts  # the seed's answer has characters left unfinished at some cuts
        for n in cuts:
            want = tok.decode(prompt + ids[:n])[len(tok.decode(prompt)):]
            body = {"prompt": "hello", "max_tokens": n, "seed": 1}
            assert post(srv, "/v1/completions", body).json()["choices"][0]["text"] == want
            events = post(srv, "/v1/completions", {**body, "stream": True}).events()
            assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == want


def test_an_answer_cut_mid_character_counts_the_bytes_a_prompt_of_ids_left_unfinished():
    """A prompt of ids ending in a character's lead byte, an answer of one continuation byte cut by max_tokens:
    the session held both bytes, and the tail counted the answer's only (the answer was empty)."""
    from textfixtures import text_model

    model = text_model()
    tok = model.tokenizer
    byte = {int(tok.piece(i)[3:5], 16): i for i in range(tok.vocab_size) if tok.piece(i).startswith("<0x")}
    prompt = tok.encode("hello", add_bos=True) + [byte[0xE2]]  # the lead byte of a 3-byte character
    checked = 0
    with http_server(model) as srv:
        for seed in range(60):
            choice = post(srv, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "seed": seed,
                                                   "return_token_ids": True}).json()["choices"][0]
            ids = choice["token_ids"]
            # the prompt's text (its decode without the dangling byte), then the answer: the decode of both
            assert choice["text"] == tok.decode(prompt + ids)[len(tok.decode(prompt[:-1])):]
            checked += tok.piece(ids[0]).startswith("<0x")
    assert checked  # some answers were a byte the character was still waiting for


def test_a_request_still_prefilling_when_the_server_stops_is_answered_503(model):
    """stop() cancelled only requests already generating; one still prefilling its prompt got a cut
    connection when aiohttp's shutdown cancelled its handler."""
    import time

    answer = {}
    prompt = [2] + [5 + i % 200 for i in range(40000)]
    with http_server(model, limits=sg.Limits(max_message_bytes=1 << 20, max_tokens=64)) as srv:
        def client():
            reply = post(srv, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 4})
            answer["status"], answer["error"] = reply.status, reply.error

        thread = threading.Thread(target=client)
        thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(0 < es.position < len(prompt)
                                                      for es in list(srv.engine.sessions.values())):
            time.sleep(0.005)
        assert srv.http.in_flight == 1  # prefilling (64 tokens a tick: hundreds of ticks to go)
    thread.join(60)
    assert answer["status"] == 503 and answer["error"]["code"] == "unavailable"
    assert not srv.engine.sessions


def test_a_client_that_leaves_mid_body_is_not_a_server_error(server, caplog):
    """A body cut off by the client's leaving is a 499 in the metrics, not a logged 500."""
    import socket
    import time

    with socket.create_connection(("127.0.0.1", server.http.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {TOKEN}\r\nContent-Length: 1000\r\n\r\n".encode()
                     + b'{"model": "m", "prompt": "The')
    metrics, deadline = "", time.monotonic() + 20
    while 'status="499"' not in metrics and time.monotonic() < deadline:  # (the server reads it a moment later)
        time.sleep(0.05)
        metrics = request(server, "GET", "/metrics").body.decode()
    assert 'status="499"' in metrics and 'status="500"' not in metrics
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_body_that_does_not_decompress_is_a_400(server, encoding, caplog):
    """... and nothing else: aiohttp's own decoding also logged an "Unhandled exception" traceback."""
    import zlib

    whole = zlib.compress(json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}).encode())
    for raw in (b"this is not compressed", b"\x1f\x8b" + whole[:8] if encoding == "gzip" else whole[:8]):
        reply = request(server, "POST", "/v1/completions", raw=raw, headers={"Content-Encoding": encoding})
        assert reply.status == 400 and reply.error["code"] == "invalid_json"
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw deflate"])
def test_compressed_bodies_are_read_and_their_inflated_size_limited(server, encoding):
    import zlib

    def squeeze(data: bytes) -> bytes:
        wbits = {"gzip": 31, "deflate": 15, "raw deflate": -15}[encoding]
        c = zlib.compressobj(wbits=wbits)
        return c.compress(data) + c.flush()

    header = {"Content-Encoding": encoding.split()[-1]}
    body = json.dumps({"model": MODEL, "prompt": "The", "max_tokens": 2, "temperature": 0}).encode()
    reply = request(server, "POST", "/v1/completions", raw=squeeze(body), headers=header)
    assert reply.status == 200 and reply.json()["choices"][0]["text"] == complete(
        server, prompt="The", max_tokens=2, temperature=0)["choices"][0]["text"]
    bomb = json.dumps({"model": MODEL, "prompt": " " * (LIMITS.max_message_bytes * 4)}).encode()
    assert len(squeeze(bomb)) < LIMITS.max_message_bytes  # small on the wire, over the limit inflated
    reply = request(server, "POST", "/v1/completions", raw=squeeze(bomb), headers=header)
    assert reply.status == 413 and reply.error["code"] == "request_too_large"


def test_a_gzip_body_of_several_members_is_read_whole_and_bytes_after_the_data_are_refused(server):
    import gzip
    import zlib

    body = json.dumps({"model": MODEL, "prompt": "The", "max_tokens": 2, "temperature": 0}).encode()
    members = gzip.compress(body[:10]) + gzip.compress(body[10:])  # (it kept the first member only: a 400)
    reply = request(server, "POST", "/v1/completions", raw=members, headers={"Content-Encoding": "gzip"})
    assert reply.status == 200, reply.body
    for encoding, data in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        reply = request(server, "POST", "/v1/completions", raw=data + b"junk", headers={"Content-Encoding": encoding})
        assert reply.status == 400 and "after its" in reply.error["message"]  # (accepted before)


def test_an_unknown_content_encoding_is_a_415(server):
    reply = request(server, "POST", "/v1/completions", raw=b"{}", headers={"Content-Encoding": "br"})
    assert reply.status == 415 and reply.error["code"] == "unsupported_encoding"


@pytest.mark.parametrize("device, dtype", [("cpu", "float32"), ("cuda", "bfloat16")])
def test_prefix_reuse_continues_exactly_from_either_tier(tmp_path, device, dtype):
    """The second request continues the first one's held session, or restores
    its final state (from host memory, or from the store the moment the first
    answer is back), and gives the tokens a live session gives."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0, device=device, dtype=dtype)
    prompt = [5 + i % 200 for i in range(295)]
    for store, memory, held in ((None, 0, 1), (None, 1 << 30, 0), (sg.DirectorySnapshotStore(tmp_path), 0, 0)):
        with http_server(model, store=store, limits=LIMITS, prefix_cache_memory_bytes=memory,
                         held_sessions=held) as srv:
            first = complete(srv, prompt=prompt, max_tokens=8, temperature=0, return_token_ids=True)
            reply = first["choices"][0]["token_ids"]
            assert len(srv.http.held) == held
            second = complete(srv, prompt=prompt + reply + [7, 8, 9], max_tokens=8, temperature=0,
                              return_token_ids=True)
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prompt) + 8
        live = model.session()
        live.feed(prompt)
        assert [t.id for t in live.generate(max_tokens=8, temperature=0)] == reply
        live.feed([7, 8, 9])
        assert [t.id for t in live.generate(max_tokens=8, temperature=0)] == second["choices"][0]["token_ids"]


def test_held_sessions_serve_one_turn_each_are_bounded_and_closed_at_stop(model, tmp_path):
    store = sg.DirectorySnapshotStore(tmp_path)
    with http_server(model, store=store, limits=LIMITS, held_sessions=2) as srv:
        ask = lambda ids: complete(srv, prompt=ids, max_tokens=4, temperature=0, return_token_ids=True)  # noqa: E731
        first = ask([5, 6, 7])
        history = [5, 6, 7] + first["choices"][0]["token_ids"]
        assert len(srv.http.held) == 1 and len(srv.engine.sessions) == 1
        # Two branches of one conversation: the first continues the held session,
        # the second finds the same state in the memory tier.
        a, b = ask(history + [8]), ask(history + [9])
        for reply in (a, b):
            assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == len(history)
        live = model.session()
        live.feed(history + [9])
        assert [t.id for t in live.generate(max_tokens=4, temperature=0)] == b["choices"][0]["token_ids"]
        ask([10, 11])
        assert len(srv.http.held) == 2 and len(srv.engine.sessions) == 2  # the least recently held was closed
        metrics = request(srv, "GET", "/metrics").body.decode()
        assert "streamgemma_prefix_cache_hits_total 2.0" in metrics
    assert not srv.engine.sessions  # closed at stop, not suspended into the store
    assert not [k for k in store.list() if not k.startswith("prefix.")]


def test_a_request_session_is_neither_snapshotted_at_open_nor_journaled(model, tmp_path):
    """The HTTP API's sessions are never reopened by id: with a durable store
    (which journals websocket sessions), a request writes only its prefix-cache
    entry, even for the session it leaves held."""
    import os

    store = sg.DirectorySnapshotStore(tmp_path)
    with http_server(model, store=store, limits=LIMITS, held_sessions=1) as srv:
        first = complete(srv, prompt=[5, 6, 7], max_tokens=4, temperature=0, return_token_ids=True)
        history = [5, 6, 7] + first["choices"][0]["token_ids"]
        second = complete(srv, prompt=history + [8], max_tokens=4, temperature=0)
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == len(history)
        assert len(srv.http.held) == 1 and len(srv.engine.sessions) == 1
        written = sorted(name for _, _, names in os.walk(tmp_path) for name in names)
        # (a prefix entry still being written is a hidden temporary file)
        assert written and all(name.lstrip(".").startswith("prefix.") for name in written), written


def test_a_store_that_cannot_be_reached_is_a_prefix_cache_miss(model, tmp_path):
    """The cache is an optimisation: while its store is down a lookup misses (no 500), and the entry
    serves again once the store is back."""
    import anyio

    from streamgemma.errors import StoreUnavailable
    from streamgemma.serve.prefix_cache import PrefixCache

    store = sg.DirectorySnapshotStore(tmp_path)
    ids = model.tokenizer.encode("The quick brown fox", add_bos=True)
    session = model.session()
    session.feed(ids)
    contents = session.capture()

    async def main():
        cache = PrefixCache(model, store, memory_bytes=0)
        await cache.keep(ids, contents)
        await cache.flush()
        real_get = store.get

        def down(key):
            raise StoreUnavailable("the store cannot be reached (test)")

        store.get = down
        missed = await cache.lookup(ids + [10])
        store.get = real_get
        hit = await cache.lookup(ids + [10])
        cache.close()
        return missed, hit

    missed, hit = anyio.run(main)
    assert missed is None and hit is not None and hit.tokens == len(ids)


def fake_engine_for_held_sessions():
    """(engine, the sessions it closed, a maker of sessions at a position): what HeldSessions uses of an engine."""
    import types

    closed = []

    async def close(es):
        closed.append(es)
        es.closed = True

    engine = types.SimpleNamespace(model=types.SimpleNamespace(fingerprint="f"), close=close)
    return engine, closed, lambda position: types.SimpleNamespace(closed=False, position=position)


def test_a_held_session_that_moved_is_closed_when_found_not_leaked():
    """HeldSessions.take: a candidate whose position no longer matches its key is not served, and is
    closed (it used to be dropped from the held set but left open, holding its slot until expiry)."""
    import anyio

    from streamgemma.serve.held_sessions import HeldSessions

    engine, closed, fresh = fake_engine_for_held_sessions()

    async def main():
        held = HeldSessions(engine, max_sessions=4)
        short, moved = fresh(2), fresh(3)
        await held.hold([1, 2], short)
        await held.hold([1, 2, 3], moved)
        moved.position = 5  # (e.g. a bug elsewhere fed it)
        assert await held.take([1, 2, 3, 4]) == (2, short)  # the longer prefix is skipped...
        assert closed == [moved] and len(held) == 0  # ... and closed

    anyio.run(main)


def test_held_sessions_closed_elsewhere_give_up_their_places():
    """A held session that expiry closed kept its place in the held set until evicted, so the bound evicted a
    live session for it; closed ones now leave first."""
    import anyio

    from streamgemma.serve.held_sessions import HeldSessions

    engine, closed, fresh = fake_engine_for_held_sessions()

    async def main():
        held = HeldSessions(engine, max_sessions=2)
        a, b, c = fresh(1), fresh(2), fresh(3)
        await held.hold([7], a)
        await held.hold([7, 8], b)
        b.closed = True  # expiry closed it
        await held.hold([7, 8, 9], c)
        assert len(held) == 2 and closed == []  # a stays: b's place is free
        assert await held.take([7, 8, 9, 10]) == (3, c) and await held.take([7, 5]) == (1, a)

    anyio.run(main)


def _requests_counted(server, endpoint: str, status: int) -> float:
    line = f'streamgemma_http_requests_total{{endpoint="{endpoint}",status="{status}"}} '
    found = [row for row in request(server, "GET", "/metrics").body.decode().splitlines() if row.startswith(line)]
    return float(found[0].split()[-1]) if found else 0.0


@pytest.mark.parametrize("leaves", ["before the headers", "mid-generation"])
def test_a_stream_whose_client_leaves_is_a_499(server, caplog, leaves):
    """Leaving before the status line went out was a logged 500 (`prepare` outside the connection error's
    handling); leaving mid-stream was counted as the 200 already sent."""
    import socket
    import time

    before = {status: _requests_counted(server, "/v1/completions", status) for status in (200, 499, 500)}
    prompt = "hello " * 600 if leaves == "before the headers" else "The"
    body = json.dumps({"prompt": prompt, "max_tokens": 200, "stream": True, "stop": []}).encode()
    with socket.create_connection(("127.0.0.1", server.http.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        if leaves == "mid-generation":
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        else:
            time.sleep(0.05)  # (prefilling)
    deadline = time.monotonic() + 30
    while _requests_counted(server, "/v1/completions", 499) == before[499] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = {status: _requests_counted(server, "/v1/completions", status) for status in (200, 499, 500)}
    assert (after[499] - before[499], after[200], after[500]) == (1, before[200], before[500])
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_wrongly_typed_fields_and_bad_messages_name_their_param(server):
    for path, body, param in (("/v1/completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
                              ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
                              ("/v1/completions", {"prompt": "x", "seed": "a"}, "seed"),
                              ("/v1/completions", {"prompt": "x", "stop": 5}, "stop"),
                              ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs"),
                              ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages"),
                              ("/v1/chat/completions", {"messages": []}, "messages")):
        reply = post(server, path, {"model": MODEL, **body})
        assert reply.status == 400 and reply.error["param"] == param, (body, reply.error)  # (None before)


def test_control_tokens_among_the_alternatives_have_a_text_each(server):
    """<eos> and <bos> both read "" and shared one key of a completions token's alternatives: one was lost."""
    reply = post(server, "/v1/completions", {"model": MODEL, "prompt": "The", "max_tokens": 1, "logprobs": 20,
                                             "temperature": 1.0, "seed": 0})
    tokenizer = sg.load("demo").tokenizer
    renders = [server.http._render_token(i)[0] for i in range(tokenizer.vocab_size)]  # noqa: SLF001
    assert len(reply.json()["choices"][0]["logprobs"]["top_logprobs"][0]) == 20
    assert renders[tokenizer.eos_id] == "<eos>" and renders.count("") == 0


def test_a_held_conversation_whose_snapshot_is_gone_falls_back_to_the_cache(model, tmp_path, caplog):
    """Suspended to the store, its snapshot then deleted (another server's expiry on a shared directory): the
    request failed with a 400 quoting the session id and the store's path, though the prefix cache held the
    same state."""
    import time

    from streamgemma.serve.http import HttpConfig

    store = sg.DirectorySnapshotStore(tmp_path)
    server = sg.Server(sg.Engine(model, max_active=1, store=store), port=0, token=TOKEN, limits=LIMITS,
                       http=HttpConfig(model_name=MODEL, held_sessions=2))
    with sg.serve_in_thread(server):
        first = complete(server, prompt=[5, 6, 7], max_tokens=4, temperature=0, return_token_ids=True)
        history = [5, 6, 7] + first["choices"][0]["token_ids"]
        complete(server, prompt=[10, 11], max_tokens=4, temperature=0)  # the one slot: the first is suspended
        deadline = time.monotonic() + 10
        while not (held := [p for p in tmp_path.glob("*.sgsnap") if not p.name.startswith("prefix.")]):
            assert time.monotonic() < deadline, "the held session was not suspended to the store"
            time.sleep(0.01)
        for path in held:
            path.unlink()
        second = complete(server, prompt=history + [8], max_tokens=4, temperature=0, return_token_ids=True)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == len(history)
    live = model.session()
    live.feed(history + [8])
    assert [t.id for t in live.generate(max_tokens=4, temperature=0)] == second["choices"][0]["token_ids"]
    assert "could not be restored" in caplog.text
