"""The Redis store against a real redis-server: snapshots and journals under
leases with fencing tokens (a paused owner that wakes up cannot write),
hand-over between two live engines, a dead owner's session recovered after
its lease expires, and a Redis restart in the middle of a generation (requests
fail with store_unavailable meanwhile; nothing is lost or corrupted)."""

from __future__ import annotations

import threading
import time

import anyio
import pytest
from redisfixture import redis_server  # noqa: F401 (fixture)
from textfixtures import text_model

import streamgemma as sg
from streamgemma.sampling.params import SamplingParams
from streamgemma.serve.engine import Engine
from streamgemma.session.journal import JournalRecord


def record(position: int) -> bytes:
    return JournalRecord(position, "step", (5,), b"PHX1" + bytes(16), None).encode()


def test_writes_need_the_lease_and_a_paused_owner_cannot_write(redis_server):  # noqa: F811
    a = sg.RedisSnapshotStore(redis_server.url, prefix="t", lease_ttl=0.3, claim_wait=2)
    b = sg.RedisSnapshotStore(redis_server.url, prefix="t", lease_ttl=0.3, claim_wait=2)
    with pytest.raises(sg.LeaseLost):
        a.put("s1", b"unclaimed")
    a.claim("s1")
    a.put("s1", b"v1")
    assert a.journal().append({"s1": [record(0), record(1)]}) == set()
    assert b.get("s1") == b"v1" and [r.position for r in b.journal().read("s1")] == [0, 1]
    assert a.list() == ["s1"] and "s1" in b
    a.close()  # a pauses: its renewer stops, its lease runs out, and nobody asks it to hand over
    started = time.monotonic()
    b.claim("s1")  # waits for the lease to expire
    assert 0.1 < time.monotonic() - started < 2
    # a wakes up and writes: every write is refused by the fence, nothing changes
    with pytest.raises(sg.LeaseLost):
        a.put("s1", b"stale")
    assert b.client.keys("t:s:s1:upload:*") == []  # the refused snapshot's upload is gone too
    assert a.journal().append({"s1": [record(2)]}) == {"s1"}
    with pytest.raises(sg.LeaseLost):
        a.delete("s1")
    assert b.get("s1") == b"v1" and [r.position for r in b.journal().read("s1")] == [0, 1]
    b.journal().compact("s1", 1)
    assert [r.position for r in b.journal().read("s1")] == [1]
    b.delete("s1")
    assert b.list() == [] and b.journal().read("s1") == []
    b.close()


def test_a_waiting_claim_hears_of_a_release_at_once(redis_server):  # noqa: F811
    a = sg.RedisSnapshotStore(redis_server.url, prefix="n")
    b = sg.RedisSnapshotStore(redis_server.url, prefix="n")
    a.claim("s1")
    a.put("s1", b"v" * 100_000)
    heard = threading.Event()
    stop = b.on_release("s1", heard.set)
    deadline = time.monotonic() + 5
    while b.client.pubsub_numsub("n:released")[0][1] < 2:  # both listeners subscribed
        assert time.monotonic() < deadline
        time.sleep(0.01)
    a.release("s1")
    assert heard.wait(2)
    stop()
    b.claim("s1")
    assert b.get("s1") == b"v" * 100_000 and b.client.persist(b.key("s1", "snap")) == 0  # no time-to-live
    a.close()
    b.close()


def engine_on(url: str, **kw) -> Engine:
    return Engine(text_model(), max_active=4, store=sg.RedisSnapshotStore(url, prefix="e", **kw))


async def tokens(engine: Engine, es, n: int) -> list[int]:
    stream = await engine.generate(es, SamplingParams(max_tokens=n, stop_token_ids=()))
    return [t.id async for t in stream]


