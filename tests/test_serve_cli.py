"""`streamgemma serve` as a new user meets it (issue #22, item 3): every
failure is one line without a traceback, the shutdown line says what
happened to the sessions, a server without a token beyond loopback warns,
connections and sessions are logged unless --quiet."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import anyio
import pytest
from conftest import free_port, subprocess_env
from textfixtures import saved_model_dir  # noqa: F401 (fixture)

import streamgemma as sg


def serve_command(model_dir, *args) -> list[str]:
    return [sys.executable, "-m", "streamgemma.cli", "serve", "--model", str(model_dir), "--device", "cpu", *args]


def one_line_failure(command: list[str], **env: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(**env), timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith("streamgemma serve: error: "), done.stderr
    return lines[0]


class Running:
    """A `streamgemma serve` subprocess; its stderr is collected as it runs."""

    def __init__(self, command: list[str], port: int):
        self.url = f"ws://127.0.0.1:{port}/v1/stream"
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=subprocess_env())
        self.port = port

    def wait_listening(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise AssertionError(f"the server exited: {self.proc.stderr.read()}") from None
                time.sleep(0.1)
        raise AssertionError("the server did not start")

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.proc.returncode, err


def open_session(url: str, text: str = "the quick brown fox") -> str:
    async def main():
        async with sg.Client(url) as client:
            session = await client.open()
            await session.append(text)
            return session.id

    return anyio.run(main, backend="asyncio")


def test_bad_options_fail_in_one_line_before_the_model_loads(tmp_path, saved_model_dir):
    line = one_line_failure(serve_command(saved_model_dir, "--port", "99999"))
    assert "--port must be in 0..65535" in line
    line = one_line_failure(serve_command(saved_model_dir, "--token", ""))
    assert "the token is empty" in line
    line = one_line_failure(serve_command(saved_model_dir), STREAMGEMMA_TOKEN="")
    assert "the token is empty" in line
    (tmp_path / "a-file").write_text("")
    line = one_line_failure(serve_command(saved_model_dir, "--store", str(tmp_path / "a-file")))
    assert "a-file" in line
    line = one_line_failure(serve_command(saved_model_dir, "--store", ""))  # (--store "$DIR", DIR unset)
    assert "--store is empty" in line  # (it served with sessions in memory only)
    line = one_line_failure(serve_command(saved_model_dir, "--max-active", "0"))
    assert "--max-active must be >= 1, got 0" in line  # (it named three flags)
    line = one_line_failure(serve_command(saved_model_dir, "--store", "http://foo"))
    assert "http:// is not supported" in line  # (it served from a directory named "http:/foo")
    line = one_line_failure(serve_command(saved_model_dir, "--prefix-cache-bytes", "-5"))
    assert "--prefix-cache-bytes" in line and "--http-port" in line  # (ignored: the HTTP API was off)


def test_a_port_in_use_is_one_line(saved_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_failure(serve_command(saved_model_dir, "--port", str(port), "--quiet"))
    assert line == f"streamgemma serve: error: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_logs_say_who_connected_and_what_happened_to_the_sessions(saved_model_dir):
    port = free_port()
    server = Running(serve_command(saved_model_dir, "--host", "0.0.0.0", "--port", str(port)), port)
    server.wait_listening()
    sid = open_session(server.url)
    rc, err = server.stop()
    assert rc == 0, err
    assert "authentication: off, and listening on 0.0.0.0 beyond this machine" in err
    assert re.search(r"connection 1 from 127\.0\.0\.1:\d+", err)
    assert f"session {sid[:8]}... opened at position 0" in err and sid not in err  # ids are capabilities
    assert "connection 1 closed (code 1000); 1 sessions detached" in err
    assert "shutdown: 1 sessions were kept in memory only (no store directory) and are lost at exit" in err
    assert "MemoryStore" not in err and "Traceback" not in err


def test_quiet_logs_only_warnings_and_where_it_listens(saved_model_dir):
    """--quiet hid the address too: with --port 0 nobody could learn the port."""
    port = free_port()
    server = Running(serve_command(saved_model_dir, "--port", str(port), "--quiet"), port)
    server.wait_listening()
    open_session(server.url)
    rc, err = server.stop()
    assert rc == 0 and err.splitlines() == [f"streamgemma serve: listening on ws://127.0.0.1:{port}/v1/stream",
                                            f"streamgemma serve: web page: http://127.0.0.1:{port}/ "
                                            "(docs/browser.md)"], err


def test_an_ipv6_address_is_written_in_brackets(saved_model_dir):
    if not socket.has_ipv6:
        pytest.skip("this machine has no IPv6")
    port, http_port = free_port(), free_port()
    server = Running(serve_command(saved_model_dir, "--host", "::1", "--port", str(port), "--http-port",
                                   str(http_port), "--quiet"), port)
    deadline = time.monotonic() + 60
    while server.proc.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("::1", http_port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    rc, err = server.stop()
    assert rc == 0, err
    assert f"listening on ws://[::1]:{port}/v1/stream" in err, err
    assert f"HTTP API on http://[::1]:{http_port}/v1" in err, err


def test_a_host_name_that_cannot_be_encoded_is_one_line(saved_model_dir):
    done = subprocess.run(serve_command(saved_model_dir, "--host", "localhost..local", "--port", "0", "-q"),
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr  # (an exception group's)
    assert done.stderr.splitlines()[-1] == \
        "streamgemma serve: error: cannot listen on localhost..local:0: not a valid host name"


def test_a_token_or_model_name_that_is_not_utf8_is_refused(saved_model_dir):
    """Accepted, and then every request failed (HTTP 500 / 404)."""
    for flag in ("--token", "--model-name"):
        extra = ["--http-port", "0"] if flag == "--model-name" else []
        command = [*serve_command(saved_model_dir, *extra), flag, b"t\xffk"]
        line = one_line_failure(command)
        assert "is not valid UTF-8 (at character 1)" in line and flag in line, line


def test_sessions_a_broken_store_could_not_save_fail_the_exit_status(saved_model_dir, tmp_path):
    store = tmp_path / "store"
    port = free_port()
    server = Running(serve_command(saved_model_dir, "--port", str(port), "--store", str(store)), port)
    server.wait_listening()
    sid = open_session(server.url)
    shutil.rmtree(store)
    store.write_text("the disk went away")  # every write now fails
    rc, err = server.stop()
    assert rc == 1, err
    assert "shutdown: 0 sessions saved to directory" in err and "1 could not be saved" in err
    assert err.strip().splitlines()[-1] == (f"streamgemma serve: error: 1 sessions could not be saved to directory "
                                            f"{store}: {sid}")
    assert "Traceback" not in err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX")
def test_a_fifo_in_the_store_does_not_hang_the_server(saved_model_dir, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    os.mkfifo(store / "planted-fifo.sgsnap")
    port = free_port()
    server = Running(serve_command(saved_model_dir, "--port", str(port), "--store", str(store)), port)
    server.wait_listening()

    async def main():
        async with sg.Client(server.url) as client:
            with pytest.raises(sg.ServerError) as refused:
                await client.open("planted-fifo")
            return refused.value.code

    assert anyio.run(main, backend="asyncio") == "snapshot_error"
    rc, err = server.stop()  # and SIGTERM still finishes
    assert rc == 0, err
