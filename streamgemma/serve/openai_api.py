"""The OpenAI HTTP API's shapes (docs/openai.md): request bodies of
`/v1/completions` and `/v1/chat/completions` parsed and validated into a
typed `ApiRequest`, errors as `ApiError` (the `{"error": {...}}` body and
its HTTP status; the engine's and aiohttp's errors mapped to them), and the
response and stream-chunk bodies. No I/O here:
`http` is the adapter that serves them.

Ranges are checked by `validate`, as the Python API and the websocket
protocol check them, so all three refuse the same values with the same
message. Fields that would change what a request means and that we do not
implement (n > 1, tools, logit_bias, echo, ...) are refused, never ignored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time
import types
import zlib
from collections.abc import Mapping
from typing import Any

from ..errors import CapacityError, InvalidValueError, SnapshotError, StoppedError, StoreUnavailable
from ..sampling.params import MAX_LOGPROBS, SamplingParams
from ..session.chat_template import ChatMessage, normalize_messages
from ..validate import MAX_STOP_STRINGS, check_int, check_sampling, short, type_error
from .record import EngineError

log = logging.getLogger("streamgemma.serve.http")


class ApiError(Exception):
    """A request answered with an error: HTTP `status`, and the body
    `{"error": {"message", "type", "code", "param"}}` OpenAI's clients read."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status = status
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "code": self.code, "param": self.param}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


@dataclasses.dataclass(frozen=True)
class ApiRequest:
    """A validated completion or chat request. Exactly one of `prompt_text`,
    `prompt_ids`, `messages` is set. return_token_ids (an extension, as
    vLLM's): choices carry the generated ids as "token_ids"."""

    kind: str  # "chat" or "completion"
    model: str | None
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    prompt_text: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    messages: tuple[ChatMessage, ...] | None = None


# Fields OpenAI defines that change nothing here (accepted and ignored).
_IGNORED = {"user", "safety_identifier", "metadata", "store", "service_tier", "parallel_tool_calls", "prediction",
            "modalities", "reasoning_effort", "verbosity", "web_search_options", "prompt_cache_key",
            "prompt_cache_retention"}
_COMMON = {"return_token_ids", "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
           "presence_penalty", "frequency_penalty", "stop", "seed", "n", "stream", "stream_options",
           "logit_bias", "logprobs"} | _IGNORED
_FIELDS = {
    "completion": _COMMON | {"prompt", "echo", "suffix", "best_of"},
    "chat": _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
                       "function_call", "response_format"},
}


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than this server's limit of {limit} bytes",
                    "invalid_request_error", "request_too_large")


def decode_body(raw: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as it was before its Content-Encoding (gzip, deflate, or none),
    at most `limit` bytes of it (a small body may inflate to gigabytes)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return raw
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise ApiError(415, f"Content-Encoding {short(encoding, 40)} is not supported: send gzip, deflate or none",
                       code="unsupported_encoding")
    # deflate is zlib's format, but some clients send the raw stream (a zlib stream's first byte ends in 8)
    wbits = 16 + zlib.MAX_WBITS if "gzip" in encoding else zlib.MAX_WBITS if raw[:1] and raw[0] & 0xF == 8 \
        else -zlib.MAX_WBITS
    parts, size, rest = [], 0, raw
    while True:  # a gzip body may hold several members, one after another
        inflate = zlib.decompressobj(wbits)
        try:
            part = inflate.decompress(rest, limit + 1 - size)
        except zlib.error as e:
            raise ApiError(400, f"the request body could not be decoded as {encoding}: {e}",
                           code="invalid_json") from None
        parts.append(part)
        size += len(part)
        if size > limit or inflate.unconsumed_tail:
            raise too_large(limit)
        if not inflate.eof:
            raise ApiError(400, f"the request body could not be decoded as {encoding}: it ends early",
                           code="invalid_json")
        rest = inflate.unused_data
        if not rest:
            return b"".join(parts)
        if "gzip" not in encoding or rest[:2] != b"\x1f\x8b":
            raise ApiError(400, f"the request body has {len(rest)} bytes after its {encoding} data",
                           code="invalid_json")


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body; ApiError 400 otherwise."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {short(str(e), 200)}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def parse_request(kind: str, body: Mapping, max_tokens_limit: int, default_max_tokens: int) -> ApiRequest:
    """An `ApiRequest` of `kind` ("chat" or "completion") from a parsed body."""
    unknown = set(body) - _FIELDS[kind]
    if unknown:
        name = sorted(unknown)[0]
        raise bad_request(f"unknown field {short(name, 40)} (this server implements the fields listed in "
                          "docs/openai.md)", param=_printable(name)[:40], code="unknown_field")
    try:
        return _parse(kind, body, max_tokens_limit, default_max_tokens)
    except ApiError:
        raise
    except InvalidValueError as e:
        raise bad_request(str(e), param=e.field) from None
    except (TypeError, ValueError) as e:
        raise bad_request(str(e), param=getattr(e, "field", None),
                          code="invalid_type" if isinstance(e, TypeError) else "invalid_value") from None


def _parse(kind: str, body: Mapping, max_tokens_limit: int, default_max_tokens: int) -> ApiRequest:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise type_error("model", "model must be a string")
    _refuse_unsupported(kind, body)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, Mapping)
                                    and set(options) <= {"include_usage", "include_obfuscation"}):
        raise type_error("stream_options", "stream_options must be an object with at most \"include_usage\" "
                                           "and \"include_obfuscation\" (ignored)")
    if options is not None and not stream:  # (as OpenAI: any stream_options, not just include_usage)
        raise bad_request("stream_options is only allowed with stream: true", param="stream_options")
    include_usage = _bool(options or {}, "include_usage")
    params = _sampling(kind, body, max_tokens_limit, default_max_tokens)
    shape = dict(stream=stream, include_usage=include_usage, return_token_ids=_bool(body, "return_token_ids"))
    if kind == "chat":
        try:
            messages = tuple(normalize_messages(body.get("messages") or []))
        except (TypeError, ValueError) as e:
            raise bad_request(str(e), param="messages",
                              code="invalid_type" if isinstance(e, TypeError) else "invalid_value") from None
        for message in messages:
            _check_unicode(message[1], "messages")
        return ApiRequest(kind, model, params, messages=messages, **shape)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt is empty", param="prompt")
        _check_unicode(prompt, "prompt")
        return ApiRequest(kind, model, params, prompt_text=prompt, **shape)
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        for t in (min(prompt), max(prompt)):  # plain ints: the extremes bound them all (a loop of checks cost ms)
            check_int("prompt", t, 0, (1 << 31) - 1)
        return ApiRequest(kind, model, params, prompt_ids=tuple(prompt), **shape)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request("a batch of prompts is not supported: send one prompt per request", param="prompt",
                          code="unsupported")
    raise bad_request("prompt must be a non-empty string or a non-empty list of token ids", param="prompt")