def test_a_live_session_is_handed_over_and_a_dead_owners_recovered(redis_server):  # noqa: F811
    """Worker A holds a session; worker B opens it: A hands it over (the
    continuation is the one A would have produced). Then B "dies" (stops
    without releasing); C recovers the session once B's lease expired."""
    reference = text_model().session(seed=3)
    reference.feed("the quick brown fox")
    expected = [t.id for t in reference.generate(max_tokens=30, stop_token_ids=[])]

    async def main():
        a, b = engine_on(redis_server.url), engine_on(redis_server.url, lease_ttl=0.5)
        b_alive = anyio.CancelScope()

        async def run_b():
            with b_alive:
                await b.run()

        async with anyio.create_task_group() as tg:
            tg.start_soon(a.run)
            tg.start_soon(run_b)
            es = await a.open(seed=3)
            engine_appended = await a.consumed(a.append(es, "the quick brown fox"))
            first = await tokens(a, es, 10)
            started = time.monotonic()
            moved = await b.resume(es.id)
            handover_s = time.monotonic() - started
            assert es.closed and es.id not in a.sessions  # A let it go
            assert moved.position == engine_appended + 10
            # The hand-over's snapshot compacted the journal before the release (hand-overs back and
            # forth would otherwise grow it without end).
            assert [r for r in b.store.journal().read(es.id) if r.end <= moved.position and r.kind != "rng"] == []
            second = await tokens(b, moved, 10)
            # B dies: its engine stops, no shutdown, its lease is neither released nor renewed
            b_alive.cancel()
            b.store.close()
            c = engine_on(redis_server.url)
            tg.start_soon(c.run)
            started = time.monotonic()
            recovered = await c.resume(es.id)
            recovery_s = time.monotonic() - started
            assert recovered.position == engine_appended + 20
            third = await tokens(c, recovered, 10)
            tg.cancel_scope.cancel()
        a.store.close()
        c.store.close()
        return first + second + third, handover_s, recovery_s

    got, handover_s, recovery_s = anyio.run(main)
    assert got == expected
    assert handover_s < 2 and 0.2 < recovery_s < 3


def test_a_redis_restart_mid_generation_loses_and_corrupts_nothing(redis_server):  # noqa: F811
    """Redis stops after 10 tokens: the generation waits (its tokens are not
    durable), requests that need the store fail with StoreUnavailable (the
    server's code store_unavailable); Redis comes back (its append-only
    file kept everything), the generation completes, and another worker
    takes the session over with the same state: the next tokens match a
    session that never saw a failure."""
    reference = text_model().session(seed=9)
    reference.feed("hello world stream")
    expected = [t.id for t in reference.generate(max_tokens=70, stop_token_ids=[])]

    async def main():
        engine = engine_on(redis_server.url, lease_ttl=5)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            es = await engine.open(seed=9)
            await engine.consumed(engine.append(es, "hello world stream"))
            stream = await engine.generate(es, SamplingParams(max_tokens=60, stop_token_ids=()))
            got = []
            async for token in stream:
                got.append(token.id)
                if len(got) == 10:
                    redis_server.stop()
                    with pytest.raises(sg.StoreUnavailable):
                        await engine.resume("no-such-session-while-down")
                    with pytest.raises(sg.StoreUnavailable):
                        await engine.open()
                    assert len(engine.sessions) == 1  # the failed open kept nothing
                    redis_server.start()
            assert stream.done.position == es.position
            other = engine_on(redis_server.url, lease_ttl=5)
            tg.start_soon(other.run)
            position = es.position
            moved = await other.resume(es.id)  # handed over by `engine`
            assert moved.position == position
            got += await tokens(other, moved, 10)
            tg.cancel_scope.cancel()
        engine.store.close()
        other.store.close()
        return got, engine.stats.journal_failures

    got, failures = anyio.run(main)
    assert got == expected
    assert failures >= 1  # the outage was seen, and waited out


def test_expiry_on_one_worker_leaves_a_session_another_is_using(redis_server):  # noqa: F811
    """Worker B uses a session whose last snapshot is older than the ttl (its journal is fresh); A's
    expiry must not claim and delete it. One nobody holds and nobody used for a ttl is still expired,
    leaving no key behind."""
    model = text_model()

    async def main():
        a = Engine(model, max_active=2, store=sg.RedisSnapshotStore(redis_server.url, prefix="x"), session_ttl=0.5)
        b = Engine(model, max_active=2, store=sg.RedisSnapshotStore(redis_server.url, prefix="x"), session_ttl=0.5)
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.run)
            es = await b.open(seed=1)
            es.owner = object()  # a client holds it: B's own expiry leaves it alone
            await b.consumed(b.append(es, "hello there"))
            await anyio.sleep(0.7)  # its snapshot is older than the ttl now
            assert es.id in a.store.older_than(0.5)
            assert await a.expire() == 0
            await b.consumed(b.append(es, " more"))  # B goes on using it
            assert not es.closed and es.id in b.store
            await b.close(es, delete=False)
            b.store.release(es.id)  # (as at B's shutdown) nobody holds it now
            await anyio.sleep(0.6)  # (the journal append counted as a write: unused for a ttl again)
            gone = await a.expire()  # (unless B's periodic expiry took it first)
            assert gone + b.stats.expired_sessions == 1 and es.id not in a.store
            tg.cancel_scope.cancel()
        keys = sorted(k.decode() for k in a.store.client.keys(f"x:s:{es.id}:*"))
        a.store.close()
        b.store.close()
        return keys

    assert anyio.run(main) == []


