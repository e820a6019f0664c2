"""The websocket protocol's messages (docs/protocol.md): typed requests parsed
and validated from JSON text frames, and the events the server sends back.

Parsing never raises anything but `ProtocolError`, whose `code` and message
go back to the client in an `error` event; the connection survives it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from ..sampling.params import SamplingParams
from ..types import Token

PATH = "/v1/stream"


class ProtocolError(Exception):
    """A request the server refuses. `code` is machine-readable (see
    docs/protocol.md); `request_id` echoes the client's id when known."""

    def __init__(self, code: str, message: str, request_id: Any = None, session: str | None = None):
        super().__init__(message)
        self.code = code
        self.request_id = request_id
        self.session = session


@dataclasses.dataclass(frozen=True)
class Open:
    """Open a new session (session None) or resume a stored/detached one."""

    id: Any = None
    session: str | None = None
    seed: int | None = None


@dataclasses.dataclass(frozen=True)
class Append:
    """Input for a session: text or token ids (exactly one is set)."""

    id: Any = None
    session: str | None = None
    text: str | None = None
    tokens: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Generate:
    """Start a generation. coalesce: the client accepts `tokens` frames
    (several tokens in one frame) besides `token` frames."""

    id: Any = None
    session: str | None = None
    params: SamplingParams = SamplingParams()
    coalesce: bool = False


@dataclasses.dataclass(frozen=True)
class Cancel:
    id: Any = None
    session: str | None = None


@dataclasses.dataclass(frozen=True)
class Snapshot:
    id: Any = None
    session: str | None = None


@dataclasses.dataclass(frozen=True)
class Close:
    id: Any = None
    session: str | None = None


Request = Open | Append | Generate | Cancel | Snapshot | Close

# Sampling fields a generate request may carry (those of SamplingParams).
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                    "presence_penalty", "stop", "stop_token_ids", "seed")
_ALLOWED = {
    "open": {"type", "id", "session", "seed"},
    "append": {"type", "id", "session", "text", "tokens"},
    "generate": {"type", "id", "session", "coalesce", *_SAMPLING_FIELDS},
    "cancel": {"type", "id", "session"},
    "snapshot": {"type", "id", "session"},
    "close": {"type", "id", "session"},
}


def parse_request(frame: str | bytes, max_tokens_limit: int, default_max_tokens: int) -> Request:
    """A typed request from one frame. max_tokens_limit: the largest
    max_tokens accepted; default_max_tokens: used when a generate omits it."""
    if isinstance(frame, bytes):
        raise ProtocolError("bad_message", "binary frames are not part of the protocol; send JSON text frames")
    try:
        msg = json.loads(frame, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ProtocolError("bad_json", f"the frame is not valid JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_message", "a message is a JSON object with a \"type\"")
    request_id = msg.get("id")
    if request_id is not None and not (isinstance(request_id, (str, int)) and not isinstance(request_id, bool)):
        raise ProtocolError("bad_message", "\"id\" must be a string or an integer")
    if isinstance(request_id, str) and len(request_id) > 200:
        raise ProtocolError("bad_message", "\"id\" is longer than 200 characters")
    kind = msg.get("type")
    if kind not in _ALLOWED:
        raise ProtocolError("unknown_type", f"unknown message type {_short(kind)}; expected one of "
                                            f"{', '.join(sorted(_ALLOWED))}", request_id)
    unknown = set(msg) - _ALLOWED[kind]
    if unknown:
        raise ProtocolError("bad_message", f"{kind}: unknown fields {sorted(unknown)}", request_id)
    session = msg.get("session")
    if session is not None and not isinstance(session, str):
        raise ProtocolError("bad_message", "\"session\" must be a string", request_id)
    try:
        if kind == "open":
            seed = msg.get("seed")
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
                raise ValueError("\"seed\" must be an integer")
            return Open(request_id, session, seed)
        if kind == "append":
            return _append(msg, request_id, session)
        if kind == "generate":
            coalesce = msg.get("coalesce", False)
            if not isinstance(coalesce, bool):
                raise ValueError(f"\"coalesce\" must be true or false, got {_short(coalesce)}")
            fields = {k: msg[k] for k in _SAMPLING_FIELDS if k in msg}
            fields.setdefault("max_tokens", default_max_tokens)
            if fields["max_tokens"] is None:
                raise ValueError("max_tokens must be a positive integer (the server needs a bound)")
            for key in ("stop", "stop_token_ids"):
                if key in fields and fields[key] is not None:
                    if not isinstance(fields[key], list):
                        raise ValueError(f"\"{key}\" must be a list")
                    fields[key] = tuple(fields[key])
            params = SamplingParams(**fields)
            if params.max_tokens > max_tokens_limit:
                raise ProtocolError("limit", f"max_tokens {params.max_tokens} is above this server's limit "
                                             f"of {max_tokens_limit}", request_id, session)
            return Generate(request_id, session, params, coalesce)
        return {"cancel": Cancel, "snapshot": Snapshot, "close": Close}[kind](request_id, session)
    except (ValueError, TypeError) as e:
        raise ProtocolError("bad_message", f"{kind}: {e}", request_id, session) from None


def _append(msg: dict, request_id: Any, session: str | None) -> Append:
    text, tokens = msg.get("text"), msg.get("tokens")
    if (text is None) == (tokens is None):
        raise ValueError("send exactly one of \"text\" or \"tokens\"")
    if text is not None:
        if not isinstance(text, str) or not text:
            raise ValueError("\"text\" must be a non-empty string")
        return Append(request_id, session, text=text)
    if not isinstance(tokens, list) or not tokens:
        raise ValueError("\"tokens\" must be a non-empty list of token ids")
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, int):
            raise ValueError(f"\"tokens\" must hold integers, got {_short(t)}")
    return Append(request_id, session, tokens=tuple(tokens))


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# Compact separators: events are read by programs, and every byte and
# microsecond counts at tens of thousands of frames per second.
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def event(kind: str, request_id: Any = None, **fields: Any) -> str:
    """One server event as a JSON text frame; `id` is included when the
    request had one."""
    msg = {"type": kind}
    if request_id is not None:
        msg["id"] = request_id
    msg.update(fields)
    return _encode(msg)


class TokenFrames:
    """Encodes the token events of one generation of session `session_id`.

    The frames are built from a prefix made once per generation, not from a
    dict per token: this is the server's hottest path (one frame per token
    per client). The result is the JSON `event` would give, compactly.
    """

    def __init__(self, session_id: str):
        self.session_id = session_id
        sid = _encode(session_id)
        self._token = '{"type":"token","session":' + sid + ',"id":'
        self._tokens = '{"type":"tokens","session":' + sid + ',"ids":['

    def token(self, token: Token) -> str:
        """`{"type":"token","session":S,"id":ID,"text":T[,"finish_reason":R]}`."""
        return f'{self._token}{int(token.id)},"text":{_encode(token.text)}{_finish(token.finish_reason)}}}'

    def tokens(self, tokens: Sequence[Token]) -> str:
        """One frame for `tokens` (1 or more, in order): a `token` event for
        one, else `{"type":"tokens","session":S,"ids":[...],"texts":[...]
        [,"finish_reason":R]}` with the finish_reason of the last token."""
        if len(tokens) == 1:
            return self.token(tokens[0])
        ids = ",".join([str(int(t.id)) for t in tokens])
        texts = ",".join([_encode(t.text) for t in tokens])
        return f'{self._tokens}{ids}],"texts":[{texts}]{_finish(tokens[-1].finish_reason)}}}'


def _finish(reason: str | None) -> str:
    return "" if reason is None else ',"finish_reason":' + _encode(reason)
