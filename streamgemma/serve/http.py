"""The HTTP adapter: the OpenAI API (`/v1/models`, `/v1/completions`,
`/v1/chat/completions`, with server-sent events), `/health` and `/metrics`,
on aiohttp, in the websocket server's process and event loop, on the same
`Engine` (docs/openai.md).

Every request is a short-lived engine session: it starts from the longest
cached prefix of its tokens (`prefix_cache`), prefills the rest, generates,
and leaves its final state in the cache for the next turn. Same bearer
token as the websocket (constant-time compare); `/health` needs none.
"""

from __future__ import annotations

import array
import dataclasses
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator

import anyio
import anyio.to_thread
from aiohttp import web
from aiohttp.http import HttpProcessingError

from ..errors import ServeError, SnapshotError
from ..sampling.params import SamplingParams
from ..session.chat_template import chat_prompt_ids
from ..tokenizer import PIECE_BYTE, PIECE_CONTROL
from ..validate import check_position
from . import http_listen
from .engine import Engine
from .held_sessions import HeldSessions
from .limits import DEFAULT_LIMITS, Limits
from .metrics import CONTENT_TYPE, Metrics
from .openai_api import (
    ApiError,
    ApiRequest,
    ResponseBuilder,
    decode_body,
    engine_error,
    http_error,
    model_list,
    parse_body,
    parse_request,
    too_large,
    usage,
)
from .prefix_cache import DEFAULT_MAX_BYTES, DEFAULT_MEMORY_BYTES, PrefixCache
from .record import SessionRecord
from .streams import TokenStream

log = logging.getLogger("streamgemma.serve.http")

SHUTDOWN_WAIT_S = 1.0  # in-flight requests get this long to finish when the server stops
LONG_PROMPT_CHARS = 4096  # tokenized in a worker thread above this
CLIENT_CHECK_S = 0.25  # while a prompt is prefilled, how often the request's connection is looked at


@dataclasses.dataclass(frozen=True)
class HttpConfig:
    """The HTTP API's settings. port: where it listens (0: any free port).
    model_name: the id `/v1/models` lists and requests name (None:
    "streamgemma"). prefix_cache_bytes / prefix_cache_memory_bytes: bounds
    of the prefix cache in the store (None: 4 GiB in a durable store, 0 in
    the in-memory one, which would only duplicate the memory tier) and in
    host memory (1 GiB); 0 turns a tier off. held_sessions: finished
    requests' sessions kept open for their conversation's next turn
    (`held_sessions`; None: an eighth of the engine's slots, 1 to 8).
    max_requests: requests generating at once (more get HTTP 429)."""

    port: int = 0
    model_name: str | None = None
    prefix_cache_bytes: int | None = None
    prefix_cache_memory_bytes: int = DEFAULT_MEMORY_BYTES
    held_sessions: int | None = None
    max_requests: int = 256

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"the HTTP port must be in 0..65535, got {self.port!r}")
        if self.max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {self.max_requests!r}")
        if self.held_sessions is not None and self.held_sessions < 0:
            raise ValueError(f"held_sessions must be >= 0, got {self.held_sessions!r}")


@dataclasses.dataclass(eq=False)
class _Run:
    """One request's generation: its engine session, stream and counts."""

    es: object
    stream: TokenStream
    prompt_ids: list[int]
    cached: int
    tokens: list = dataclasses.field(default_factory=list)
    finished: bool = False  # ended normally: its session may be held for the next turn


