"""`daemon_portal`: an anyio blocking portal for `SyncClient`, its event
loop in a daemon thread."""

from __future__ import annotations

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
