"""Browser-compatible authentication (the token in Sec-WebSocket-Protocol)
and the web page's static files: a real server on 127.0.0.1, raw HTTP
handshakes for the odd cases, sg.Client for the supported ones."""

from __future__ import annotations

import base64
import logging
import socket
from pathlib import Path

import anyio
import pytest
import websockets
from textfixtures import saved_model_dir, text_model  # noqa: F401 (fixture)
from websockets.asyncio.client import connect

import streamgemma as sg
from streamgemma.serve import auth
from streamgemma.serve.engine import Engine
from streamgemma.serve.server import Server, serve_in_thread
from streamgemma.serve.static import CONTENT_SECURITY_POLICY

TOKEN = "s3cret-tök en"  # non-ASCII and a space: the encoding must carry any token
WEB = Path(__file__).resolve().parents[1] / "streamgemma" / "serve" / "web"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


GOOD = "bearer." + b64(TOKEN.encode())


@pytest.fixture(scope="module")
def server():
    srv = Server(Engine(text_model(), max_active=2), port=0, token=TOKEN)
    with serve_in_thread(srv):
        yield srv


def http(port: int, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lowercased names; repeated ones joined) and body of one raw HTTP exchange."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and data.startswith(b"HTTP/1.1 101"):
                break
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return int(lines[0].split(" ", 2)[1]), headers, body


