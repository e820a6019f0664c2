"""An engine in a fleet (a store that is `coordinated`, e.g. Redis): hands
sessions over when another worker asks, and drops the sessions whose lease
another worker took.

Hand-over: the session's generation is cancelled and its queued input
dropped (neither was acknowledged), its state stored (the journal already
holds everything acknowledged; the snapshot spares the next worker a
replay), then it leaves this engine and its lease is released, and the
asking worker's claim succeeds."""

from __future__ import annotations

import logging

import anyio
import anyio.to_thread

log = logging.getLogger("streamgemma.engine")

POLL_S = 0.5  # longest wait for a hand-over request before looking for lost leases


async def serve_fleet(engine) -> None:
    """Until cancelled: answer hand-over requests (each in its own task, so
    many hand over at once), drop lost sessions."""
    store = engine.store
    dropping: set[str] = set()  # (a drop may wait for a resume of its id: the loop goes on meanwhile)
    async with anyio.create_task_group() as tg:
        while True:
            try:
                session_id = await anyio.to_thread.run_sync(store.wait_handover, POLL_S, abandon_on_cancel=True)
                if session_id is not None:
                    tg.start_soon(_guarded, hand_over, engine, session_id)
                for lost in (set(store.lost()) | engine.journal.lost) - dropping:
                    dropping.add(lost)
                    tg.start_soon(_drop_once, engine, lost, dropping)
            except Exception as e:  # noqa: BLE001 - a store that is down must not stop the engine
                log.warning("fleet: %s: %s", type(e).__name__, e)
                await anyio.sleep(POLL_S)


async def _drop_once(engine, session_id: str, dropping: set[str]) -> None:
    try:
        await _guarded(drop, engine, session_id)
    finally:
        dropping.discard(session_id)


async def _guarded(fn, *args) -> None:
    try:
        await fn(*args)
    except Exception as e:  # noqa: BLE001 - one failed hand-over must not end the others
        log.warning("fleet: %s failed: %s: %s", fn.__name__, type(e).__name__, e)


async def hand_over(engine, session_id: str) -> None:
    """Store `session_id` and let it go, for the worker that asked (after a resume of it in progress here:
    released before that, the session would end up live on both workers)."""
    es = await engine.stored.resumed(session_id)
    if es is not None and not es.closed:
        await engine.detach(es)
        try:
            await engine.snapshot(es)
        except Exception as e:  # noqa: BLE001 - its journal holds what was acknowledged
            log.warning("hand-over of session %s...: the snapshot failed (%s); the journal is replayed", session_id[:8],
                        e)
        await engine.close(es, delete=False)
    await anyio.to_thread.run_sync(engine.store.release, session_id)
    log.info("session %s... handed over to another worker", session_id[:8])


async def drop(engine, session_id: str) -> None:
    """Another worker owns `session_id` now: forget it here, storing nothing; unless this worker has
    claimed it again since it was found lost (then its lease and session are the live ones)."""
    async with engine.stored.exclusive(session_id):
        if session_id not in engine.store.lost() and session_id not in engine.journal.lost:
            return
        engine.journal.lost.discard(session_id)
        es = engine.sessions.get(session_id)
        if es is not None:
            await engine.close(es, delete=False)
        await anyio.to_thread.run_sync(engine.store.release, session_id)
    log.warning("session %s... dropped: another worker took it over", session_id[:8])
