"""The websocket protocol's messages (docs/protocol.md): typed requests parsed
and validated from JSON text frames, and the events the server sends back.

Parsing never raises anything but `ProtocolError`, whose `code` and message
go back to the client in an `error` event; the connection survives it.
Wrong types are `bad_message`; a value of the right type outside its range
is `invalid` with the `field` named (the same checks as the Python API's,
from `validate`). Messages never echo untrusted input at length.
"""

from __future__ import annotations

import array
import dataclasses
import json
import types
from collections.abc import Sequence
from typing import Any

from ..errors import InvalidValueError
from ..sampling.params import MAX_LOGPROBS, SamplingParams
from ..session.store import SESSION_ID_PATTERN
from ..types import Token
from ..validate import MAX_POSITION, MAX_STOP_STRINGS, check_int, check_sampling, check_seed, short
from .keys import is_reserved_key

PATH = "/v1/stream"


class ProtocolError(Exception):
    """A request the server refuses. `code` is machine-readable (see
    docs/protocol.md); `request_id` echoes the client's id when known."""

    def __init__(self, code: str, message: str, request_id: Any = None, session: str | None = None,
                 field: str | None = None):
        super().__init__(message)
        self.code = code
        self.request_id = request_id
        self.session = session
        self.field = field  # the offending field, for `invalid`


@dataclasses.dataclass(frozen=True)
class Open:
    """Open a new session (session None) or resume a stored/detached one."""

    id: Any = None
    session: str | None = None
    seed: int | None = None
    since: int | None = None  # the last position the client saw: the reply carries what came after


@dataclasses.dataclass(frozen=True)
class Append:
    """Input for a session: text or token ids (exactly one is set)."""

    id: Any = None
    session: str | None = None
    text: str | None = None
    tokens: array.array | None = None  # int32 ids


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
                    "presence_penalty", "stop", "stop_token_ids", "seed", "logprobs")
_ALLOWED = {
    "open": {"type", "id", "session", "seed", "since"},
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
        raise ProtocolError("bad_json", f"the frame is not valid JSON: {short(str(e), 200)}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_message", "a message is a JSON object with a \"type\"")
    request_id = msg.get("id")
    if request_id is not None and not (isinstance(request_id, (str, int)) and not isinstance(request_id, bool)):
        raise ProtocolError("bad_message", "\"id\" must be a string or an integer")
    if isinstance(request_id, str) and len(request_id) > 200:
        raise ProtocolError("bad_message", "\"id\" is longer than 200 characters")
    if isinstance(request_id, str) and not _is_unicode(request_id):
        raise ProtocolError("bad_message", "\"id\" is not valid Unicode (a lone surrogate)")
    kind = msg.get("type")
    if not isinstance(kind, str) or kind not in _ALLOWED:  # type first: a list or object is unhashable
        raise ProtocolError("unknown_type", f"unknown message type {short(kind)}; expected one of "
                                            f"{', '.join(sorted(_ALLOWED))}", request_id)
    unknown = set(msg) - _ALLOWED[kind]
    if unknown:
        names = ", ".join(short(k, 30) for k in sorted(unknown)[:5])
        raise ProtocolError("bad_message", f"{kind}: unknown fields {names}", request_id)
    session = msg.get("session")
    # (A prefix-cache key shares the store but is not a session: no client may open or overwrite it.)
    if session is not None and not (isinstance(session, str) and SESSION_ID_PATTERN.fullmatch(session)
                                    and not is_reserved_key(session)):
        raise ProtocolError("bad_message", "\"session\" must be a session id (1-200 ASCII letters, digits, "
                                           "'_', '-', '.')", request_id)
    try:
        if kind == "open":
            since = msg.get("since")
            if since is not None and (session is None or isinstance(since, bool) or not isinstance(since, int)
                                      or not 0 <= since < MAX_POSITION):
                raise InvalidValueError("since", "\"since\" is a position (an integer in [0, 2**62)) of the "
                                                 "session being opened")
            if session is not None and msg.get("seed") is not None:  # (it was ignored)
                raise InvalidValueError("seed", "\"seed\" seeds a new session; a resumed one goes on with its "
                                                "sampler's stream (generate's \"seed\" reseeds it)")
            return Open(request_id, session, check_seed(msg.get("seed")), since)
        if kind == "append":
            return _append(msg, request_id, session)
        if kind == "generate":
            return _generate(msg, request_id, session, max_tokens_limit, default_max_tokens)
        return {"cancel": Cancel, "snapshot": Snapshot, "close": Close}[kind](request_id, session)
    except InvalidValueError as e:
        raise ProtocolError("invalid", f"{kind}: {e}", request_id, session, e.field) from None
    except (ValueError, TypeError) as e:
        raise ProtocolError("bad_message", f"{kind}: {e}", request_id, session) from None


def _generate(msg: dict, request_id: Any, session: str | None, max_tokens_limit: int,
              default_max_tokens: int) -> Generate:
    coalesce = msg.get("coalesce", False)
    if not isinstance(coalesce, bool):
        raise ValueError(f"\"coalesce\" must be true or false, got {short(coalesce)}")
    fields = {k: msg[k] for k in _SAMPLING_FIELDS if k in msg}
    fields.setdefault("max_tokens", min(default_max_tokens, max_tokens_limit))  # (a default is never refused)
    if fields["max_tokens"] is None:
        raise ValueError("max_tokens must be a positive integer (the server needs a bound)")
    for key in ("stop", "stop_token_ids"):
        if key in fields and fields[key] is not None:
            if not isinstance(fields[key], list):
                raise ValueError(f"\"{key}\" must be a list")
            fields[key] = tuple(fields[key])
    if len(fields.get("stop") or ()) > MAX_STOP_STRINGS:
        raise InvalidValueError("stop", f"at most {MAX_STOP_STRINGS} stop strings")
    for text in fields.get("stop") or ():
        if not isinstance(text, str):
            raise ValueError(f"\"stop\" must hold strings, got {short(text)}")
        if not text or not _is_unicode(text):
            raise InvalidValueError("stop", "stop strings must be non-empty, valid Unicode (no lone surrogate)")
    if fields.get("logprobs") is not None:
        check_int("logprobs", fields["logprobs"], 0, MAX_LOGPROBS)
    # Types and ranges of the numbers, as the Python API checks them.
    check_sampling(types.SimpleNamespace(**{**_DEFAULTS, **fields}))
    params = SamplingParams(**fields)
    if params.max_tokens > max_tokens_limit:
        raise ProtocolError("limit", f"max_tokens {params.max_tokens} is above this server's limit "
                                     f"of {max_tokens_limit}", request_id, session, "max_tokens")
    return Generate(request_id, session, params, coalesce)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingParams)}