def handshake(port: int, *lines: str) -> tuple[int, dict[str, str]]:
    head = ("GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            + "".join(line + "\r\n" for line in lines) + "\r\n")
    status, headers, _ = http(port, head.encode("utf-8"))
    return status, headers


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return http(port, f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())


# -- the token in Sec-WebSocket-Protocol ---------------------------------------------------
def test_the_subprotocol_encoding_round_trips_and_is_a_valid_subprotocol_name():
    offered = auth.bearer_subprotocols(TOKEN)
    assert offered == ["streamgemma.v1", GOOD]
    assert all(c.isalnum() or c in "-_." for c in offered[1])  # RFC 7230 token characters, no padding
    auth.check(TOKEN, [], offered)  # accepted
    with pytest.raises(ValueError):
        auth.bearer_subprotocols("")


def test_header_bytes_are_compared_however_websockets_decoded_them():
    raw = TOKEN.encode("utf-8")
    auth.check(TOKEN, ["Bearer " + raw.decode("latin-1")], [])  # websockets >= 14
    auth.check(TOKEN, ["Bearer " + raw.decode("ascii", "surrogateescape")], [])  # older versions
    for odd in ("Bearer \ud800", "Bearer " + TOKEN[:-1], "bearer", ""):
        with pytest.raises(auth.Refused) as refused:
            auth.check(TOKEN, [odd], [])
        assert refused.value.status == 401


def test_a_good_subprotocol_token_opens_and_only_streamgemma_v1_is_selected(server):
    status, headers = handshake(server.port, f"Sec-WebSocket-Protocol: streamgemma.v1, {GOOD}")
    assert status == 101
    assert headers["sec-websocket-protocol"] == "streamgemma.v1"  # the token is never echoed
    # Offered on two header lines, in the other order: the same.
    status, headers = handshake(server.port, f"Sec-WebSocket-Protocol: {GOOD}",
                                "Sec-WebSocket-Protocol: streamgemma.v1")
    assert status == 101 and headers["sec-websocket-protocol"] == "streamgemma.v1"


@pytest.mark.parametrize("offer", [
    "streamgemma.v1, bearer." + b64(b"wrong"),  # wrong token
    "streamgemma.v1, bearer." + b64(TOKEN.encode() + b"x"),  # one byte longer
    "streamgemma.v1, bearer.",  # empty
    "streamgemma.v1, bearer.not+base64url",  # not base64url
    "streamgemma.v1, bearer." + b64(TOKEN.encode()) + "==",  # padded
    "streamgemma.v1, bearer.a",  # impossible length
    "streamgemma.v1, bearer." + b64(b"\xff\xfe"),  # not UTF-8, not the token
    f"streamgemma.v1, {GOOD}, {GOOD}",  # duplicated
    f"streamgemma.v1, {GOOD}, bearer." + b64(b"other"),  # two tokens
    GOOD,  # without streamgemma.v1 a browser would fail the handshake anyway
    "streamgemma.v1",  # no credentials at all
    "chat, superchat",
])
def test_wrong_or_malformed_subprotocol_credentials_are_401(server, offer):
    status, headers = handshake(server.port, f"Sec-WebSocket-Protocol: {offer}")
    assert status == 401
    assert headers.get("www-authenticate") == "Bearer"


def test_both_mechanisms_must_both_be_right(server):
    port = server.port
    both = (f"Authorization: Bearer {TOKEN}", f"Sec-WebSocket-Protocol: streamgemma.v1, {GOOD}")
    assert handshake(port, *both)[0] == 101
    wrong_sub = "Sec-WebSocket-Protocol: streamgemma.v1, bearer." + b64(b"nope")
    assert handshake(port, f"Authorization: Bearer {TOKEN}", wrong_sub)[0] == 401
    assert handshake(port, "Authorization: Bearer nope", f"Sec-WebSocket-Protocol: streamgemma.v1, {GOOD}")[0] == 401
    assert handshake(port, "Authorization: Basic " + b64(TOKEN.encode()))[0] == 401  # not a bearer scheme
    assert handshake(port, "Authorization: Bearer")[0] == 401
    assert handshake(port, "Authorization: Bearer " + TOKEN)[0] == 101  # the header alone still works


def test_clients_that_offer_no_subprotocol_or_another_one_still_connect_with_the_header(server):
    # A server configured with a subprotocol must not refuse clients that offer none (websockets' default).
    status, headers = handshake(server.port, f"Authorization: Bearer {TOKEN}")
    assert status == 101 and "sec-websocket-protocol" not in headers
    status, headers = handshake(server.port, f"Authorization: Bearer {TOKEN}", "Sec-WebSocket-Protocol: chat")
    assert status == 101 and "sec-websocket-protocol" not in headers


def test_sg_client_sends_the_token_by_subprotocol(server):
    async def main():
        async with sg.Client(server.url, token=TOKEN, token_via="subprotocol") as client:
            session = await client.open(seed=1)
            assert await session.append("the quick brown fox") > 0
        with pytest.raises(sg.ServerError) as refused:
            async with sg.Client(server.url, token="wrong", token_via="subprotocol"):
                pass
        assert refused.value.code == "unauthorized" and "wrong bearer token" in str(refused.value)
        with pytest.raises(ValueError, match="token_via"):
            sg.Client(server.url, token=TOKEN, token_via="url")

    anyio.run(main, backend="asyncio")


def test_the_token_is_never_logged_even_at_debug_level(server, caplog):
    async def main():
        async with sg.Client(server.url, token=TOKEN, token_via="subprotocol") as client:
            await client.open()
        async with sg.Client(server.url, token=TOKEN) as client:
            await client.open()

    with caplog.at_level(logging.DEBUG):  # websockets writes every handshake header at debug level
        anyio.run(main, backend="asyncio")
        handshake(server.port, "Sec-WebSocket-Protocol: streamgemma.v1, bearer." + b64(b"guess"))
    text = "\n".join(r.getMessage() for r in caplog.records)  # the server's and sg.Client's
    assert "Sec-WebSocket-Protocol" in text and "Authorization" in text  # the headers were logged...
    for secret in (TOKEN, GOOD, b64(TOKEN.encode()), b64(b"guess")):
        assert secret not in text  # ...without their credentials
    assert auth.redact("Sec-WebSocket-Protocol", f"streamgemma.v1, {GOOD}") == "streamgemma.v1, bearer.[redacted]"


# -- the page ------------------------------------------------------------------------------
@pytest.mark.parametrize("path, content_type", [
    ("/", "text/html; charset=utf-8"),
    ("/index.html", "text/html; charset=utf-8"),
    ("/app.js", "text/javascript; charset=utf-8"),
    ("/wire.js", "text/javascript; charset=utf-8"),
    ("/style.css", "text/css; charset=utf-8"),
    ("/favicon.svg", "image/svg+xml"),
    ("/?resume=1", "text/html; charset=utf-8"),
])
def test_the_page_is_served_without_a_token_with_its_type_and_a_strict_policy(server, path, content_type):
    status, headers, body = get(server.port, path)
    assert status == 200
    assert headers["content-type"] == content_type
    assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY and "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
    assert headers["x-content-type-options"] == "nosniff"
    assert int(headers["content-length"]) == len(body)
    name = "index.html" if path.split("?")[0] in ("/", "/index.html") else path.lstrip("/")
    assert body == (WEB / name).read_bytes()


def test_the_page_references_nothing_outside_the_server():
    for path in WEB.iterdir():
        text = path.read_text(encoding="utf-8")
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, path
        assert "<script>" not in text and " style=" not in text and "onclick" not in text, path  # CSP forbids inline


@pytest.mark.parametrize("path", ["/../server.py", "/..%2fserver.py", "/web/app.js", "//etc/passwd",
                                  "/%2e%2e/auth.py", "/app.js/", "/APP.JS", "/.hidden", "/auth.py"])
def test_no_other_file_can_be_reached(server, path):
    status, _, body = get(server.port, path)
    assert status == 404 and b"import" not in body


def test_only_get_is_answered(server):
    status, _, _ = get(server.port, "/", method="POST")
    assert status == 405


def test_the_page_can_be_turned_off():
    srv = Server(Engine(text_model(), max_active=1), port=0, web_page=False)
    with serve_in_thread(srv):
        assert get(srv.port, "/")[0] == 404


def test_the_page_files_are_package_data():
    tomllib = pytest.importorskip("tomllib")
    import fnmatch

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = patterns["streamgemma"]
    for path in WEB.iterdir():
        relative = path.relative_to(root / "streamgemma").as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in shipped), f"{relative} is not package data"


