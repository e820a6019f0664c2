"""Exact prefix reuse: the state after recent conversations, found again by
their token ids.

A Griffin conversation's whole state is one fixed-size snapshot, so a
request whose tokens extend an earlier request's tokens (the next turn of a
chat) restores that state and prefills only its new tokens, at any token
boundary. After a request completes, its final state (prompt plus generated
tokens) is kept under a key made of a hash of those token ids, the model's
fingerprint and its numerics (dtype, weight format, device type). A lookup
hashes the request's ids once, taking a copy of the running hash at each
cached length, and takes the longest cached prefix that leaves at least one
new token.

Two tiers, both least-recently-used out: decoded states in host memory
(`memory_bytes`; a hit costs a copy to the device) and encoded snapshots in
the engine's `SnapshotStore` (`max_bytes`), under keys of `keys.PREFIX_CACHE`
that can never be session ids: a directory store keeps them across
restarts, a store shared by a fleet shares them (each worker bounds what it
wrote or learned of; `refresh_interval` bounds how often a miss re-lists
the store to learn of entries written by others).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import logging
import time
from collections.abc import Sequence

import numpy as np

from ..errors import SnapshotError, SnapshotNotFound, StoreError
from ..session import snapshot as snapshot_format
from ..session.model import Model
from ..session.store import SnapshotStore
from .keys import PREFIX_CACHE

log = logging.getLogger("streamgemma.serve.prefix_cache")

DIGEST_CHARS = 48  # hex digits of sha256 kept in a key: 192 bits
DEFAULT_MAX_BYTES = 4 << 30
DEFAULT_MEMORY_BYTES = 1 << 30
MAX_PENDING_WRITES = 4  # states waiting for the store, held in host memory
COMPRESSION_LEVEL = -1  # as suspensions: fast to restore


def prefix_digests(fingerprint: bytes, ids: Sequence[int], lengths: set[int]) -> dict[int, str]:
    """{length: digest of ids[:length]} for the given lengths, in one pass."""
    data = np.asarray(ids, dtype="<i4").tobytes()
    hasher = hashlib.sha256(fingerprint)
    out, done = {}, 0
    for n in sorted(lengths):
        hasher.update(data[done * 4:n * 4])
        done = n
        out[n] = hasher.copy().hexdigest()[:DIGEST_CHARS]
    return out


@dataclasses.dataclass(frozen=True)
class Entry:
    """A cached state: its key in the store, how many tokens it holds, its
    size in the store (encoded bytes)."""

    key: str
    tokens: int
    nbytes: int

    @classmethod
    def parse(cls, key: str) -> Entry | None:
        """The entry a store key names ("prefix.TOKENS.BYTES.DIGEST"), or None."""
        parts = key.split(".")
        if len(parts) != 4 or parts[0] + "." != PREFIX_CACHE or not (parts[1].isdigit() and parts[2].isdigit()):
            return None
        return cls(key, int(parts[1]), int(parts[2]))

    @property
    def digest(self) -> str:
        return self.key.rsplit(".", 1)[1]


@dataclasses.dataclass(frozen=True)
class Hit:
    tokens: int  # the cached prefix's length
    contents: snapshot_format.SnapshotContents


class PrefixCache:
    """See the module docstring. Call from the server's event loop (store
    work runs in one writer thread, in order). `hits`, `misses`,
    `hit_tokens` count lookups for monitoring."""

    def __init__(self, model: Model, store: SnapshotStore, max_bytes: int = DEFAULT_MAX_BYTES,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES, refresh_interval: float = 1.0):
        if max_bytes < 0 or memory_bytes < 0:
            raise ValueError("the prefix cache's byte bounds must be >= 0")
        self.model = model
        self.store = store
        self.max_bytes = max_bytes
        self.memory_bytes = memory_bytes
        self.refresh_interval = refresh_interval
        self.hits = self.misses = self.hit_tokens = 0
        # The weights and their numerics: a state is reused only where the reply would be the same bit
        # for bit (workers of one fleet sharing a store may run other dtypes or weight formats).
        self._fingerprint = f"{model.fingerprint}/{model.dtype}/{model.quantization}/{model.device.type}".encode()
        self._index: collections.OrderedDict[str, Entry] = collections.OrderedDict()  # digest -> entry, LRU first
        self._memory: collections.OrderedDict[str, tuple[snapshot_format.SnapshotContents, int]] = \
            collections.OrderedDict()
        self._memory_used = 0
        # States on their way to the store: found by lookups until their write has landed.
        self._writing: dict[str, snapshot_format.SnapshotContents] = {}
        self._refreshed_at = -float("inf")
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streamgemma-prefix-cache")
        self._tasks: set[asyncio.Task] = set()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 or self.memory_bytes > 0

    @property
    def stored_bytes(self) -> int:
        return sum(e.nbytes for e in self._index.values())

    def __len__(self) -> int:
        return len({f"{e.tokens}.{d}" for d, e in self._index.items()} | self._memory.keys() | self._writing.keys())

    async def _run(self, fn, *args):
        return await asyncio.wrap_future(self._writer.submit(fn, *args))

    async def refresh(self) -> None:
        """Learn the entries in the store (at start: those of a previous
        process; later: those other workers wrote)."""
        self._refreshed_at = time.monotonic()
        if self.max_bytes == 0:
            return
        for key in await self._run(self.store.list):
            entry = Entry.parse(key)
            if entry is not None and entry.digest not in self._index:
                self._index[entry.digest] = entry
                self._index.move_to_end(entry.digest, last=False)  # unknown age: evicted first
        await self._evict()

    async def lookup(self, ids: Sequence[int]) -> Hit | None:
        """The longest cached state whose tokens are a prefix of `ids`,
        shorter than `ids`; None (a miss) if there is none."""
        if self.enabled and ids:
            hit = await self._find(ids)
            if hit is None and time.monotonic() - self._refreshed_at >= self.refresh_interval:
                try:
                    await self.refresh()
                except Exception as e:  # noqa: BLE001 - the cache is an optimisation: a broken store is a miss
                    log.warning("prefix cache: could not list the store: %s", e)
                hit = await self._find(ids)
            if hit is not None:
                self.count(hit.tokens)
                return hit
        self.count(0)
        return None

    def count(self, tokens: int) -> None:
        """Count a lookup that reused `tokens` (0: a miss), whichever tier served it."""
        if tokens:
            self.hits += 1
            self.hit_tokens += tokens
        else:
            self.misses += 1

    async def _find(self, ids: Sequence[int]) -> Hit | None:
        lengths = {e.tokens for e in self._index.values() if e.tokens < len(ids)}
        lengths |= {n for k in (*self._memory, *self._writing) if (n := int(k.split(".")[0])) < len(ids)}
        if not lengths:
            return None
        digests = prefix_digests(self._fingerprint, ids, lengths)
        for n in sorted(digests, reverse=True):
            digest = digests[n]
            name = f"{n}.{digest}"
            held = self._memory.get(name)
            if held is not None or name in self._writing:
                if held is not None:
                    self._memory.move_to_end(name)
                if digest in self._index:
                    self._index.move_to_end(digest)
                return Hit(n, held[0] if held is not None else self._writing[name])
            entry = self._index.get(digest)
            if entry is None or entry.tokens != n:
                continue
            try:
                contents = await self._run(self._read, entry.key)
            except StoreError as e:  # the store is down: a miss now, the entry may serve later
                log.warning("prefix cache: could not read entry %s: %s", entry.key[:40], e)
                return None
            except (SnapshotError, OSError) as e:  # gone (evicted by another worker), damaged, another model
                if not isinstance(e, SnapshotNotFound):
                    log.warning("prefix cache: dropping entry %s: %s", entry.key[:40], e)
                self._index.pop(digest, None)
                continue
            if contents.position != n:
                self._index.pop(digest, None)
                continue
            self._index.move_to_end(digest)
            self._remember(n, digest, contents)
            return Hit(n, contents)
        return None

    def _read(self, key: str) -> snapshot_format.SnapshotContents:
        return snapshot_format.decode(self.store.get(key), self.model.config, self.model.fingerprint)

    async def keep(self, ids: Sequence[int], contents: snapshot_format.SnapshotContents) -> None:
        """Cache `contents`, the state after consuming exactly `ids`: in
        memory now, in the store in the background (`flush` waits)."""
        if not self.enabled or not ids or contents.position != len(ids):
            return
        digest = prefix_digests(self._fingerprint, ids, {len(ids)})[len(ids)]
        self._remember(len(ids), digest, contents)
        if self.max_bytes > 0 and len(self._writing) < MAX_PENDING_WRITES:  # (a slow store drops writes)
            self._writing[f"{len(ids)}.{digest}"] = contents
            task = asyncio.ensure_future(self._store(len(ids), digest, contents))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _remember(self, tokens: int, digest: str, contents: snapshot_format.SnapshotContents) -> None:
        if self.memory_bytes == 0:
            return
        name = f"{tokens}.{digest}"
        size = _host_bytes(contents)
        old = self._memory.pop(name, None)
        if old is not None:
            self._memory_used -= old[1]
        if size > self.memory_bytes:
            return
        self._memory[name] = (contents, size)
        self._memory_used += size
        while self._memory_used > self.memory_bytes:
            _, (_, freed) = self._memory.popitem(last=False)
            self._memory_used -= freed

    async def _store(self, tokens: int, digest: str, contents: snapshot_format.SnapshotContents) -> None:
        """Encode and store (writer thread), then index and evict (here, in
        the event loop: only the loop touches the index)."""
        try:
            entry = await self._run(self._write, tokens, digest, contents)
        except Exception as e:  # noqa: BLE001 - a failed cache write loses nothing but a cache entry
            log.warning("prefix cache: could not store an entry: %s: %s", type(e).__name__, e)
            return
        finally:
            if self._writing.get(f"{tokens}.{digest}") is contents:
                del self._writing[f"{tokens}.{digest}"]
        if entry is None:
            return
        old = self._index.pop(digest, None)
        self._index[digest] = entry
        if old is not None and old.key != entry.key:
            await self._run(_delete, self.store, old.key)
        await self._evict()

    def _write(self, tokens: int, digest: str, contents: snapshot_format.SnapshotContents) -> Entry | None:
        blob = snapshot_format.encode_contents(contents, COMPRESSION_LEVEL)
        if len(blob) > self.max_bytes:
            return None
        entry = Entry(f"{PREFIX_CACHE}{tokens}.{len(blob)}.{digest}", tokens, len(blob))
        self.store.put(entry.key, blob)
        return entry

    async def _evict(self) -> None:
        used, gone = self.stored_bytes, []
        while used > self.max_bytes and self._index:
            _, entry = self._index.popitem(last=False)
            used -= entry.nbytes
            gone.append(entry.key)
        for key in gone:
            await self._run(_delete, self.store, key)

    async def flush(self) -> None:
        """Wait for the store writes started so far."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def close(self) -> None:
        self._writer.shutdown(wait=True)


def _delete(store: SnapshotStore, key: str) -> None:
    try:
        store.delete(key)
    except SnapshotNotFound:
        pass
    except Exception as e:  # noqa: BLE001 - an entry that outlives its eviction costs only space
        log.warning("prefix cache: could not delete %s: %s", key[:40], e)


def _host_bytes(contents: snapshot_format.SnapshotContents) -> int:
    """Host memory a decoded or captured state holds (tensors and logits)."""
    if contents.arena is not None:
        size = contents.arena.numel() * contents.arena.element_size()
    else:
        size = sum(len(r.data) for layer in contents.layers for r in layer)
    logits = contents.extra.get("logits")
    return size + (len(logits) if logits else 0)
