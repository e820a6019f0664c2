"""serve/waiter.py: blocking waits in one thread of the engine's own that wakes the event loop."""

import threading
import time

import anyio
import pytest

from streamgemma.serve import waiter as waiter_module
from streamgemma.serve.waiter import Waiter


def test_waits_run_in_one_thread_in_order_and_raise_what_they_raised():
    w = Waiter()
    seen = []

    def job(i):
        def run():
            time.sleep(0.01)
            seen.append((i, threading.current_thread().name))
        return run

    def broken():
        raise ValueError("no ids")

    async def main():
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(w.wait, job(i))
        with pytest.raises(ValueError, match="no ids"):
            await w.wait(broken)
        await w.wait(job(9))  # the thread survived the error

    anyio.run(main)
    assert [i for i, _ in seen] == [0, 1, 2, 3, 9]
    assert {name for _, name in seen} == {"streamgemma-waiter"}


def test_the_thread_ends_when_idle_and_the_next_wait_starts_another(monkeypatch):
    monkeypatch.setattr(waiter_module, "IDLE_S", 0.05)
    w = Waiter()

    def alive():
        return [t for t in threading.enumerate() if t.name == "streamgemma-waiter" and t.is_alive()]

    async def main():
        await w.wait(lambda: None)
        running = len(alive())
        await anyio.sleep(0.3)
        idle = len(alive())
        await w.wait(lambda: None)
        return running, idle

    before = len(alive())
    running, idle = anyio.run(main)
    assert running == before + 1 and idle == before


def test_a_cancelled_caller_still_waits_for_the_device():
    """The tick's books must match what the device consumed: the wait is shielded."""
    w = Waiter()
    finished = []

    def slow():
        time.sleep(0.2)
        finished.append(True)

    async def main():
        with anyio.move_on_after(0.02):
            await w.wait(slow)
        return bool(finished)

    assert anyio.run(main) is True
