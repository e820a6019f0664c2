"""`daemon_portal`: an anyio blocking portal for `SyncClient`, its event
loop in a daemon thread; `Feed`: an async iterator read from a blocking thread."""

from __future__ import annotations

import contextlib
import queue
import threading

import anyio
import anyio.from_thread


def daemon_portal() -> tuple[anyio.from_thread.BlockingPortal, threading.Thread]:
    """A blocking portal whose event loop runs in a new daemon thread
    (`anyio.from_thread.start_blocking_portal` runs it in a thread that the
    interpreter waits for at exit)."""
    handed: list = []
    started = threading.Event()

    async def serve() -> None:
        async with anyio.from_thread.BlockingPortal() as portal:
            handed.append(portal)
            started.set()
            await portal.sleep_until_stopped()

    def run() -> None:
        try:
            anyio.run(serve, backend="asyncio")
        except BaseException as e:  # noqa: BLE001 - handed to the thread that waits for the portal
            handed.append(e)
            started.set()

    thread = threading.Thread(target=run, name="streamgemma-client", daemon=True)
    thread.start()
    started.wait()
    if isinstance(handed[0], BaseException):
        raise handed[0]
    return handed[0], thread


_END = object()


class Feed:
    """An async iterator read from a blocking thread: one task in the portal's loop reads it into a
    queue (`run`), the thread takes items (`get`), and `stop` (from the thread, through the portal)
    cancels that task wherever it is, its iterator's clean-up included. Every step of the thread's
    side may be interrupted (Ctrl-C) and `stop` still ends the task: one read handed to the loop per
    item left a read running that nothing could stop."""

    def __init__(self, items):
        self.items = items
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.finished = threading.Event()  # the task has ended, or will never touch the iterator
        self._scope: anyio.CancelScope | None = None
        self._stopped = False

    async def run(self) -> None:
        if self._stopped:  # (stopped before it started)
            return
        last: object = ConnectionError("the client was closed during the generation")  # (its loop cancelled us)
        try:
            with anyio.CancelScope() as self._scope:
                async with contextlib.aclosing(self.items):
                    async for item in self.items:
                        self.queue.put(item)
            last = _END
        except Exception as e:  # noqa: BLE001 - raised in the thread that reads
            last = e
        finally:
            self.queue.put(last)
            self.finished.set()

    def get(self):
        """The next item (blocking); StopIteration at the end; the iterator's error raised here."""
        item = self.queue.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, Exception):
            raise item
        return item

    def stop(self) -> None:
        """In the portal's loop: end the task (or keep it from starting)."""
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()
        else:
            self.finished.set()