def test_opened_reports_the_state_size(server):
    async def main():
        async with connect(server.url, subprotocols=auth.bearer_subprotocols(TOKEN)) as ws:
            assert ws.subprotocol == "streamgemma.v1"
            await ws.send('{"type": "open", "id": 1}')
            import json

            opened = json.loads(await ws.recv())
            assert opened["state_bytes"] == server.engine.model.pool.slot_bytes() > 0

    anyio.run(main, backend="asyncio")


def test_refusals_are_never_500(server):
    # Odd header bytes in either mechanism: 4xx.
    for line in ("Sec-WebSocket-Protocol: streamgemma.v1, bearer.\u00ff\u00fe", "Authorization: Bearer \u00ff",
                 "Sec-WebSocket-Protocol: ,,,", "Sec-WebSocket-Protocol: streamgemma.v1, BEARER." + b64(b"x")):
        assert 400 <= handshake(server.port, line)[0] < 500, line
    with pytest.raises(websockets.InvalidStatus):
        anyio.run(_connect_with_protocols, server.url, ["streamgemma.v1", "bearer." + b64(b"no")], backend="asyncio")


async def _connect_with_protocols(url: str, protocols: list[str]) -> None:
    async with connect(url, subprotocols=protocols):
        pass


def test_streamgemma_serve_shows_the_page_unless_told_not_to(saved_model_dir):  # noqa: F811
    from test_serve_cli import Running, free_port, serve_command

    for extra, status in (((), 200), (("--no-page",), 404)):
        port = free_port()
        running = Running(serve_command(saved_model_dir, "--port", str(port), *extra), port)
        running.wait_listening()
        assert get(port, "/")[0] == status
        rc, err = running.stop()
        assert rc == 0, err
        assert (f"web page: http://127.0.0.1:{port}/" in err) == (status == 200), err
