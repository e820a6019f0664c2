"""Idle-session expiry: sessions nobody holds and nobody used for the
engine's `session_ttl` are closed (their snapshot deleted), and so are
stored snapshots not written for as long (sessions of earlier processes that
nobody resumed), so abandoned sessions do not fill the store forever. The
prefix cache's entries in the same store are left to the cache."""

from __future__ import annotations

import logging
import time

import anyio
import anyio.to_thread

from ..errors import StoreUnavailable
from .keys import is_reserved_key

log = logging.getLogger("streamgemma.engine")


async def expire(engine) -> int:
    """One pass over `engine` (an `Engine` with a session_ttl); how many
    sessions it deleted."""
    ttl = engine.session_ttl
    cutoff = time.monotonic() - ttl
    def unused(es) -> bool:
        return es.owner is None and es.idle and not es.closed and es.last_active < cutoff

    stale = [es for es in engine.sessions.values() if unused(es)]
    closed = 0
    for es in stale:
        if unused(es):  # (again: one may have been opened or given input while another was closed)
            try:
                await engine.close(es)
            except Exception as e:  # noqa: BLE001 - one the store cannot delete must not keep the others
                await _failed(engine, es.id, e)
                continue
            closed += 1
    stored = await anyio.to_thread.run_sync(engine.store.older_than, ttl)
    gone = 0
    for sid in stored:
        # (looked at per id: one may be resumed while others are deleted). A prefix-cache entry is
        # not a session: its cache bounds it, and a hit reads it without rewriting it.
        if engine.stored.in_use(sid) or is_reserved_key(sid):
            continue
        # In a fleet another worker may be using it (its snapshot is old, its journal is not): only a
        # session no worker holds is abandoned.
        if not await anyio.to_thread.run_sync(engine.store.claim_if_free, sid):
            continue
        if engine.stored.in_use(sid):  # (a resume began while the claim was asked for)
            continue
        try:
            await engine.stored.delete(sid)
        except Exception as e:  # noqa: BLE001
            await _failed(engine, sid, e)
            continue
        gone += 1
    count = closed + gone
    if count:
        log.info("expired %d sessions unused for %g s", count, ttl)
    engine.stats.expired_sessions += count
    return count


async def _failed(engine, session_id: str, error: Exception) -> None:
    """A session whose snapshot could not be deleted: not ours any more (its
    lease is released), and still old, so a later pass tries again."""
    log.warning("could not expire session %s (%s: %s); a later pass tries again",
                session_id[:8], type(error).__name__, error)
    await engine.offloader.release(session_id)


async def expire_periodically(engine) -> None:
    """`expire` every quarter of the ttl (at most every minute), until cancelled."""
    while True:
        await anyio.sleep(min(engine.session_ttl / 4, 60.0))
        try:
            await expire(engine)
        except StoreUnavailable as e:  # (its calls report the outage too: one line a pass)
            log.warning("expiring idle sessions failed: %s; the next pass tries again", e)
        except Exception:  # noqa: BLE001 - a failing store must not stop the scheduler
            log.exception("expiring idle sessions failed")
