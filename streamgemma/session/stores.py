"""A store from what a user typed (`streamgemma serve --store ...`): a
directory, or a Redis URL."""

from __future__ import annotations

from .redis_store import DEFAULT_LEASE_TTL_S, DEFAULT_PREFIX, RedisSnapshotStore
from .store import DirectorySnapshotStore, SnapshotStore

REDIS_SCHEMES = ("redis://", "rediss://")


def open_store(spec: str, prefix: str = DEFAULT_PREFIX, lease_ttl: float = DEFAULT_LEASE_TTL_S,
               max_bytes: int | None = None) -> SnapshotStore:
    """`redis://[user:password@]HOST:PORT/DB` or `rediss://...` (TLS): a
    RedisSnapshotStore under key `prefix` (redis-py and hiredis); another
    scheme is a ValueError; anything else names a directory (a
    DirectorySnapshotStore, created if missing)."""
    if spec.startswith(REDIS_SCHEMES):
        kwargs = {} if max_bytes is None else {"max_bytes": max_bytes}
        return RedisSnapshotStore(spec, prefix=prefix, lease_ttl=lease_ttl, **kwargs)
    if "://" in spec:  # (a mistyped scheme would become a directory named after it)
        raise ValueError(f"store {spec.split('://', 1)[0]}:// is not supported: a directory, or a URL of "
                         f"{' or '.join(REDIS_SCHEMES)}")
    return DirectorySnapshotStore(spec, max_bytes=max_bytes)
