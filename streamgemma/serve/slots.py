"""Pool slots: at most `max_active` sessions of an engine hold one; to make
room, the `Scheduler` picks a session to suspend (`Offloader`). A session
`Engine.open` made holds its slot before it is registered (while the store
writes its first snapshot), so those are counted too: a request that finds
only such sessions in the slots waits for them, a tick leaves its input for
a later one. No more than `max_active` sessions ever hold a slot."""

from __future__ import annotations

import anyio

from .offload import Offloader
from .record import EngineError, SessionRecord
from .scheduler import Scheduler


class Slots:
    """The slots of the sessions in `sessions` (the engine's dict, by id).
    Methods but `unhold` are called with `model_lock` held."""

    def __init__(self, max_active: int, sessions: dict[str, SessionRecord], scheduler: Scheduler,
                 offloader: Offloader, model_lock: anyio.Lock):
        self.max_active = max_active
        self.sessions = sessions
        self.scheduler = scheduler
        self.offloader = offloader
        self.riding: set[str] = set()  # ids planned to ride along in the tick being run: suspended last
        self._opening = 0  # sessions made by `Engine.open`, not registered yet
        self._opened = anyio.Condition(model_lock)  # notified when one is registered or failed

    @property
    def active(self) -> int:
        """Sessions holding a slot now."""
        return sum(1 for s in self.sessions.values() if s.live is not None)

    async def make_room(self, wait: bool = False) -> bool:
        """Suspend sessions until a slot is free; True then. If sessions being
        opened hold the rest (they cannot be suspended yet): wait for them, or
        with wait False (a tick must not wait) return False. EngineError("capacity")
        if every session in a slot generates."""
        while len(live := [es for es in self.sessions.values() if es.live is not None]) + self._opening \
                >= self.max_active:
            try:
                es = self.scheduler.to_suspend(live, self.riding)
            except EngineError:
                if not self._opening:
                    raise
                if not wait:
                    return False
                await self._opened.wait()
                continue
            await self.suspend(es)
        return True

    async def ensure_live(self, es: SessionRecord, wait: bool = False) -> bool:
        """Give `es` a slot, restoring its state; False if none is free now (see
        `make_room`). EngineError("closed") if it was closed meanwhile."""
        while es.live is None:
            if es.closed:
                raise EngineError("closed", f"session {es.id!r} is closed")
            if not await self.make_room(wait):
                return False
            # (a wait for an open released the model lock: a tick may have restored it, or a close ended it)
            if es.live is None and not es.closed:
                es.live = await self.offloader.restore(es.id)
        return True

    async def suspend(self, es: SessionRecord) -> None:
        position = es.live.position
        await self.offloader.suspend(es.id, es.live)
        es.suspended_position, es.live = position, None

    def hold(self) -> None:
        """Count a session made (its slot taken) but not registered yet, until `unhold`."""
        self._opening += 1

    async def unhold(self) -> None:
        """The session `hold` counted is registered, or was closed. Call without `model_lock`."""
        with anyio.CancelScope(shield=True):
            async with self._opened:
                self._opening -= 1
                self._opened.notify_all()
