"""`Waiter`: blocking waits (the device's sampled ids) run in one thread of
their own, which wakes the event loop when each is done.

`anyio.to_thread.run_sync` costs the event loop about twice as much CPU a
call (a worker-pool hand-off and its bookkeeping; ~105-125 us against ~60
us on a 2-core VM, bench/NOTES.md S12), and the serving tick makes one such
wait every step. The thread exits after `IDLE_S` without work and is started
again by the next wait, so an engine nobody uses holds no thread. Under
other async backends than asyncio the wait goes to anyio's worker threads.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable

import anyio
import anyio.to_thread

IDLE_S = 5.0


class Waiter:
    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    async def wait(self, blocking: Callable[[], object]) -> None:
        """Run `blocking()` in the waiter thread; returns when it has, raising
        what it raised. Not cancellable: the caller shields it anyway (its
        books must match what the device consumed)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # another backend than asyncio
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(blocking)
            return
        done = loop.create_future()
        with self._lock:
            self._jobs.put((blocking, loop, done))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="streamgemma-waiter", daemon=True)
                self._thread.start()
        with anyio.CancelScope(shield=True):
            await done

    def _run(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=IDLE_S)
            except queue.Empty:
                with self._lock:  # (a wait queued meanwhile is taken by this thread, not lost)
                    if self._jobs.empty():
                        self._thread = None
                        return
                continue
            blocking, loop, done = job
            error = None
            try:
                blocking()
            except BaseException as e:  # noqa: BLE001 - raised in the waiting task
                error = e
            try:
                loop.call_soon_threadsafe(_settle, done, error)
            except RuntimeError:  # the loop has closed: nobody waits
                pass


def _settle(done: asyncio.Future, error: BaseException | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)
