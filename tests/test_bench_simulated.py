"""`bench serve --simulate-step-ms`: the serving host measured against a
simulated in-order device instead of a GPU (streamgemma.bench.simulated)."""

from __future__ import annotations

import time

import pytest
from test_bench import run

from streamgemma.bench import main
from streamgemma.bench.simulated import SimulatedDevice, SimulatedIds


def test_the_device_runs_its_work_in_order_and_idles_only_when_given_none():
    device = SimulatedDevice()
    t0 = time.monotonic()
    first = device.run(0.05)
    second = device.run(0.02)  # queued behind the first, not beside it
    assert first >= t0 + 0.05 and abs(second - (first + 0.02)) < 1e-9
    time.sleep(0.1)  # idle: the next work starts when it is given
    third = device.run(0.01)
    assert third >= t0 + 0.11 and device.busy == 0.08


def test_ids_are_readable_only_when_the_device_reaches_them():
    class Ready:
        device_ids = "ids on the device"

        def ids(self):
            return [7]

    ids = SimulatedIds(Ready(), time.monotonic() + 0.05)
    t0 = time.perf_counter()
    assert ids.ids() == [7] and ids.device_ids == "ids on the device"
    assert time.perf_counter() - t0 >= 0.04


def test_serve_against_a_simulated_device(tmp_path):
    step_ms, tokens = 20.0, 30
    r = run("serve", "--simulate-step-ms", str(step_ms), "--clients", "4", "--tokens", str(tokens), "--prompt", "8",
            "--procs", "1", "--no-coalesce", tmp_path=tmp_path)
    assert r["generated"] == 4 * tokens
    assert r["decode_alone_tok_s"] == 4 / (step_ms / 1e3)
    # Every token after a stream's first waits for a decode step of the device: the clients can never
    # receive them faster than the device makes them (a little slack for delivery jitter).
    assert 0 < r["overall_tokens_per_s"] <= r["decode_alone_tok_s"] * tokens / (tokens - 1) * 1.1
    sim = r["simulated"]
    assert sim["step_ms"] == step_ms and sim["sample_ms"] == 0.2
    assert sim["device_busy_s"] >= (tokens - 1) * step_ms / 1e3  # at least one booked step a token
    assert r["sampling"] == {"temperature": 0.0}  # greedy unless told otherwise
    # The event loop's CPU time per decode call: some host work, and (one thread) no more than the
    # wall time of a call, which the simulated step makes at least step_ms.
    if hasattr(time, "pthread_getcpuclockid"):
        engine = r["engine"]
        wall_ms = 1e3 * engine["tokens_per_call"] / engine["engine_tokens_per_s"]
        assert wall_ms >= step_ms * 0.9
        assert 0 < engine["ms_per_call"]["loop_cpu_seconds"] <= wall_ms * 1.2


def test_simulation_takes_no_model_or_server():
    with pytest.raises(SystemExit, match="takes no --url, --model or --quantize"):
        main(["serve", "--simulate-step-ms", "4", "--url", "ws://127.0.0.1:1/v1/stream"])
    with pytest.raises(SystemExit, match="must be > 0"):
        main(["serve", "--simulate-step-ms", "0"])