def test_a_lease_that_expired_while_redis_was_down_is_taken_again_if_nobody_claimed_it(redis_server):  # noqa: F811
    """A Redis outage longer than the lease's ttl expired every lease inside Redis; once it came back, every
    renewal and journal append was refused as if another worker had taken the session, and each worker
    dropped all its sessions. Only a claim by another worker since (the session's `owner`) means lost."""
    a = sg.RedisSnapshotStore(redis_server.url, prefix="x", lease_ttl=5, claim_wait=2)
    b = sg.RedisSnapshotStore(redis_server.url, prefix="x", lease_ttl=5, claim_wait=2)
    for sid in ("s1", "s2", "s3"):
        a.claim(sid)
        a.put(sid, b"v1")
    a.client.delete("x:s:s1:lease", "x:s:s2:lease", "x:s:s3:lease")  # expired while Redis was down
    b.claim("s3")  # s3 was taken by another worker meanwhile (then released: its lease is gone again)
    b.release("s3")
    a.renew_once()
    assert a.lost() == ["s3"] and a.client.pttl("x:s:s1:lease") > 0  # (s1 and s2: taken again)
    a.client.delete("x:s:s1:lease", "x:s:s2:lease")
    assert a.journal().append({"s1": [record(0)]}) == set()  # the append takes it again too
    a.put("s2", b"v2")  # and a snapshot
    assert b.get("s2") == b"v2" and [r.position for r in b.journal().read("s1")] == [0]
    with pytest.raises(sg.LeaseLost):
        a.put("s3", b"stale")
    a.release("s1")
    assert not a.client.exists("x:s:s1:owner")  # released: no one takes it back from the store
    a.claim("s1")
    a.client.delete("x:s:s1:lease")  # expired before the release ran
    a.release("s1")
    assert not a.client.exists("x:s:s1:owner")  # (it stayed: a stale write took the lease back)
    a.delete("s2")
    assert not a.client.keys("x:s:s2:*")
    a.close()
    b.close()


def documented_acl_rules() -> list[str]:
    """The rules of docs/deploy.md's `user streamgemma ...` line, its password replaced."""
    from pathlib import Path

    lines = [line for line in (Path(__file__).parents[1] / "docs" / "deploy.md").read_text().splitlines()
             if line.startswith("user streamgemma ")]
    assert len(lines) == 1, lines
    return [">pw" if rule.startswith(">") else rule for rule in lines[0].split()[2:]]


def test_the_fleet_works_as_the_acl_user_docs_deploy_md_gives(redis_server):  # noqa: F811
    """A worker that connects as the documented ACL user: claims, journals, a hand-over between two
    workers (its request list, the release notification it waits on), expiry's index, close."""
    import redis

    admin = redis.Redis.from_url(redis_server.url)
    admin.acl_setuser("streamgemma", reset=True)
    admin.execute_command("ACL", "SETUSER", "streamgemma", *documented_acl_rules())
    url = redis_server.url.replace("redis://", "redis://streamgemma:pw@")
    admin.close()

    async def main():
        a, b = (Engine(text_model(), max_active=2, store=sg.RedisSnapshotStore(url), session_ttl=3600)
                for _ in range(2))
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.run)
            tg.start_soon(b.run)
            es = await a.open(seed=3)
            await a.consumed(a.append(es, "the quick brown fox"))
            first = await tokens(a, es, 5)
            with anyio.fail_after(10):
                moved = await b.resume(es.id)  # A hands it over
            second = await tokens(b, moved, 5)
            b.store.older_than(0), b.store.list()  # expiry's queries (each raises if a permission is missing)
            await b.close(moved)
            tg.cancel_scope.cancel()
        a.store.close()
        b.store.close()
        return first, second

    first, second = anyio.run(main)
    assert len(first) == len(second) == 5
