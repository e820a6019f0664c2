"""Credentials of a websocket handshake (docs/protocol.md, "Authentication").

Two ways to present the server's bearer token, so that programs and browsers
can both connect without the token ever travelling in a URL (which proxies
and access logs keep):

- the header `Authorization: Bearer <token>` (programs);
- the subprotocols `streamgemma.v1` and `bearer.<base64url(token)>` offered in
  `Sec-WebSocket-Protocol` (browsers: their WebSocket API cannot set headers,
  but it can offer subprotocols). The server selects `streamgemma.v1` only;
  the token's subprotocol is never echoed.

Nothing here keeps state or logs a credential. Stdlib only: the client imports it.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import re
from collections.abc import Iterable, Sequence

SUBPROTOCOL = "streamgemma.v1"
BEARER_PREFIX = "bearer."
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


class Refused(Exception):
    """Credentials the server refuses: `status` (400 or 401) and a reason
    that names the problem, never the value."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def bearer_subprotocols(token: str) -> list[str]:
    """The subprotocols a client offers to present `token`: `streamgemma.v1`
    and `bearer.` + the token's UTF-8 bytes in unpadded base64url (every
    character of it is allowed in a subprotocol name)."""
    if not token:
        raise ValueError("the token is empty")
    encoded = base64.urlsafe_b64encode(token.encode("utf-8")).decode("ascii").rstrip("=")
    return [SUBPROTOCOL, BEARER_PREFIX + encoded]


def offered_subprotocols(values: Iterable[str]) -> list[str]:
    """Subprotocol names from the `Sec-WebSocket-Protocol` header lines (each
    a comma-separated list), in order."""
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def select_subprotocol(offered: Sequence[str]) -> str | None:
    """The subprotocol the server answers with: `streamgemma.v1` when
    offered, else none (clients that offer nothing keep working)."""
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


def check(token: str, authorization: Sequence[str], protocols: Sequence[str]) -> None:
    """Raise `Refused` unless the handshake presents `token`.

    authorization: the `Authorization` header lines; protocols: the offered
    subprotocols (`offered_subprotocols`). Exactly one token must be
    presented by each mechanism used; when both are used they must both be
    right. Comparisons take constant time in the token's contents."""
    if len(authorization) > 1:
        raise Refused(400, "more than one Authorization header")
    bearers = [p for p in protocols if p[:len(BEARER_PREFIX)].lower() == BEARER_PREFIX]
    if len(bearers) > 1:
        raise Refused(401, "more than one bearer subprotocol")
    if not authorization and not bearers:
        raise Refused(401, "no credentials: send 'Authorization: Bearer <token>' or the subprotocols "
                           f"'{SUBPROTOCOL}' and 'bearer.<base64url(token)>'")
    expected = token.encode("utf-8")
    if authorization:
        scheme, _, given = authorization[0].partition(" ")
        if scheme.lower() != "bearer" or not _same(octets(given), expected):
            raise Refused(401, "wrong bearer token")
    if bearers:
        if SUBPROTOCOL not in protocols:
            # A browser fails a handshake whose answer selects none of its subprotocols.
            raise Refused(401, f"a bearer subprotocol must come with the subprotocol '{SUBPROTOCOL}'")
        given_bytes = _decode(bearers[0][len(BEARER_PREFIX):])
        if given_bytes is None or not _same(given_bytes, expected):
            raise Refused(401, "wrong bearer token")


def redact(name: str, value: str) -> str:
    """A header's value as it may be logged: credentials replaced."""
    if name.lower() == "authorization":
        return "[redacted]"
    if name.lower() == "sec-websocket-protocol":
        return ", ".join(BEARER_PREFIX + "[redacted]" if p[:len(BEARER_PREFIX)].lower() == BEARER_PREFIX else p
                         for p in offered_subprotocols([value]))
    return value


class RedactingLogger(logging.LoggerAdapter):
    """A logger for websockets' own connection log, whose debug level writes
    every handshake header ("< %s: %s"): credentials are redacted."""

    def log(self, level, msg, *args, **kwargs):
        if msg in ("< %s: %s", "> %s: %s") and len(args) == 2:
            args = (args[0], redact(str(args[0]), str(args[1])))
        super().log(level, msg, *args, **kwargs)


def header_value(token: str) -> str:
    """`Authorization` header value carrying `token` as UTF-8 octets (header
    values travel as ISO-8859-1 text in websockets)."""
    return "Bearer " + token.encode("utf-8").decode("latin-1")


def octets(value: str) -> bytes:
    """The bytes a header value arrived as: websockets decodes them as
    ISO-8859-1 (older versions: ASCII with surrogateescape)."""
    for encoding, errors in (("latin-1", "strict"), ("utf-8", "surrogateescape")):
        try:
            return value.encode(encoding, errors)
        except UnicodeEncodeError:
            pass
    return value.encode("utf-8", "replace")  # not from a header: never equal to a token, never an error


def _decode(text: str) -> bytes | None:
    """Unpadded base64url, strictly (None if malformed or empty)."""
    if not _BASE64URL.fullmatch(text) or len(text) % 4 == 1:
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def _same(given: bytes, expected: bytes) -> bool:
    # hmac.compare_digest's time depends on the lengths only, not on where the bytes differ.
    return bool(given) and hmac.compare_digest(given, expected)
