"""A real server with the HTTP API on 127.0.0.1 (the demo model), and a
raw HTTP client (http.client) for the tests of the OpenAI-compatible API."""

from __future__ import annotations

import contextlib
import http.client
import json
from collections.abc import Iterator

import streamgemma as sg
from streamgemma.serve.http import HttpConfig

TOKEN = "test-token"
MODEL = "demo"


@contextlib.contextmanager
def http_server(model: sg.Model, store: sg.SnapshotStore | None = None, token: str | None = TOKEN,
                limits: sg.Limits | None = None, **config) -> Iterator[sg.Server]:
    """A websocket + HTTP server on free ports, stopped (sessions saved) on exit."""
    engine = sg.Engine(model, max_active=4, store=store)
    server = sg.Server(engine, port=0, token=token, limits=limits or sg.Limits(),
                       http=HttpConfig(model_name=MODEL, **config))
    with sg.serve_in_thread(server):
        yield server


class Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> dict:
        return json.loads(self.body)

    def events(self) -> list:
        """The `data:` payloads of a server-sent event stream (JSON decoded, "[DONE]" as is)."""
        out = []
        for block in self.body.decode().split("\n\n"):
            if block.startswith("data: "):
                data = block[len("data: "):]
                out.append(data if data == "[DONE]" else json.loads(data))
        return out

    @property
    def error(self) -> dict:
        return self.json()["error"]


def request(server: sg.Server, method: str, path: str, body: object = None, token: str | None = TOKEN,
            raw: bytes | None = None, headers: dict | None = None) -> Response:
    """One request to the server's HTTP port; `raw` is sent as the body as is."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http.port, timeout=60)
    try:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=sent)
        reply = conn.getresponse()
        return Response(reply.status, reply.headers, reply.read())
    finally:
        conn.close()


def post(server: sg.Server, path: str, body: object, **kwargs) -> Response:
    return request(server, "POST", path, body, **kwargs)
