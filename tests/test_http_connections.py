"""Connections to the server's ports (a review found each): the connection limit covers the HTTP API's
(idle ones used up the file descriptors the store needs; so did connections to the websocket port that
never finished their handshake, and floods of connections refused on either port), idle ones are
closed, a client that leaves during its prompt's prefill is noticed, a request caught by shutdown
before its prefill is a 503, and a request aiohttp cannot parse is one log line."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import anyio
import pytest
import websockets
import websockets.sync.client
from httpfixtures import MODEL, TOKEN, http_server, post, request

import streamgemma as sg
from streamgemma.serve.http_listen import REFUSED_AT_ONCE

LONG_PROMPT = [2] + [5 + i % 200 for i in range(40000)]  # hundreds of ticks of prefill at 64 tokens a tick


@pytest.fixture(scope="module")
def model():
    return sg.load("demo")


def raw_reply(port: int, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_connection_limit_covers_http_connections_too(model):
    with http_server(model, limits=sg.Limits(max_connections=4)) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.http.port)) for _ in range(4)]
        try:
            wait_until(lambda: srv.open_connections() == 4)
            reply = post(srv, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
            assert reply.status == 503 and reply.error["code"] == "too_many_connections"
            with pytest.raises(websockets.InvalidStatus, match="503"):  # the websocket shares the limit
                websockets.sync.client.connect(f"ws://127.0.0.1:{srv.port}/v1/stream",
                                               additional_headers={"Authorization": f"Bearer {TOKEN}"}).close()
        finally:
            for sock in idle:
                sock.close()
        wait_until(lambda: srv.open_connections() == 0)
        reply = post(srv, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert reply.status == 200


BURST = r"""
import socket, sys, time
socks = []
for _ in range(int(sys.argv[2])):
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect(("127.0.0.1", int(sys.argv[1])))
    except BlockingIOError:
        pass
    socks.append(s)
time.sleep(4)
"""


def test_a_burst_of_connections_does_not_pass_the_limit_together(model):
    """One accept round takes up to 100 sockets before aiohttp counts any of them: a burst of 150
    kept up to 100 open past a limit of 4."""
    import subprocess
    import sys

    with http_server(model, limits=sg.Limits(max_connections=4)) as srv:
        burst = subprocess.Popen([sys.executable, "-c", BURST, str(srv.http.port), "150"])
        try:
            time.sleep(3)  # (> BUSY_WAIT_S: the refused are closed, the admitted stay)
            assert srv.open_connections() <= 4
        finally:
            burst.kill()
            burst.wait()


def test_closed_connections_stop_counting_at_once(model):
    """A closed handler has no transport, as one not yet connected: it was counted as "accepted, not
    counted yet" for a second, and clients opening a connection per request got 503s with one open."""
    import http.client

    with http_server(model, limits=sg.Limits(max_connections=3)) as srv:
        statuses = []
        for _ in range(30):
            conn = http.client.HTTPConnection("127.0.0.1", srv.http.port, timeout=10)
            conn.request("GET", "/health")
            reply = conn.getresponse()
            reply.read()
            conn.close()
            statuses.append(reply.status)
        assert statuses == [200] * 30, statuses


def test_websocket_handshakes_in_progress_count_toward_the_limit(model):
    """A connection to the websocket port was counted only once its handshake was done: ones that
    never sent a request held a file descriptor each (for websockets' open_timeout), uncounted."""
    with http_server(model, limits=sg.Limits(max_connections=4)) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(4)]
        try:
            wait_until(lambda: srv.open_connections() == 4, timeout=5)
            with pytest.raises(websockets.InvalidStatus, match="503"):
                websockets.sync.client.connect(f"ws://127.0.0.1:{srv.port}/v1/stream",
                                               additional_headers={"Authorization": f"Bearer {TOKEN}"}).close()
            reply = post(srv, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
            assert reply.status == 503 and reply.error["code"] == "too_many_connections"
        finally:
            for sock in idle:
                sock.close()
        wait_until(lambda: srv.open_connections() == 0)
        with websockets.sync.client.connect(f"ws://127.0.0.1:{srv.port}/v1/stream",
                                            additional_headers={"Authorization": f"Bearer {TOKEN}"}):
            pass


def _sockets_open() -> int:
    fds = os.listdir("/proc/self/fd")
    return sum(1 for fd in fds if _readlink(f"/proc/self/fd/{fd}").startswith("socket:"))


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # (closed meanwhile)
        return ""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_a_flood_of_idle_connections_holds_a_bounded_number_of_descriptors(model):
    """300 idle connections to each port: the websocket port held every one until open_timeout (10 s),
    the HTTP port each refused one for BUSY_WAIT_S, uncounted: enough of them used up the process's
    file descriptors. Now the server holds at most the limit plus REFUSED_AT_ONCE on each port."""
    import subprocess
    import sys

    with http_server(model, limits=sg.Limits(max_connections=4)) as srv:
        before = _sockets_open()
        floods = [subprocess.Popen([sys.executable, "-c", BURST, str(port), "300"])
                  for port in (srv.port, srv.http.port)]
        try:
            time.sleep(2)  # (every socket of the floods accepted; an accept round's aborted ones closed)
            held = min(_sockets_open() - before for _ in range(20) if not time.sleep(0.05))
        finally:
            for flood in floods:
                flood.kill()
                flood.wait()
        assert 0 < held <= 4 + 2 * REFUSED_AT_ONCE, held
        # The flood's last sockets (the kernel's accept queue) still arrive after it ended, for a moment:
        # a request then may be refused, or reset (past the limit by REFUSED_AT_ONCE).
        wait_until(lambda: _completes(srv), timeout=15)


def _completes(srv) -> bool:
    try:
        return post(srv, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1}).status == 200
    except ConnectionError:
        return False


