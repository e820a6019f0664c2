"""The fleet and the Redis store at their edges: expiry after a worker's crash, a hand-over asked for
during a resume, unknown ids, a full Redis, a lease_ttl Redis cannot express (each found by a review)."""

from __future__ import annotations

import time

import anyio
import pytest
from redisfixture import redis_server  # noqa: F401 (fixture)
from textfixtures import text_model

import streamgemma as sg
from streamgemma.serve.engine import Engine
from streamgemma.serve.record import EngineError


async def _stored_session(engine: Engine) -> str:
    """The id of a session `engine` (running) opened, fed, snapshotted and closed, its store copy and lease kept."""
    es = await engine.open(seed=1)
    await engine.consumed(engine.append(es, "hello"))
    await engine.snapshot(es)
    await engine.close(es, delete=False)
    return es.id


def test_resuming_unknown_ids_leaves_no_redis_keys(redis_server):  # noqa: F811
    """A client may `open` any id; one that does not exist must leave nothing behind in Redis."""
    async def main():
        engine = Engine(text_model(), max_active=2, store=sg.RedisSnapshotStore(redis_server.url, prefix="h"))
        for i in range(50):
            with pytest.raises(EngineError) as info:
                await engine.resume(f"no-such-session-{i}")
            assert info.value.code == "unknown_session"
        keys = sorted(k.decode() for k in engine.store.client.keys("h:s:*"))  # per-session keys
        engine.store.close()
        return keys

    keys = anyio.run(main)
    assert keys == [], f"{len(keys)} keys left, e.g. {keys[:3]}"


def test_expiry_keeps_a_session_a_crashed_worker_used_moments_ago(redis_server):  # noqa: F811
    """Worker A uses a session continuously (appends acknowledged every 0.2 s) for longer than
    the ttl, then dies (SIGKILL: no shutdown, leases neither released nor renewed). Worker B's
    expiry must not delete it: it was used well within the ttl. Docs: "worker killed ... nothing
    acknowledged lost"."""
    model = text_model()

    async def main():
        a = Engine(model, max_active=2, store=sg.RedisSnapshotStore(redis_server.url, prefix="c", lease_ttl=0.3),
                   session_ttl=1.0)
        b = Engine(model, max_active=2, store=sg.RedisSnapshotStore(redis_server.url, prefix="c", lease_ttl=0.3),
                   session_ttl=1.0)
        a_alive = anyio.CancelScope()

        async def run_a():
            with a_alive:
                await a.run()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_a)
            es = await a.open(seed=1)
            es.owner = object()  # a client holds it
            for _ in range(8):  # 1.6 s of use: its only snapshot (at open) is older than the ttl now
                position = await a.consumed(a.append(es, " hello"))
                await anyio.sleep(0.2)
            last_ack = time.monotonic()
            a_alive.cancel()  # A dies
            a.store.close()
            await anyio.sleep(0.5)  # its lease expires
            expired = await b.expire()
            assert time.monotonic() - last_ack < 1.0  # the session was used less than a ttl ago
            try:
                moved = await b.resume(es.id)
                got = moved.position
            except EngineError as e:
                got = e.code
            tg.cancel_scope.cancel()
        b.store.close()
        return expired, got, position

    expired, got, position = anyio.run(main)
    assert (expired, got) == (0, position)


def test_a_tiny_lease_ttl_is_refused_up_front_not_by_redis(redis_server):  # noqa: F811
    """lease_ttl=0.0004 passes the `> 0` check, but becomes PX 0 in the claim script: Redis
    answers 'invalid expire time' as a raw redis ResponseError on every claim."""
    try:
        store = sg.RedisSnapshotStore(redis_server.url, prefix="t", lease_ttl=0.0004)
    except ValueError:
        return  # refused at construction: fine
    try:
        store.claim("s1")
    except sg.StoreError:
        pass  # a documented error would be acceptable
    finally:
        store.close()