def _refuse_unsupported(kind: str, body: Mapping) -> None:
    for name in ("n", "best_of"):
        if body.get(name) is not None and type(body[name]) is not int:  # (True == 1)
            raise bad_request(f"{name} must be an integer", param=name, code="invalid_type")
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("only n = 1 is supported (one choice per request)", param="n", code="unsupported")
    if body.get("best_of") not in (None, 1):
        raise bad_request("only best_of = 1 is supported", param="best_of", code="unsupported")
    if body.get("echo") not in (None, False):
        raise bad_request("echo is not supported", param="echo", code="unsupported")
    if body.get("suffix") is not None:
        raise bad_request("suffix is not supported", param="suffix", code="unsupported")
    if body.get("logit_bias"):
        raise bad_request("logit_bias is not supported", param="logit_bias", code="unsupported")
    if body.get("frequency_penalty") not in (None, 0, 0.0):
        raise bad_request("frequency_penalty is not supported (presence_penalty and the repetition_penalty "
                          "extension are)", param="frequency_penalty", code="unsupported")
    for name in ("tools", "functions", "tool_choice", "function_call"):
        if body.get(name) not in (None, [], "none"):
            raise bad_request(f"{name} is not supported (no tool calling)", param=name, code="unsupported")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        raise bad_request("only response_format {\"type\": \"text\"} is supported", param="response_format",
                          code="unsupported")


def _sampling(kind: str, body: Mapping, max_tokens_limit: int, default_max_tokens: int) -> SamplingParams:
    fields: dict[str, Any] = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "seed"):
        if body.get(name) is not None:
            fields[name] = body[name]
    max_tokens = body.get("max_completion_tokens") if kind == "chat" else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    fields["max_tokens"] = min(default_max_tokens, max_tokens_limit) if max_tokens is None else max_tokens
    param = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    check_int(param, fields["max_tokens"], 1, None)
    if param == "max_completion_tokens" and body.get("max_tokens") is not None:  # both sent: both valid
        check_int("max_tokens", body["max_tokens"], 1, max_tokens_limit)
    if fields["max_tokens"] > max_tokens_limit:
        raise bad_request(f"{param} {fields['max_tokens']} is above this server's limit of {max_tokens_limit}",
                          param=param)
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise type_error("stop", "stop must be a string or a list of strings")
        if len(stop) > MAX_STOP_STRINGS:
            raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
        for s in stop:
            if not s:
                raise bad_request("stop strings must be non-empty", param="stop")
            _check_unicode(s, "stop")
        fields["stop"] = tuple(stop)
    logprobs = _logprobs(kind, body)
    if logprobs is not None:
        fields["logprobs"] = logprobs
    check_sampling(types.SimpleNamespace(**{**_DEFAULTS, **fields}))
    return SamplingParams(**fields)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingParams)}


