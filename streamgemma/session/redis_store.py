"""`RedisSnapshotStore`: snapshots, their journals and session ownership in
Redis (or Valkey), shared by a fleet of workers.

Keys, under a prefix (default "streamgemma"): `P:index` (sorted set: id ->
time of its last snapshot or journal write), `P:fence` (the fencing
counter), and per session `P:s:ID:snap` (the snapshot), `P:s:ID:journal` (a
list of journal records), `P:s:ID:lease` ("WORKER:FENCE", with a
time-to-live), `P:s:ID:owner` (the lease's value from its claim to its
release, without one: a lease that expired while Redis was down is taken
again by its holder when nobody claimed the session since) and, while a
snapshot is being stored,
`P:s:ID:upload:WORKER:FENCE`. Releases are
published on the channel `P:released` (the session id).

Ownership: a worker `claim`s a session before it reads or writes it; the
claim takes the lease (if free or expired) with the next fencing token, and
a background thread renews every lease the worker holds. Every write (a
snapshot, journal records, a compaction, a delete) runs in a Lua script that
first checks that the lease still holds this worker's value, so a worker
that was paused past its lease (and whose session another worker took) has
its writes refused (`LeaseLost`), never applied. A claim of a session another
live worker holds pushes a hand-over request to that worker's list
`P:handover:WORKER` and waits for the lease to be released (`on_release`
hears of it at once) or to expire (a dead owner: polling finds it); the
owner's engine suspends the session and releases it.

Ids with a '.' are not sessions (the engine's session ids come from
`secrets.token_urlsafe`, which has none) but shared, content-addressed
entries such as the prefix cache's: they are written and deleted without a
lease.

Redis down or slow: every call retries with exponential backoff, then raises
`StoreUnavailable`; nothing is written partially (each write is one script;
a snapshot is uploaded, then promoted by one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from urllib.parse import urlsplit

import msgpack

from ..errors import LeaseLost, SessionHeld, SnapshotFormatError, SnapshotNotFound, StoreError, StoreUnavailable
from .journal import Journal, JournalRecord, decode_records
from .redis_scripts import APPEND, CLAIM, DELETE, PROMOTE, RELEASE, RENEW, TRIM
from .store import SnapshotStore, validate_session_id

log = logging.getLogger("streamgemma.store")

DEFAULT_PREFIX = "streamgemma"
DEFAULT_LEASE_TTL_S = 10.0
DEFAULT_MAX_BYTES = 1 << 30
CLAIM_POLL_S = 0.002  # first wait between claim attempts; doubles up to CLAIM_POLL_MAX_S
CLAIM_POLL_MAX_S = 0.01  # (a hand-over takes tens of milliseconds: polling must not add as much)

UPLOAD_TTL_MS = 600_000  # an upload whose promotion never ran (the worker died between the two)
READ_SIZE = 1 << 20  # socket reads of 1 MiB: a snapshot arrives in 18 reads, not 280


class RedisSnapshotStore(SnapshotStore):
    """Snapshots, journals and leases in Redis at `url`
    (`redis://[user:password@]HOST:PORT/DB`, `rediss://` for TLS), under key
    `prefix`. lease_ttl: seconds a lease outlives its last renewal (a dead
    worker's sessions are recovered that long after it died; renewed every
    third of it). claim_wait: how long a claim waits for the holder to hand
    the session over (default: lease_ttl + 2 s, so a dead holder's lease
    expires within it). timeout: seconds before a Redis call counts as failed
    (after retries: StoreUnavailable). `client`: a redis.Redis to use instead."""

    coordinated = True

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = DEFAULT_PREFIX,
                 lease_ttl: float = DEFAULT_LEASE_TTL_S, claim_wait: float | None = None, timeout: float = 5.0,
                 max_bytes: int = DEFAULT_MAX_BYTES, client=None):
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        if not lease_ttl >= 0.01:  # (Redis counts milliseconds; renewals run every third of it)
            raise ValueError(f"lease_ttl must be >= 0.01 seconds, got {lease_ttl!r}")
        if claim_wait is not None and not claim_wait >= 0:
            raise ValueError(f"claim_wait must be >= 0 seconds, got {claim_wait!r}")
        if not prefix or any(c.isspace() for c in prefix):
            raise ValueError(f"the key prefix must be non-empty, without spaces, got {prefix!r}")
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"a Redis store URL starts with redis:// or rediss://, got {url.split(':', 1)[0]}://")
        self.url_shown = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"
        self.prefix = prefix
        self.lease_ttl = lease_ttl
        self.ttl_ms = round(lease_ttl * 1000)  # (what the scripts give a lease)
        self.claim_wait = lease_ttl + 2.0 if claim_wait is None else claim_wait
        self.max_bytes = max_bytes
        self.errors = (redis.ConnectionError, redis.TimeoutError)  # retried by redis-py, then unavailable
        # A full Redis (maxmemory with noeviction) or a demoted primary: not retried, also unavailable.
        self._refusals = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)
        self._response_error = redis.exceptions.ResponseError
        self.client = client if client is not None else redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30,
            socket_read_size=READ_SIZE,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 4), retry_on_error=list(self.errors))
        self.worker = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"
        self._scripts = {name: self.client.register_script(src) for name, src in (
            ("claim", CLAIM), ("renew", RENEW), ("release", RELEASE), ("promote", PROMOTE), ("append", APPEND),
            ("trim", TRIM), ("delete", DELETE))}
        self._held: dict[str, str] = {}  # session id -> lease value this worker holds
        self._lost: set[str] = set()  # leases another worker took (this one was too slow to renew)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._renewer: threading.Thread | None = None
        self._watchers: dict[str, list[Callable[[], object]]] = {}  # `on_release` callbacks by session id
        self._journal = RedisJournal(self)

    def __repr__(self) -> str:
        return f"RedisSnapshotStore({self.url_shown!r}, prefix={self.prefix!r})"

    def describe(self) -> str:
        return f"redis {self.url_shown} (prefix {self.prefix!r}, worker {self.worker})"

    def key(self, session_id: str, what: str) -> str:
        return f"{self.prefix}:s:{validate_session_id(session_id)}:{what}"

    @contextlib.contextmanager
    def unavailable(self, what: str):
        """Turn Redis being unreachable (after redis-py's retries), full or read-only into StoreUnavailable."""
        try:
            yield
        except self.errors + self._refusals as e:
            raise StoreUnavailable(f"the Redis store {self.url_shown} is unavailable ({what}): {e}") from None
        except self._response_error as e:  # (before Redis 7, a refusal inside a script comes back as this)
            if not any(code in str(e) for code in ("OOM", "READONLY")):
                raise
            raise StoreUnavailable(f"the Redis store {self.url_shown} is unavailable ({what}): {e}") from None

    def run(self, name: str, keys: list[str], args: list, client=None):
        """Run one of the Lua scripts (on `client`: a pipeline to batch them)."""
        return self._scripts[name](keys=keys, args=args, client=client)

    # -- leases -------------------------------------------------------------------------
    def lease(self, session_id: str) -> str:
        """The lease value this worker holds for `session_id`; LeaseLost if none."""
        with self._lock:
            value = self._held.get(session_id)
            if value is None or session_id in self._lost:
                raise LeaseLost(f"this worker does not own session {session_id[:8]}... (its lease was lost "
                                "or never taken)")
            return value

    def leases(self, session_ids: Iterable[str]) -> dict[str, str]:
        """The lease values this worker holds among `session_ids` (lost or never taken: left out)."""
        with self._lock:
            held, lost = self._held, self._lost
            return {sid: held[sid] for sid in session_ids if sid in held and sid not in lost}

    def claim(self, session_id: str) -> None:
        deadline, poll, asked = time.monotonic() + self.claim_wait, CLAIM_POLL_S, None
        while (holder := self.try_claim(session_id, asked)) is not None:
            asked = holder
            if time.monotonic() >= deadline:
                raise SessionHeld(f"session {session_id[:8]}... is held by worker {holder}, which did not hand it "
                                  f"over within {self.claim_wait:g} s")
            time.sleep(poll)
            poll = min(2 * poll, CLAIM_POLL_MAX_S)

    def try_claim(self, session_id: str, asked: str | None = None, ask: bool = True) -> str | None:
        """One attempt of `claim`: None if this worker owns `session_id` now,
        else the worker holding it, which is asked to hand it over (unless
        it is `asked`: asked already; or ask=False: only taken if free)."""
        validate_session_id(session_id)
        with self.unavailable("claim"):
            ok, value = self.run("claim", [self.key(session_id, "lease"), f"{self.prefix}:fence",
                                           self.key(session_id, "owner")], [self.worker, self.ttl_ms])
        value = value.decode() if isinstance(value, bytes) else value
        if ok:
            with self._lock:
                self._held[session_id] = value
                self._lost.discard(session_id)
            self._start_renewer()
            return None
        holder = value.rsplit(":", 1)[0]
        if ask and asked != holder:  # ask the holder to hand it over (once per holder)
            with self.unavailable("hand-over request"):
                key = f"{self.prefix}:handover:{holder}"
                wait_ms = max(1, round(self.claim_wait * 1000))
                self.client.pipeline().rpush(key, session_id).pexpire(key, wait_ms).execute()
        return holder

    def release(self, session_id: str) -> None:
        with self._lock:
            value = self._held.pop(session_id, None)
            self._lost.discard(session_id)
        if value is not None:
            with self.unavailable("release"):
                self.run("release", [self.key(session_id, "lease"), self.key(session_id, "owner")],
                         [value, f"{self.prefix}:released", session_id])

    def release_all(self, keep: Iterable[str] = ()) -> None:
        keep = set(keep)
        for sid in [sid for sid in list(self._held) if sid not in keep]:
            with contextlib.suppress(StoreUnavailable):  # the lease then expires by itself
                self.release(sid)

    def held(self) -> list[str]:
        with self._lock:
            return sorted(sid for sid in self._held if sid not in self._lost)

    def lost(self) -> list[str]:
        """Sessions whose lease another worker took: this worker must drop them."""
        with self._lock:
            return sorted(self._lost)

    def wait_handover(self, timeout: float) -> str | None:
        """The next session another worker asked this one to hand over, or None after `timeout` s."""
        with self.unavailable("hand-over wait"):
            item = self.client.blpop([f"{self.prefix}:handover:{self.worker}"], timeout=max(timeout, 0.01))
        return item[1].decode() if item else None

    def renew_once(self) -> None:
        """Renew every lease held; a lease found taken is marked lost."""
        with self._lock:
            held = [(sid, v) for sid, v in self._held.items() if sid not in self._lost]
        if not held:
            return
        pipe = self.client.pipeline(transaction=False)
        for sid, value in held:
            self.run("renew", [self.key(sid, "lease"), self.key(sid, "owner")], [value, self.ttl_ms], client=pipe)
        results = pipe.execute()
        with self._lock:
            for (sid, value), ok in zip(held, results):
                if not ok and self._held.get(sid) == value:
                    self._lost.add(sid)
                    log.error("lost the lease of session %s... (another worker took it): dropping it", sid[:8])

    def _start_renewer(self) -> None:
        with self._lock:
            if self._renewer is None:  # (the listener too: subscribed by the time a claim waits)
                self._renewer = threading.Thread(target=self._renew_loop, name="streamgemma-leases", daemon=True)
                self._renewer.start()
                threading.Thread(target=self._listen, name="streamgemma-releases", daemon=True).start()

    def on_release(self, session_id: str, callback: Callable[[], object]) -> Callable[[], None]:
        """Call `callback()` (in a listener thread; it must not block) each time
        a worker releases `session_id`, until the returned function is called."""
        self._start_renewer()
        with self._lock:
            self._watchers.setdefault(session_id, []).append(callback)

        def stop() -> None:
            with self._lock:
                callbacks = self._watchers.get(session_id, [])
                if callback in callbacks:
                    callbacks.remove(callback)
                if not callbacks:
                    self._watchers.pop(session_id, None)
        return stop

    def _listen(self) -> None:
        """The listener thread: releases published by every worker's RELEASE script."""
        failing = False
        while not self._closing.is_set():
            try:
                with contextlib.closing(self.client.pubsub(ignore_subscribe_messages=True)) as pubsub:
                    pubsub.subscribe(f"{self.prefix}:released")
                    failing = False
                    while not self._closing.is_set():
                        message = pubsub.get_message(timeout=0.5)
                        if message is not None:
                            with self._lock:
                                callbacks = list(self._watchers.get(message["data"].decode(), ()))
                            for callback in callbacks:
                                with contextlib.suppress(Exception):  # (a waiter whose event loop has ended)
                                    callback()
            except Exception as e:  # noqa: BLE001 - claims fall back to polling meanwhile
                if self._closing.is_set():
                    return
                if not failing:  # (once per outage: the store's calls report it too)
                    log.warning("release notifications from %s stopped (%s); resubscribing", self.url_shown, e)
                failing = True
                self._closing.wait(1.0)

    def _renew_loop(self) -> None:
        while not self._closing.wait(self.lease_ttl / 3):
            try:
                self.renew_once()
            except Exception as e:  # noqa: BLE001 - retried next round; the leases may expire meanwhile
                log.warning("could not renew leases in %s: %s", self.url_shown, e)

    def close(self) -> None:
        """Stop renewing (leases not released expire after lease_ttl)."""
        self._closing.set()

    # -- snapshots ----------------------------------------------------------------------
    def prepare(self) -> str:
        try:
            with self.unavailable("ping"):
                self.client.ping()
                count = self.client.zcard(f"{self.prefix}:index")
        except StoreUnavailable as e:
            raise StoreError(str(e)) from None
        return f"{count} snapshots, worker {self.worker}"

    def put(self, session_id: str, blob: bytes) -> None:
        # A memoryview is sent as it is; redis-py would copy bytes into one packed command first.
        data = memoryview(blob).cast("B")
        if shared(session_id):
            with self.unavailable("put"):
                self.client.pipeline().set(self.key(session_id, "snap"), data).zadd(
                    f"{self.prefix}:index", {session_id: time.time()}).execute()
            return
        value = self.lease(session_id)
        upload = self.key(session_id, f"upload:{value}")
        with self.unavailable("put"):
            pipe = self.client.pipeline(transaction=False)
            pipe.set(upload, data, px=UPLOAD_TTL_MS)
            self.run("promote", [self.key(session_id, "lease"), self.key(session_id, "snap"), f"{self.prefix}:index",
                                 upload, self.key(session_id, "owner")], [value, time.time(), session_id, self.ttl_ms],
                     client=pipe)
            _, ok = pipe.execute()
        if not ok:
            self.mark_lost(session_id)
            raise LeaseLost(f"the snapshot of session {session_id[:8]}... was refused: another worker owns it now")

    def get(self, session_id: str) -> bytes:
        with self.unavailable("get"):
            blob = self.client.get(self.key(session_id, "snap"))
        if blob is None:
            raise SnapshotNotFound(f"no snapshot for session {session_id} in {self.url_shown}")
        if len(blob) > self.max_bytes:
            raise SnapshotFormatError(f"the snapshot of {session_id} is {len(blob)} bytes, more than "
                                      f"{self.max_bytes}")
        return blob

    def delete(self, session_id: str) -> None:
        if shared(session_id):
            with self.unavailable("delete"):
                n, _ = self.client.pipeline().delete(self.key(session_id, "snap")).zrem(
                    f"{self.prefix}:index", session_id).execute()
            if not n:
                raise SnapshotNotFound(f"no entry {session_id[:40]} in {self.url_shown}")
            return
        if session_id not in self._held:
            self.claim(session_id)
        value = self.lease(session_id)
        with self.unavailable("delete"):
            n = self.run("delete", [self.key(session_id, "lease"), self.key(session_id, "snap"),
                                    self.key(session_id, "journal"), f"{self.prefix}:index",
                                    self.key(session_id, "fence"), self.key(session_id, "owner")],
                         [value, session_id, self.ttl_ms])
        with self._lock:
            self._held.pop(session_id, None)
        if n == -1:
            raise LeaseLost(f"the delete of session {session_id[:8]}... was refused: another worker owns it now")
        if n == 0:
            raise SnapshotNotFound(f"no snapshot for session {session_id} in {self.url_shown}")

    def list(self) -> list[str]:
        with self.unavailable("list"):
            return sorted(m.decode() for m in self.client.zrange(f"{self.prefix}:index", 0, -1))

    def __contains__(self, session_id: str) -> bool:
        with self.unavailable("exists"):
            return bool(self.client.exists(self.key(session_id, "snap")))

    def older_than(self, seconds: float) -> list[str]:
        with self.unavailable("older_than"):
            return sorted(m.decode() for m in self.client.zrangebyscore(f"{self.prefix}:index", "-inf",
                                                                        time.time() - seconds))

    def journal(self) -> RedisJournal:
        return self._journal

    def mark_lost(self, session_id: str) -> None:
        with self._lock:
            if session_id in self._held:
                self._lost.add(session_id)


def shared(key: str) -> bool:
    """Whether `key` names a shared entry, not a session (see the module docstring)."""
    return "." in key


class RedisJournal(Journal):
    """Journal records as Redis lists, written under the store's leases."""

    def __init__(self, store: RedisSnapshotStore):
        self.store = store

    def append(self, batch: Mapping[str, list[bytes]]) -> set[str]:
        """One script for the whole batch (one round trip, one Redis call)."""
        store, refused, entries = self.store, set(), []
        leases = store.leases(batch)
        for sid, records in batch.items():
            value = leases.get(sid)
            if value is None:
                refused.add(sid)
            else:
                entries.append((validate_session_id(sid), value, records))
        if entries:
            with store.unavailable("journal append"):
                packed = msgpack.packb(entries, use_bin_type=False)
                results = store.run("append", [], [store.prefix, packed, time.time(), store.ttl_ms])
            for (sid, _, _), ok in zip(entries, results):
                if not ok:
                    store.mark_lost(sid)
                    refused.add(sid)
        return refused

    def read(self, session_id: str) -> list[JournalRecord]:
        with self.store.unavailable("journal read"):
            items = self.store.client.lrange(self.store.key(session_id, "journal"), 0, -1)
        return decode_records(b"".join(items))

    def compact(self, session_id: str, position: int) -> None:
        # Appends only add at the tail, so the head records counted here are still the head when trimmed.
        records = self.read(session_id)
        drop = 0
        for record in records:
            if record.end > position or (record.kind == "rng" and record.position >= position):
                break
            drop += 1
        if drop:
            store = self.store
            with store.unavailable("journal compact"):
                store.run("trim", [store.key(session_id, "lease"), store.key(session_id, "journal"),
                                   store.key(session_id, "owner")], [store.lease(session_id), drop, store.ttl_ms])

    def delete(self, session_id: str) -> None:
        pass  # `RedisSnapshotStore.delete` removes the journal with the snapshot, under the lease
