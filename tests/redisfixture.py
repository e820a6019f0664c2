"""A real `redis-server` for tests: started from the installed binary on a
free port with a temporary directory (append-only file, fsync always, so a
restart keeps what was written), stopped after. Without the binary the test
is skipped with the reason, unless STREAMGEMMA_REQUIRE_REDIS is set (CI):
then it fails."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import free_port


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        reason = ("redis-server is not installed (Debian/Ubuntu: apt-get install redis-server; or Valkey's "
                  "valkey-server as redis-server), so the Redis store's tests cannot run")
        if os.environ.get("STREAMGEMMA_REQUIRE_REDIS"):
            pytest.fail(reason + " and STREAMGEMMA_REQUIRE_REDIS is set")
        pytest.skip(reason)
    return binary


class RedisServer:
    def __init__(self, binary: str, directory: Path):
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
             "--logfile", str(self.directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited: {(self.directory / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def redis_server(tmp_path_factory):
    server = RedisServer(redis_binary(), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