class HttpApi:
    """Serves the HTTP API of `engine` at http://host:port. `server`: the
    websocket `Server` in the same process (its connections are counted in
    /metrics), or None. Start with `await start()` (returns the bound port),
    end with `await stop()`, from the engine's event loop while the engine runs."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", config: HttpConfig = HttpConfig(),
                 token: str | None = None, limits: Limits = DEFAULT_LIMITS, server=None):
        if token is not None and not token.strip():
            raise ValueError("the token is empty: pass None for no authentication")
        self.engine = engine
        self.host = host
        self.port = config.port
        self.config = config
        self.token = token
        self.limits = limits
        self.model_name = config.model_name or "streamgemma"
        store_bytes = config.prefix_cache_bytes
        if store_bytes is None:
            store_bytes = DEFAULT_MAX_BYTES if engine.store.durable else 0
        self.cache = PrefixCache(engine.model, engine.store, store_bytes, config.prefix_cache_memory_bytes)
        held = config.held_sessions
        self.held = HeldSessions(engine, min(8, max(1, engine.max_active // 8)) if held is None else held)
        self.server = server
        self.metrics = Metrics(engine, self.cache, server)
        self._clients_left: set[int] = set()  # id() of streamed requests whose client went away: counted as 499
        self.created = int(time.time())
        self.in_flight = 0
        self.stopping = False
        self._runner: web.AppRunner | None = None
        self._listener = None  # the asyncio server accepting connections (http_listen)
        self._runs: set[_Run] = set()
        self._opening: set = set()  # the engine sessions of requests still prefilling (not yet in _runs)

    @property
    def url(self) -> str:
        return f"http://{http_listen.netloc(self.host, self.port)}/v1"

    @property
    def connections(self) -> int:
        """HTTP connections open now."""
        return http_listen.connections(self._runner)

    def _room(self, uncounted: int) -> bool:
        """Whether a new connection fits the server's limit (shared with the websocket's, if any),
        besides `uncounted` accepted ones not counted yet."""
        if self.server is not None:
            return self.server.open_connections() + uncounted < self.server.max_connections
        return self.connections + uncounted < self.limits.max_connections

    async def start(self) -> int:
        """Listen; the bound port. ServeError if the address cannot be bound."""
        app = web.Application(middlewares=[self._errors], client_max_size=self.limits.max_message_bytes)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{name}", self._model)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        # Bodies are inflated by `decode_body`: aiohttp's own decoding logged a traceback for one that would not.
        runner = http_listen.runner(app, self.limits.idle_timeout, SHUTDOWN_WAIT_S)
        await runner.setup()
        try:
            self._listener = await http_listen.listen(runner, self.host, self.port, self._room)
        except (OSError, OverflowError, UnicodeError) as e:  # (UnicodeError: a name IDNA cannot encode)
            await runner.cleanup()
            raise ServeError(f"cannot listen on {http_listen.netloc(self.host, self.port)} (HTTP API): "
                             f"{http_listen.bind_failure(e)}") from None
        self._runner = runner
        self.port = self._listener.sockets[0].getsockname()[1]
        try:
            await self.cache.refresh()  # entries a previous process left in a durable store
        except Exception as e:  # noqa: BLE001 - a store that cannot be listed only costs cache hits
            log.warning("prefix cache: could not list the store: %s", e)
        http_listen.address_log.info("HTTP API on %s (model %r)", self.url, self.model_name)
        return self.port

    async def stop(self) -> None:
        """Stop listening, end the requests in flight (their sessions are
        closed), and wait for the prefix cache's writes. A no-op once stopped."""
        if self._runner is None:
            return
        self.stopping = True
        for run in list(self._runs):  # their answers end with an error event, not a cut connection
            self.engine.cancel(run.es)
        for es in list(self._opening):  # their prefill ends, and they are answered 503 unavailable
            await self.engine.close(es)
        runner, self._runner = self._runner, None
        self._listener.close()
        await runner.cleanup()
        with anyio.CancelScope(shield=True):
            await self.held.close_all()
            await self.cache.flush()
        self.cache.close()

    # -- plumbing -----------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Every error as OpenAI's `{"error": {...}}` with its status."""
        try:
            response = await handler(request)
        except ApiError as e:
            response = _json(e.body(), e.status)
        except web.HTTPException as e:
            response = _json(http_error(e).body(), e.status)
        except Exception as e:  # noqa: BLE001 - answered, logged
            log.error("HTTP %s %s failed", request.method, request.path, exc_info=e)
            response = _json(ApiError(500, f"the server failed on this request: {type(e).__name__}",
                                      "server_error", "internal").body(), 500)
        resource = request.match_info.route.resource  # (None: no such route)
        status = 499 if id(request) in self._clients_left else response.status
        self._clients_left.discard(id(request))
        self.metrics.requests.labels(resource.canonical if resource else "other", str(status)).inc()
        return response

    def _authorize(self, request: web.Request) -> None:
        if self.token is None:
            return
        given = request.headers.getall("Authorization", [])
        if len(given) == 1:
            scheme, _, presented = given[0].partition(" ")
            # aiohttp decodes header bytes as UTF-8 with surrogateescape: this gives back the bytes sent.
            if scheme.lower() == "bearer" and hmac.compare_digest(presented.encode("utf-8", "surrogateescape"),
                                                                  self.token.encode("utf-8")):
                return
        reason = "more than one Authorization header" if len(given) > 1 else \
            "wrong bearer token" if given else "missing Authorization: Bearer <token> header"
        raise ApiError(401, f"unauthorized: {reason}", "authentication_error", "invalid_api_key")

    async def _body(self, request: web.Request) -> dict:
        limit = self.limits.max_message_bytes
        if request.content_length is not None and request.content_length > limit:
            raise too_large(limit)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large(limit) from None
        except ConnectionError:  # it left mid-body: nothing failed here
            raise ApiError(499, "the client closed the request", code="client_closed") from None
        except (web.RequestPayloadError, HttpProcessingError) as e:  # e.g. a chunked encoding broken
            raise ApiError(400, f"the request body could not be read: {e}", code="invalid_json") from None
        return parse_body(decode_body(raw, request.headers.get("Content-Encoding"), limit))

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model {name[:100]!r} does not exist; this server serves {self.model_name!r}",
                           "invalid_request_error", "model_not_found", "model")

    # -- endpoints ----------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        status = "stopping" if self.stopping else "ok"
        body = {"status": status, "model": self.model_name, "sessions": len(self.engine.sessions),
                "live_sessions": self.engine.active, "http_requests_in_flight": self.in_flight}
        return _json(body, 503 if self.stopping else 200)

    async def _metrics(self, request: web.Request) -> web.Response:
        self._authorize(request)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _models(self, request: web.Request) -> web.Response:
        self._authorize(request)
        return _json(model_list([self.model_name], self.created))

    async def _model(self, request: web.Request) -> web.Response:
        self._authorize(request)
        self._check_model(request.match_info["name"])
        return _json(model_list([self.model_name], self.created)["data"][0])

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        arrived = time.monotonic()
        self._authorize(request)
        req = parse_request(kind, await self._body(request), self.limits.max_tokens, self.limits.default_max_tokens)
        self._check_model(req.model)
        if self.stopping:
            raise ApiError(503, "the server is shutting down", "server_error", "unavailable")
        if self.in_flight >= self.config.max_requests:
            raise ApiError(429, f"{self.in_flight} requests are generating (this server's limit); retry later",
                           "rate_limit_error", "too_many_requests")
        self.in_flight += 1
        try:
            ids = await self._prompt_ids(req)
            run = await self._start(request, req, ids)
            self._runs.add(run)
            try:
                builder = ResponseBuilder(req, self.model_name, self._render_token)
                if req.stream:
                    return await self._stream(request, req, run, builder, arrived)
                return await self._whole(request, req, run, builder, arrived)
            finally:
                self._runs.discard(run)
                with anyio.CancelScope(shield=True):
                    await run.stream.aclose()
                    if run.finished and not self.stopping:
                        await self.held.hold(run.prompt_ids + [t.id for t in run.tokens], run.es)
                    else:
                        await self.engine.close(run.es)
        finally:
            self.in_flight -= 1

    async def _prompt_ids(self, req: ApiRequest) -> list[int]:
        tok = self.engine.model.tokenizer
        vocab = self.engine.model.config.vocab_size
        if req.prompt_ids is not None:
            if max(req.prompt_ids) >= vocab:
                bad = next(t for t in req.prompt_ids if t >= vocab)
                raise ApiError(400, f"prompt holds token id {bad}, outside the vocabulary [0, {vocab})",
                               code="invalid_value", param="prompt")
            return list(req.prompt_ids)
        if tok is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as token ids", code="unsupported",
                           param="messages" if req.kind == "chat" else "prompt")
        if req.kind == "chat":
            work = lambda: chat_prompt_ids(tok, list(req.messages))  # noqa: E731
        else:
            work = lambda: tok.encode(req.prompt_text, add_bos=True)  # noqa: E731
        size = sum(len(t) for _, t in req.messages) if req.kind == "chat" else len(req.prompt_text)
        try:
            return await anyio.to_thread.run_sync(work) if size > LONG_PROMPT_CHARS else work()
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_value", param="messages") from None

    async def _start(self, request: web.Request, req: ApiRequest, ids: list[int]) -> _Run:
        """A session at the longest cached prefix of `ids`, the rest prefilled, generating."""
        params = req.params
        if params.seed is None:  # a restored state's random stream must not repeat the earlier request's
            params = dataclasses.replace(params, seed=secrets.randbits(63))
        try:
            check_position(len(ids) + params.max_tokens, "max_tokens")
            held = await self.held.take(ids)
        except Exception as e:  # noqa: BLE001 - answered with its status
            raise engine_error(e) from None
        if held is not None:  # the conversation's own session, still open: nothing to restore
            try:
                run = await self._run(request, held[1], ids, held[0], params, held=True)
                self.cache.count(held[0])
                return run
            except SnapshotError as e:  # (suspended, and its snapshot is gone or damaged: the cache may hold it)
                log.warning("a held conversation could not be restored (%s); its prefix is looked up instead", e)
        try:
            hit = await self.cache.lookup(ids)
            try:
                # A request's session is never reopened by id: no snapshot at open, no journal.
                es = await self.engine.open(seed=params.seed, contents=hit.contents if hit else None, durable=False)
            except SnapshotError as e:  # (a cache entry another model wrote into a shared store)
                log.warning("prefix cache: entry not usable: %s", e)
                hit, es = None, await self.engine.open(seed=params.seed, durable=False)
        except Exception as e:  # noqa: BLE001 - answered with its status
            raise engine_error(e) from None
        return await self._run(request, es, ids, hit.tokens if hit else 0, params)

    async def _run(self, request: web.Request, es: SessionRecord, ids: list[int], cached: int,
                   params: SamplingParams, held: bool = False) -> _Run:
        """`es` (at `cached` tokens of `ids`) given the rest of them, generating; closed if that fails
        or the client leaves meanwhile (held: a SnapshotError, its state lost, is raised as it is, for
        the caller's fallback)."""
        self._opening.add(es)
        try:
            if self.stopping:  # (`stop` closes the sessions in _opening: this one came after)
                raise ApiError(503, "the server is shutting down", "server_error", "unavailable")
            pending = self.engine.append(es, array.array("i", ids[cached:]))
            while True:  # a long prompt: a client that leaves is not charged the rest of its prefill
                with anyio.move_on_after(CLIENT_CHECK_S):
                    await self.engine.consumed(pending)
                    break
                if _gone(request):
                    raise ApiError(499, "the client closed the request", code="client_closed")
            stream = await self.engine.generate(es, params)
        except BaseException as e:
            with anyio.CancelScope(shield=True):
                await self.engine.close(es)
            if held and isinstance(e, SnapshotError):
                raise
            if isinstance(e, Exception):
                raise engine_error(e) from None
            raise
        finally:
            self._opening.discard(es)
        return _Run(es, stream, ids, cached)

    async def _batches(self, run: _Run, endpoint: str, arrived: float) -> AsyncIterator[list]:
        """The generation's tokens, all those ready at once per batch."""
        first = True
        async for token in run.stream:
            if first:
                self.metrics.time_to_first_token.labels(endpoint).observe(time.monotonic() - arrived)
                first = False
            batch = [token, *run.stream.take_ready()]
            run.tokens += batch
            yield batch

    async def _finish(self, run: _Run) -> dict:
        """Keep the final state in the prefix cache; the usage body."""
        done = run.stream.done
        if done is not None and done.reason != "cancelled":
            run.finished = True
            try:
                contents = await self.engine.capture(run.es)
                await self.cache.keep(run.prompt_ids + [t.id for t in run.tokens], contents)
            except Exception as e:  # noqa: BLE001 - the answer stands without a cache entry
                log.warning("prefix cache: could not keep a state: %s: %s", type(e).__name__, e)
        return usage(len(run.prompt_ids), len(run.tokens), run.cached)

    async def _whole(self, request: web.Request, req: ApiRequest, run: _Run, builder: ResponseBuilder,
                     arrived: float) -> web.Response:
        parts = []
        async for batch in self._batches(run, req.kind, arrived):
            parts += [t.text for t in batch]
            if _gone(request):
                # Its generation is cancelled on the way out; 499 (nginx's "client closed request") is for the metrics.
                raise ApiError(499, "the client closed the request", code="client_closed")
        done = run.stream.done
        if done is None or done.reason == "cancelled":
            raise ApiError(503, "the generation was cancelled (the server is shutting down)", "server_error",
                           "unavailable")
        usage_body = await self._finish(run)
        return _json(builder.response("".join(parts) + self._unfinished(run, done.reason), done.reason, run.tokens,
                                      usage_body))

    async def _stream(self, request: web.Request, req: ApiRequest, run: _Run, builder: ResponseBuilder,
                      arrived: float) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        send = lambda body: response.write(b"data: " + _encode(body).encode("utf-8") + b"\n\n")  # noqa: E731
        try:
            await response.prepare(request)
            try:
                await self._events(request, send, req, run, builder, arrived)
            except ConnectionError:
                raise
            except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in the stream
                await send(engine_error(e).body())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:  # the client has gone: its generation is cancelled on the way out
            log.debug("HTTP client left a stream")
            self._clients_left.add(id(request))  # (the status line may be out: the metrics count 499 all the same)
        return response

    async def _events(self, request: web.Request, send, req: ApiRequest, run: _Run, builder: ResponseBuilder,
                      arrived: float) -> None:
        offset = 0
        if req.kind == "chat":
            await send(builder.chunk("", None, [], 0, first=True))
        async for batch in self._batches(run, req.kind, arrived):
            text = "".join(t.text for t in batch)
            if _gone(request):
                # A write notices a client that left only once buffers fill, and while text is held
                # back (a stop string's possible start) nothing is written at all.
                raise ConnectionError("the client closed the stream")
            if text or req.params.logprobs is not None or req.return_token_ids:
                await send(builder.chunk(text, None, batch, offset))
            offset += len(text)
        done = run.stream.done
        if done is None or done.reason == "cancelled":
            raise ApiError(503, "the generation was cancelled (the server is shutting down)", "server_error",
                           "unavailable")
        usage_body = await self._finish(run)
        tail = self._unfinished(run, done.reason)
        if tail:
            await send(builder.chunk(tail, None, [], offset))
            offset += len(tail)
        await send(builder.chunk(None, done.reason, [], offset))
        if req.include_usage:
            await send(builder.usage_chunk(usage_body))

    def _unfinished(self, run: _Run, reason: str) -> str:
        """An answer cut by max_tokens ends as the decode of prompt and answer does: U+FFFD for each byte
        of a character left unfinished, the prompt's trailing bytes included (the session still holds
        them, should it go on)."""
        tok = self.engine.model.tokenizer
        if reason != "length" or tok is None:
            return ""
        return tok.unfinished(run.prompt_ids + [t.id for t in run.tokens])

    def _render_token(self, token_id: int) -> tuple[str, bytes]:
        """A token's text and bytes for logprobs: a byte-fallback piece (<0xFC>) is its one byte,
        shown as OpenAI shows one that is no character alone ("bytes:\\xfc")."""
        tok = self.engine.model.tokenizer
        if tok is None:
            return "", b""
        kind, piece = tok.piece_kind(token_id)
        if kind == PIECE_BYTE:
            raw = bytes([int(piece[3:5], 16)])
            return (raw.decode() if raw[0] < 0x80 else f"bytes:\\x{raw[0]:02x}"), raw
        if kind == PIECE_CONTROL:  # (no text of its own: "" for all of them, one key in completions' alternatives)
            return piece, piece.encode("utf-8")
        text = tok.decode([token_id])
        return text, text.encode("utf-8")


def _gone(request: web.Request) -> bool:
    """Whether the client of `request` has closed its connection."""
    return request.transport is None or request.transport.is_closing()


_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def _json(body: dict, status: int = 200) -> web.Response:
    # (backslashreplace: an error may quote a lone surrogate the request sent; JSON reads it as an escape)
    return web.Response(body=_encode(body).encode("utf-8", "backslashreplace"), status=status,
                        content_type="application/json")