def _append(msg: dict, request_id: Any, session: str | None) -> Append:
    text, tokens = msg.get("text"), msg.get("tokens")
    if (text is None) == (tokens is None):
        raise ValueError("send exactly one of \"text\" or \"tokens\"")
    if text is not None:
        if not isinstance(text, str) or not text:
            raise ValueError("\"text\" must be a non-empty string")
        if not _is_unicode(text):
            raise InvalidValueError("text", "the text is not valid Unicode (it holds a lone surrogate), so it "
                                            "cannot be tokenized")
        return Append(request_id, session, text=text)
    if not isinstance(tokens, list) or not tokens:
        raise ValueError("\"tokens\" must be a non-empty list of token ids")
    if set(map(type, tokens)) != {int}:  # (one pass in C; bools and floats are not ids)
        bad = next(t for t in tokens if type(t) is not int)
        raise ValueError(f"\"tokens\" must hold integers, got {short(bad)}")
    try:
        ids = array.array("i", tokens)
    except OverflowError:
        raise InvalidValueError("tokens", "\"tokens\" holds an id outside the int32 range; token ids are in "
                                          "[0, vocabulary size)") from None
    return Append(request_id, session, tokens=ids)


def _is_unicode(text: str) -> bool:
    """Whether `text` can be encoded as UTF-8 (JSON lets lone surrogates through)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


# Compact separators: events are read by programs, and every byte and
# microsecond counts at tens of thousands of frames per second.
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
# What `_encode` does for a str, without its dispatch: the token texts' path (C where available).
_encode_text = json.encoder.encode_basestring


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
        """`{"type":"token","session":S,"id":ID,"text":T[,"finish_reason":R]
        [,"logprob":L,"top_logprobs":[[ID,L],...]]}` (logprobs when asked for)."""
        scored = "" if token.logprob is None else \
            f',"logprob":{_encode(token.logprob)},"top_logprobs":{_encode(token.top_logprobs)}'
        return f'{self._token}{int(token.id)},"text":{_encode_text(token.text)}{_finish(token.finish_reason)}{scored}}}'

    def tokens(self, tokens: Sequence[Token]) -> str:
        """One frame for `tokens` (1 or more, in order): a `token` event for
        one, else `{"type":"tokens","session":S,"ids":[...],"texts":[...]
        [,"finish_reason":R][,"logprobs":[...],"top_logprobs":[...]]}` with
        the finish_reason of the last token."""
        if len(tokens) == 1:
            return self.token(tokens[0])
        ids = ",".join([str(int(t.id)) for t in tokens])
        texts = ",".join([_encode_text(t.text) for t in tokens])
        scored = "" if tokens[0].logprob is None else (f',"logprobs":{_encode([t.logprob for t in tokens])}'
                                                       f',"top_logprobs":{_encode([t.top_logprobs for t in tokens])}')
        return f'{self._tokens}{ids}],"texts":[{texts}]{_finish(tokens[-1].finish_reason)}{scored}}}'


def _finish(reason: str | None) -> str:
    return "" if reason is None else ',"finish_reason":' + _encode(reason)