def test_a_refused_request_with_a_large_body_still_reads_its_503(model):
    """The 503 went out at the first bytes and the socket closed: the rest of a 4 MB body met a
    reset, and the client never read the answer."""
    import http.client

    with http_server(model, limits=sg.Limits(max_connections=1)) as srv:
        with socket.create_connection(("127.0.0.1", srv.http.port)):  # the one connection allowed
            wait_until(lambda: srv.open_connections() == 1)
            conn = http.client.HTTPConnection("127.0.0.1", srv.http.port, timeout=10)
            body = json.dumps({"model": MODEL, "prompt": "x" * 4_000_000}).encode()
            conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
            reply = conn.getresponse()
            assert reply.status == 503 and json.loads(reply.read())["error"]["code"] == "too_many_connections"
            conn.close()


def test_an_idle_http_connection_is_closed_after_the_idle_timeout(model):
    with http_server(model, limits=sg.Limits(idle_timeout=0.5)) as srv:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", srv.http.port), timeout=10) as sock:
            assert sock.recv(1) == b""  # closed by the server, having sent nothing
        assert time.monotonic() - started < 5
        wait_until(lambda: srv.open_connections() == 0, timeout=5)


def test_a_client_that_leaves_during_its_prefill_frees_its_request_at_once(model):
    with http_server(model, max_requests=1) as srv:
        body = json.dumps({"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 4}).encode()
        sock = socket.create_connection(("127.0.0.1", srv.http.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: any(0 < es.position < len(LONG_PROMPT) for es in list(srv.engine.sessions.values())))
        sock.close()
        left = time.monotonic()
        wait_until(lambda: srv.http.in_flight == 0 and not srv.engine.sessions)
        assert time.monotonic() - left < 5  # (the whole prefill takes far longer: the test above waits for it)
        reply = post(srv, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert reply.status == 200  # its request slot is free
        metrics = request(srv, "GET", "/metrics").body.decode()
        assert 'status="499"' in metrics


def test_a_request_caught_by_shutdown_before_its_prefill_is_answered_503(model):
    answer, entered = {}, threading.Event()
    with http_server(model, limits=sg.Limits(max_message_bytes=1 << 20, max_tokens=64)) as srv:
        take = srv.http.held.take

        async def slow_take(ids):  # the request is between the "stopping" check and its prefill
            entered.set()
            await anyio.sleep(0.5)
            return await take(ids)

        srv.http.held.take = slow_take

        def client():
            reply = post(srv, "/v1/completions", {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 4})
            answer["status"], answer["error"] = reply.status, reply.error

        thread = threading.Thread(target=client)
        thread.start()
        assert entered.wait(30)
    thread.join(60)
    assert answer["status"] == 503 and answer["error"]["code"] == "unavailable"
    assert not srv.engine.sessions


@pytest.mark.parametrize("head", [b"Content-Length: abc\r\n", b"X-Long: " + b"a" * 9000 + b"\r\n"])
def test_a_request_aiohttp_cannot_parse_is_one_log_line(model, head, caplog):
    with http_server(model) as srv:
        reply = raw_reply(srv.http.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
    assert reply.startswith(b"HTTP/1.") and b" 400 " in reply.split(b"\r\n", 1)[0]
    errors = [r for r in caplog.records if r.levelname == "ERROR" or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]
    assert [r for r in caplog.records if "Error handling request" in r.getMessage()]