def _logprobs(kind: str, body: Mapping) -> int | None:
    """The number of alternatives per token, or None (off)."""
    if kind == "completion":
        value = body.get("logprobs")
        if value is None:
            return None
        return check_int("logprobs", value, 0, MAX_LOGPROBS)
    on = _bool(body, "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        check_int("top_logprobs", top, 0, MAX_LOGPROBS)
        if not on:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    return (top or 0) if on else None


def _bool(body: Mapping, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise type_error(name, f"{name} must be true or false, got {short(value)}")
    return value


def _check_unicode(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{param} is not valid Unicode (a lone surrogate)", param=param) from None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


# -- responses -----------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def model_list(names: list[str], created: int) -> dict:
    return {"object": "list",
            "data": [{"id": n, "object": "model", "created": created, "owned_by": "streamgemma"} for n in names]}


class ResponseBuilder:
    """The bodies of one request's answer: the whole response, or its
    stream chunks. `render_token(id)` gives a token's (text, bytes) for logprobs."""

    def __init__(self, request: ApiRequest, model_name: str, render_token):
        self.request = request
        self.kind = request.kind
        self.id = new_id(request.kind)
        self.created = int(time.time())
        self.model = model_name
        self.render_token = render_token

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def response(self, text: str, finish_reason: str | None, tokens: list, usage_body: dict) -> dict:
        logprobs = self.logprobs(tokens, 0) if self.request.params.logprobs is not None else None
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        if self.request.return_token_ids:
            choice["token_ids"] = [t.id for t in tokens]
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [choice], "usage": usage_body}

    def chunk(self, text: str | None, finish_reason: str | None, tokens: list, offset: int,
              first: bool = False) -> dict:
        """One stream chunk carrying `text` (None: no content, e.g. the role
        chunk or the end) and the logprobs of `tokens`; `offset`: characters
        of text sent before it (completions' text_offset)."""
        logprobs = (self.logprobs(tokens, offset) if self.request.params.logprobs is not None and tokens
                    else None)
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
            body = {**self._head("text_completion"), "choices": [choice]}
        if self.request.return_token_ids:
            choice["token_ids"] = [t.id for t in tokens]
        if self.request.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, usage_body: dict) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage_body}

    def logprobs(self, tokens: list, offset: int) -> dict:
        """The `logprobs` object of a choice (OpenAI's chat or completions
        shape) for `tokens` (`Token`s with logprob set)."""
        if self.kind == "chat":
            content = []
            for t in tokens:
                text, raw = self.render_token(t.id)
                content.append({"token": text, "logprob": t.logprob, "bytes": list(raw),
                                "top_logprobs": [self._top(i, lp) for i, lp in t.top_logprobs or ()]})
            return {"content": content, "refusal": None}
        texts, offsets = [], []
        for t in tokens:
            offsets.append(offset)
            offset += len(t.text)
            texts.append(self.render_token(t.id)[0])
        tops = [{self.render_token(i)[0]: lp for i, lp in t.top_logprobs or ()} for t in tokens]
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens], "top_logprobs": tops,
                "text_offset": offsets}

    def _top(self, token_id: int, logprob: float) -> dict:
        text, raw = self.render_token(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}


def _printable(name: object) -> str:
    """A field name as UTF-8 can carry it (a lone surrogate escaped), for an error's `param`."""
    return str(name).encode("utf-8", "backslashreplace").decode("utf-8")


def http_error(e) -> ApiError:
    """aiohttp's own refusals (a web.HTTPException: no such route, wrong method, body too large) in OpenAI's shape."""
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    message = {404: "no such endpoint (see docs/openai.md)", 405: "this endpoint does not take that method",
               413: "the request body is too large"}.get(e.status, e.reason)
    return ApiError(e.status, message, "invalid_request_error", codes.get(e.status, "http_error"))


def engine_error(e: Exception) -> ApiError:
    """An engine or validation error as the API's error."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, EngineError):
        if e.code == "capacity":
            return ApiError(503, str(e), "server_error", "capacity")
        if e.code == "limit":
            return ApiError(429, str(e), "rate_limit_error", "limit")
        if e.code == "closed":
            return ApiError(503, str(e), "server_error", "unavailable")
        return ApiError(500, str(e), "server_error", e.code)
    if isinstance(e, CapacityError):
        return ApiError(503, str(e), "server_error", "capacity")
    if isinstance(e, StoreUnavailable):
        return ApiError(503, str(e), "server_error", "store_unavailable")
    if isinstance(e, SnapshotError):  # (a state of the server's own: no fault of the request)
        log.error("an HTTP request could not restore a stored state: %s", e)
        return ApiError(500, "the server could not restore a stored state", "server_error", "internal")
    if isinstance(e, InvalidValueError):
        return ApiError(400, str(e), code="invalid_value", param=e.field)
    if isinstance(e, (ValueError, TypeError, StoppedError)):
        return ApiError(400, str(e), code="invalid_value")
    log.error("an HTTP request failed", exc_info=e)
    return ApiError(500, f"the server failed on this request: {type(e).__name__}", "server_error", "internal")
