"""`streamgemma serve --http-port`: the OpenAI HTTP API beside the websocket,
in the same process, named after the model's directory."""

from __future__ import annotations

import json
import urllib.request

from test_serve_cli import Running, free_port, one_line_failure, serve_command
from textfixtures import saved_model_dir  # noqa: F401 (fixture)


def get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as reply:
        return json.loads(reply.read())


def test_serve_with_the_http_api(saved_model_dir):
    port, http_port = free_port(), free_port()
    server = Running(serve_command(saved_model_dir, "--port", str(port), "--http-port", str(http_port)), http_port)
    server.wait_listening()
    try:
        assert get(http_port, "/health")["status"] == "ok"
        assert [m["id"] for m in get(http_port, "/v1/models")["data"]] == ["tiny-model"]
        body = json.dumps({"model": "tiny-model", "prompt": "the quick brown fox", "max_tokens": 3}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions", data=body)
        with urllib.request.urlopen(request, timeout=60) as reply:
            assert json.loads(reply.read())["usage"]["completion_tokens"] == 3
    finally:
        rc, err = server.stop()
    assert rc == 0, err
    assert f"HTTP API on http://127.0.0.1:{http_port}/v1 (model 'tiny-model')" in err


def test_bad_http_options_fail_in_one_line(saved_model_dir):
    line = one_line_failure(serve_command(saved_model_dir, "--http-port", "70000"))
    assert "--http-port must be in 0..65535" in line
    line = one_line_failure(serve_command(saved_model_dir, "--port", "9000", "--http-port", "9000"))
    assert "differ from --port" in line
    line = one_line_failure(serve_command(saved_model_dir, "--http-port", "0", "--prefix-cache-sessions", "-1"))
    assert "--prefix-cache-sessions must be >= 0" in line


def test_an_http_port_in_use_is_one_line(saved_model_dir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_failure(serve_command(saved_model_dir, "--port", "0", "--http-port", str(port), "--quiet"))
    assert line == (f"streamgemma serve: error: cannot listen on 127.0.0.1:{port} (HTTP API): "
                    "Address already in use")
