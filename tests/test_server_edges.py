"""The websocket server at its edges: a malformed subprotocol header beside a good token (never logged or
echoed), work asked for during shutdown, pages of other origins when there is no token (each found by a
review)."""

from __future__ import annotations

import logging

from test_web_auth import GOOD, TOKEN, b64, get, handshake, http, server  # noqa: F401 (fixture)


def test_a_malformed_subprotocol_header_never_logs_the_token(server, caplog):  # noqa: F811
    # The right token, with one more (malformed) subprotocol on the same line: the token check passes, then
    # websockets' own parser fails and logs (debug) and answers the whole header value.
    with caplog.at_level(logging.DEBUG):
        status, _ = handshake(server.port, f"Sec-WebSocket-Protocol: streamgemma.v1, {GOOD}, x y")
    assert 400 <= status < 500
    assert b64(TOKEN.encode()) not in caplog.text


def test_a_refusal_body_never_echoes_the_token(server):  # noqa: F811
    head = ("GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: streamgemma.v1, {GOOD}, x y\r\n\r\n")
    status, _, body = http(server.port, head.encode())
    assert 400 <= status < 500
    assert b64(TOKEN.encode()).encode() not in body, body


def test_a_generation_started_during_shutdown_still_ends_with_done(monkeypatch):
    # docs/serving.md, Shutdown: "the server cancels every generation and sends its last tokens and done".
    # A generate that arrives after stop() (here: a client that generates again on `done`) is accepted
    # and then cut by the close: no `done`, and the shutdown waits the whole drain time for it.
    import json
    import time

    import anyio
    from textfixtures import text_model
    from websockets.asyncio.client import connect

    from streamgemma.serve import server as server_module
    from streamgemma.serve.engine import Engine
    from streamgemma.serve.server import Server

    monkeypatch.setattr(server_module, "SHUTDOWN_DRAIN_S", 2.0)
    srv = Server(Engine(text_model(), max_active=2), port=0)
    seen: list[dict] = []

    async def main():
        async with anyio.create_task_group() as tg:
            await tg.start(srv.serve)
            async with connect(srv.url) as ws:
                await ws.send(json.dumps({"type": "open", "id": 1}))
                session = json.loads(await ws.recv())["session"]
                await ws.send(json.dumps({"type": "append", "id": 2, "session": session, "text": "hello there"}))
                assert json.loads(await ws.recv())["type"] == "appended"
                await ws.send(json.dumps({"type": "generate", "id": 3, "session": session, "max_tokens": 4000,
                                          "stop_token_ids": []}))
                assert json.loads(await ws.recv())["type"] in ("token", "tokens")
                stopped_at = time.monotonic()
                srv.stop()
                try:
                    while True:
                        msg = json.loads(await ws.recv())
                        seen.append(msg)
                        if msg["type"] == "done" and msg["id"] == 3:  # generate again, as a running client would
                            await ws.send(json.dumps({"type": "generate", "id": 4, "session": session,
                                                      "max_tokens": 4000, "stop_token_ids": []}))
                except websockets.ConnectionClosed:
                    pass
            tg.cancel_scope.cancel()
        return time.monotonic() - stopped_at

    import websockets
    took = anyio.run(main, backend="asyncio")
    kinds = [(m["type"], m.get("id")) for m in seen if m["type"] in ("done", "error")]
    assert ("done", 3) in kinds
    # The second generate must be refused, or cancelled and end with `done`, never cut off.
    assert ("done", 4) in kinds or any(t == "error" and i == 4 for t, i in kinds), (kinds, len(seen), took)


def test_a_page_of_another_origin_cannot_drive_a_server_without_a_token():
    # "authentication: off (no token); only this machine can connect" (server.py): but any web site open in a
    # browser on this machine can open ws://127.0.0.1:PORT/v1/stream (browsers apply no same-origin rule to
    # websockets; the server must check Origin), and use or close sessions with the page's own protocol.
    from textfixtures import text_model

    from streamgemma.serve.engine import Engine
    from streamgemma.serve.server import Server, serve_in_thread

    srv = Server(Engine(text_model(), max_active=1), port=0)
    with serve_in_thread(srv):
        same, _ = handshake(srv.port, "Origin: http://127.0.0.1")  # (the helper sends "Host: 127.0.0.1")
        assert same == 101  # the server's own page
        status, _ = handshake(srv.port, "Origin: https://evil.example")
        assert status == 403, status
