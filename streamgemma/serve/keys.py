"""Store keys that are not session ids. Session ids come from
`secrets.token_urlsafe` (letters, digits, '_' and '-'); a key with a '.'
after this prefix can never be one, so the prefix cache shares a store with
the sessions (and, through a shared store, a fleet) without collisions, and
no client can open a cache entry as a session."""

from __future__ import annotations

PREFIX_CACHE = "prefix."


def is_reserved_key(key: str) -> bool:
    """Whether `key` names a prefix-cache entry, not a session."""
    return key.startswith(PREFIX_CACHE)