def test_a_full_redis_is_a_store_error_not_a_raw_redis_error(redis_server):  # noqa: F811
    """docs/deploy.md recommends maxmemory-policy noeviction ('a full Redis refuses writes
    instead'). A full Redis answers every write with an OOM error: it must come out of the store
    as a StoreError (a request error code), not as redis.exceptions.ResponseError ('internal')."""
    import redis as redis_py

    async def main():
        engine = Engine(text_model(), max_active=2, store=sg.RedisSnapshotStore(redis_server.url, prefix="m"))
        engine.store.client.config_set("maxmemory-policy", "noeviction")
        engine.store.client.config_set("maxmemory", 1)  # full
        try:
            await engine.open()
        except sg.StoreError:
            return None
        except redis_py.RedisError as e:
            return e
        finally:
            engine.store.client.config_set("maxmemory", 0)
            engine.store.close()

    raw = anyio.run(main)
    assert raw is None, f"raw redis error: {type(raw).__module__}.{type(raw).__name__}: {raw}"


def test_a_handover_request_during_a_resume_does_not_leave_the_session_on_two_workers(redis_server):  # noqa: F811
    """Worker A is resuming session S (claimed, reading its snapshot) when worker B asks for it.
    A's hand-over finds S not (yet) in `engine.sessions` and releases the lease anyway; B takes
    it; then A's resume completes and A answers `opened` too: S is live on two workers, and the
    next input A acknowledges to its client... is refused."""
    model = text_model()

    async def main():
        maker = Engine(model, max_active=2, store=sg.RedisSnapshotStore(redis_server.url, prefix="r"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(maker.run)
            sid = await _stored_session(maker)
            maker.store.release(sid)
            tg.cancel_scope.cancel()
        maker.store.close()

        a = Engine(model, max_active=2, store=sg.RedisSnapshotStore(redis_server.url, prefix="r"))
        b_store = sg.RedisSnapshotStore(redis_server.url, prefix="r", claim_wait=5)
        reading, b_done = anyio.Event(), anyio.Event()
        real_get = a.store.get
        token = anyio.lowlevel.current_token()

        def slow_get(session_id):  # A has claimed S and is reading its snapshot while B asks for it
            anyio.from_thread.run_sync(reading.set, token=token)
            time.sleep(0.5)
            return real_get(session_id)

        a.store.get = slow_get
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.run)

            async def b_claims():
                await reading.wait()
                await anyio.to_thread.run_sync(b_store.claim, sid)  # asks A, which hands S over
                b_done.set()

            tg.start_soon(b_claims)
            with anyio.fail_after(10):
                try:
                    es = await a.resume(sid)
                except (EngineError, sg.StoreError):
                    es = None  # refusing the resume would be fine
                await b_done.wait()  # (B has it now: A handed it over once its resume ended)
            on_a = es is not None and sid in a.sessions and not es.closed
            on_b = sid in b_store.held()
            outcome = None
            if on_a:
                try:
                    await a.consumed(a.append(es, " more"))
                    outcome = "appended"
                except Exception as e:  # noqa: BLE001
                    outcome = f"{type(e).__name__}: {e}"
            tg.cancel_scope.cancel()
        a.store.close()
        b_store.close()
        return on_a, on_b, outcome

    on_a, on_b, outcome = anyio.run(main)
    assert not (on_a and on_b), f"live on both workers; A's next append: {outcome}"


def test_a_directory_store_counts_a_fresh_journal_as_a_use(tmp_path):
    """As the Redis index: a session whose snapshot is old but whose journal was just written is not old."""
    import os

    store = sg.DirectorySnapshotStore(tmp_path)
    model = text_model()
    s = model.session()
    s.feed([2, 5, 7])
    store.put("abc", s.snapshot())
    old = time.time() - 100
    os.utime(store.path("abc"), (old, old))
    assert store.older_than(50) == ["abc"]
    store.journal().append({"abc": [b"x"]})
    assert store.older_than(50) == []
    os.utime(store.journal().path("abc"), (old, old))
    assert store.older_than(50) == ["abc"]


def test_a_refusal_inside_a_script_before_redis_7_is_store_unavailable_too(redis_server):  # noqa: F811
    """Before Redis 7, OOM / READONLY inside a Lua script come back as a plain ResponseError naming them."""
    import redis as redis_py

    store = sg.RedisSnapshotStore(redis_server.url, prefix="o")
    try:
        for text in ("ERR Error running script (call to f_1): @user_script:10: -OOM command not allowed",
                     "ERR Error running script: @user_script:3: -READONLY You can't write against a replica."):
            with pytest.raises(sg.StoreUnavailable):
                with store.unavailable("claim"):
                    raise redis_py.ResponseError(text)
        with pytest.raises(redis_py.ResponseError):  # anything else is not the store being unavailable
            with store.unavailable("claim"):
                raise redis_py.ResponseError("ERR wrong number of arguments")
    finally:
        store.close()


def test_deleting_a_session_removes_the_fence_key_older_versions_left(redis_server):  # noqa: F811
    store = sg.RedisSnapshotStore(redis_server.url, prefix="l")
    try:
        s = text_model().session()
        s.feed([2, 5, 7])
        store.claim("old")
        store.put("old", s.snapshot())
        store.client.set("l:s:old:fence", 7)  # (written by a version with one fence counter per session)
        store.delete("old")
        assert store.client.keys("l:s:old:*") == []
    finally:
        store.close()


def test_a_drop_of_a_session_claimed_again_since_it_was_lost_leaves_it_alone(redis_server):  # noqa: F811
    """The fleet loop drops the ids it found lost one after another, awaiting each; one this worker claimed again
    meanwhile (a client resumed it here) was closed and its fresh lease released: the session was then live
    nowhere, or, taken by another worker, its acknowledged input here was lost."""
    from streamgemma.serve.fleet import drop

    model = text_model()

    async def main():
        a = Engine(model, max_active=2, store=sg.RedisSnapshotStore(redis_server.url, prefix="d"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.run)
            es = await a.open(seed=1)  # claimed: held, not lost
            await a.consumed(a.append(es, "hello"))
            await drop(a, es.id)  # as the loop would, from a list made before the claim
            live = es.id in a.sessions and not es.closed
            held = es.id in a.store.held()
            await a.consumed(a.append(es, " more"))
            tg.cancel_scope.cancel()
        a.store.close()
        return live, held

    live, held = anyio.run(main)
    assert live and held


def test_a_resume_that_fails_gives_its_lease_back(redis_server):  # noqa: F811
    """A resume claims the session's lease, then reads it; a damaged snapshot (or a journal that cannot be read,
    or a cancelled resume) kept the lease held and renewed for as long as the worker ran, the session open
    nowhere."""
    model = text_model()

    async def main():
        a = Engine(model, max_active=2, store=sg.RedisSnapshotStore(redis_server.url, prefix="f"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.run)
            sid = await _stored_session(a)
            a.store.put(sid, b"not a snapshot")  # (put needs the lease: written, then given back)
            a.store.release(sid)
            with pytest.raises(EngineError, match="cannot be restored"):
                await a.resume(sid)
            held = sid in a.store.held()
            tg.cancel_scope.cancel()
        a.store.close()
        return held

    assert not anyio.run(main)


def test_the_fleet_loop_answers_hand_overs_while_a_drop_waits_for_a_resume():
    """A drop waits for a resume of its id in progress (a claim may wait claim_wait for the holder); awaited in
    the fleet loop, it kept the loop from reading other workers' hand-over requests all that time."""
    import types

    from streamgemma.serve import fleet
    from streamgemma.serve.stored import StoredSessions

    answered = []

    class Store:  # S was lost earlier; another worker asks for T once the loop has begun to drop S
        polls = 0

        def wait_handover(self, timeout):
            time.sleep(0.01)
            self.polls += 1
            return "T" if self.polls == 2 else None

        def lost(self):
            return ["S"]

        def release(self, session_id):
            answered.append((session_id, time.monotonic()))

    async def main():
        engine = types.SimpleNamespace(store=Store(), journal=types.SimpleNamespace(lost=set()), sessions={})
        engine.stored = StoredSessions(engine.sessions, None, engine.journal)
        reading = anyio.Event()

        async def slow_read(session_id):  # a resume of S whose claim waits for its holder
            reading.set()
            await anyio.sleep(3)
            raise RuntimeError("held")

        async def resume():
            with pytest.raises(RuntimeError):
                await engine.stored.resume("S", slow_read)

        async with anyio.create_task_group() as tg:
            tg.start_soon(resume)
            await reading.wait()
            tg.start_soon(fleet.serve_fleet, engine)
            with anyio.fail_after(2):  # (3 s and more before)
                while not any(sid == "T" for sid, _ in answered):
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()

    anyio.run(main)
