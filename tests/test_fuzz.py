"""Fuzzing the protocol (issue #23): seeded random and mutated frames never
get `internal`, never close a connection with 1011, and handshakes never get
HTTP 500; the parser never raises anything but ProtocolError. A longer run:
`streamgemma bench fuzz`."""

from __future__ import annotations

import random

from textfixtures import text_model

from streamgemma.bench.fuzz import FrameMaker, failures, fuzz_server
from streamgemma.serve.engine import Engine
from streamgemma.serve.protocol import ProtocolError, parse_request
from streamgemma.serve.server import Limits, Server, serve_in_thread


def test_the_parser_raises_nothing_but_protocol_errors():
    maker = FrameMaker(random.Random(20231), vocab=512)
    maker.sessions = ["abcdefghijklmnopqrstuv", "session-2"]
    codes = {}
    for frame in maker.frames(50_000):
        try:
            parse_request(frame, 4, 4)
            code = "ok"
        except ProtocolError as e:
            code = e.code
        codes[code] = codes.get(code, 0) + 1
    assert set(codes) <= {"ok", "bad_json", "bad_message", "unknown_type", "invalid", "limit"}
    assert codes["ok"] > 10_000 and codes["invalid"] > 100  # valid frames and range errors both exercised


def test_ten_thousand_fuzzed_frames_and_handshakes_break_nothing():
    limits = Limits(max_tokens=4, default_max_tokens=4, messages_per_second=1e9, bytes_per_second=1e12)
    server = Server(Engine(text_model(), max_active=8), port=0, token="t", limits=limits)
    with serve_in_thread(server):
        result = fuzz_server(server, frames=10_000, connections=5, handshakes=300, seed=7)
    assert failures(result) == []
    events = result["events"]
    assert result["frames"] == 10_000
    # The fuzz reached the engine, not just the parser.
    assert min(events.get(kind, 0) for kind in ("opened", "appended", "done", "snapshot", "closed")) > 20, events
    assert sum(result["handshakes"].values()) == 300 and "101" in result["handshakes"]
