"""`Session`: one conversation's state in the pool, advanced token by token
(`step`), many tokens at a time (`feed`), or by sampling (`generate`)."""

from __future__ import annotations

import array
import functools
import math
import numbers
import os
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable, Iterator, Sequence

import torch

from . import snapshot as snapshot_format
from ..errors import StoppedError
from ..sampling.philox import STATE_BYTES as RNG_STATE_BYTES, RandomStream
from ..sampling.sampler import PendingIds, SampleRow, sample_rows
from ..sampling.params import SamplingParams
from ..sampling.stops import StopStrings
from .store import write_file_atomic
from ..tokenizer import END_OF_TURN, Detokenizer
from ..types import Token

if TYPE_CHECKING:
    from .model import Model

# Token ids a session remembers, for repetition/presence penalties and to
# rebuild the detokenizer after a snapshot. Fixed so a session's memory does
# not grow with its length: penalties see the last 1024 tokens only.
RECENT_IDS_WINDOW = 1024
MAX_PENDING_BYTES = 3  # a UTF-8 character is at most 4 bytes; the 4th completes it


class RecentIds:
    """The last `capacity` token ids in a ring preallocated at creation, so its
    size does not depend on how many ids went through it."""

    def __init__(self, capacity: int = RECENT_IDS_WINDOW, ids: Iterable[int] = ()):
        self.capacity = capacity
        self._ring = array.array("q", bytes(8 * capacity))
        self._count = 0  # ids ever added (the ring holds the last min(count, capacity))
        self.extend(ids)

    def extend(self, ids: Iterable[int]) -> None:
        for i in ids:
            self._ring[self._count % self.capacity] = i
            self._count += 1

    def append(self, i: int) -> None:
        self._ring[self._count % self.capacity] = i
        self._count += 1

    def tensor(self) -> torch.Tensor:
        """The ids as an int64 CPU tensor [len(self)] in ring order (not oldest
        first), sharing memory with the ring: copy it before the next append."""
        n = len(self)
        if n == 0:
            return torch.empty(0, dtype=torch.int64)
        return torch.frombuffer(self._ring, dtype=torch.int64, count=n)

    def __len__(self) -> int:
        return min(self._count, self.capacity)

    def __iter__(self) -> Iterator[int]:
        """Oldest first."""
        start = self._count - len(self)
        return (self._ring[k % self.capacity] for k in range(start, self._count))

    def copy(self) -> "RecentIds":
        return RecentIds(self.capacity, self)

    @property
    def nbytes(self) -> int:
        return self._ring.itemsize * len(self._ring)


def check_token_ids(ids: Iterable, vocab_size: int) -> list[int]:
    """`ids` as a list of ints. TypeError names an entry that is not an integer
    (one-element integer tensors are accepted); ValueError names an id outside
    [0, vocab_size)."""
    out = []
    for i, t in enumerate(ids):
        if isinstance(t, torch.Tensor) and t.numel() == 1 and not t.is_floating_point():
            t = int(t.item())
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"token at index {i} is {t!r} ({type(t).__name__}); expected an int")
        if not 0 <= int(t) < vocab_size:
            raise ValueError(f"token id {int(t)} at index {i} is outside the vocabulary [0, {vocab_size})")
        out.append(int(t))
    return out


class Session:
    """A live conversation. Its state has a fixed size (one slot of the model's
    state pool plus a few kilobytes on the host) whatever the number of tokens
    consumed.

    Create with `model.session()`; release with `close()` (or a `with` block;
    the slot is also released when the session is garbage collected).
    A session is driven by one caller at a time; sessions of one model may be
    driven from different threads.
    """

    def __init__(self, model: "Model", slot: int, seed: int | None = None):
        self.model = model
        self.slot = slot
        self.seed = seed
        self._closed = False
        self._recent = RecentIds()
        tok = model.tokenizer
        self._detok: Detokenizer | None = tok.detokenizer() if tok is not None else None
        # Ids below this have text (a model may have spare embedding rows beyond the tokenizer).
        self._text_vocab = tok.vocab_size if tok is not None else 0
        # The sampler's counter-based stream: (seed, counter), seed from `seed` or the OS's entropy.
        self._rng = RandomStream.seeded(seed)
        self._logits: torch.Tensor | None = None  # float32 [vocab] after the last consumed token
        self._stopped_by: str | None = None  # the stop that ended the last generation, until new input
        # The user metadata of the snapshot this session was restored from.
        self.snapshot_metadata: dict = {}

    # -- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        """Release this session's slot. Further calls raise."""
        if not self._closed:
            self._closed = True
            self._logits = None
            with self.model.lock:
                self.model.pool.release(self.slot)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the pool may already be gone
            pass

    def __repr__(self) -> str:
        return f"Session(position={self.position}{', closed' if self._closed else ''})"

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this session is closed")

    def reset(self) -> None:
        """Back to position 0: empty state, no history. A session created with
        a seed samples as if new again; one without keeps its random stream."""
        self._check_open()
        with self.model.lock:
            self.model.pool.reset(self.slot)
        self._recent = RecentIds()
        tok = self.model.tokenizer
        self._detok = tok.detokenizer() if tok is not None else None
        self._logits = None
        self._stopped_by = None
        if self.seed is not None:
            self._rng = RandomStream.seeded(self.seed)

    def fork(self) -> "Session":
        """An independent copy: same state, position, next-token logits, sampler
        RNG state and detokenizer state, in a new slot. Either can then go on
        without affecting the other."""
        self._check_open()
        with self.model.lock:
            slot = self.model.pool.allocate()
            self.model.pool.copy_slot(self.slot, slot)
        child = Session(self.model, slot, seed=self.seed)
        child._recent = self._recent.copy()
        child._detok = self._detok.copy() if self._detok is not None else None
        child._rng = self._rng.copy()
        child._logits = self._logits.clone() if self._logits is not None else None
        child._stopped_by = self._stopped_by
        return child

    # -- host-side state beyond the pool (saved in snapshots) ------------------------------
    def _extra_state(self) -> dict:
        """Session state that lives outside the pool, as msgpack-ready values:
        {"rng": bytes (the sampler's stream, `RandomStream.to_bytes`: b"PHX1" +
        seed + counter, 20 bytes), "detok_pending": bytes (UTF-8
        bytes not yet emitted), "recent_ids": list[int] (the last
        RECENT_IDS_WINDOW token ids, oldest first), "logits": bytes | None
        (float32 next-token logits [vocab], so a restored session can generate
        at once), "stopped": str | None (the stop that ended the last
        generation)}. Snapshots store it verbatim."""
        logits = None
        if self._logits is not None:
            logits = self._logits.detach().float().cpu().contiguous().numpy().tobytes()
        return {
            "rng": self._rng.to_bytes(),
            "detok_pending": bytes(self._detok.pending) if self._detok is not None else b"",
            "recent_ids": list(self._recent),
            "logits": logits,
            "stopped": self._stopped_by,
        }

    def _restore_extra_state(self, extra: dict) -> None:
        """Inverse of `_extra_state` (values already validated by the caller).

        The sampler's stream continues exactly, on any device (its noise is a
        function of (seed, counter) alone). An `rng` of nil keeps the stream
        this session was created with. The torch.Generator state of an older
        snapshot cannot be continued: the stream is seeded from its bytes
        (`RandomStream.from_bytes`: deterministic, not the draws the original
        would have made). ValueError for malformed PHX1 bytes."""
        rng = extra["rng"]
        if rng is not None:
            self._rng = RandomStream.from_bytes(rng)
        self._recent = RecentIds(RECENT_IDS_WINDOW, [int(i) for i in extra["recent_ids"]])
        tok = self.model.tokenizer
        if tok is not None:
            text_ids = [i for i in self._recent if i < tok.vocab_size]
            self._detok = Detokenizer.resume(tok, text_ids, bytes(extra["detok_pending"]), RECENT_IDS_WINDOW)
        logits = extra.get("logits")
        self._logits = None if logits is None else \
            torch.frombuffer(bytearray(logits), dtype=torch.float32).to(self.model.device)
        self._stopped_by = extra.get("stopped")

    def state_bytes(self) -> int:
        """Bytes this session holds: its slot of the state pool (device), the
        next-token logits, and host state (the random stream as a snapshot
        stores it, recent-id ring, pending detokenizer bytes at their bound).
        Constant over the session's life."""
        logits = self.model.config.vocab_size * 4
        return self.model.pool.slot_bytes() + logits + RNG_STATE_BYTES + self._recent.nbytes + MAX_PENDING_BYTES

    # -- snapshots ---------------------------------------------------------------------
    def snapshot(self, metadata: dict[str, Any] | None = None) -> bytes:
        """This session's complete state as bytes (format v1, see
        docs/snapshot-format.md): the state tensors (attention rings only as far
        as filled), the position, the sampler and detokenizer state, and
        `metadata`, a dict with str keys of None/bool/int/float/str/bytes/list/
        dict values (at most 1 MiB as msgpack; SnapshotMetadataError otherwise).
        `model.restore(blob)` continues exactly where this session is."""
        return snapshot_format.encode_contents(self._capture(metadata))

    def _capture(self, metadata: dict[str, Any] | None = None) -> snapshot_format.SnapshotContents:
        """`snapshot` before encoding: the state copied to host memory
        (`model._restore_contents` continues from it). The engine suspends
        sessions with this and encodes in the background."""
        self._check_open()
        return snapshot_format.capture(self.model.pool, self.slot, fingerprint=self.model.fingerprint,
                                       extra=self._extra_state(), seed=self.seed, metadata=metadata)

    def save(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> None:
        """Write `snapshot(metadata)` to `path` atomically: a reader (or a crash)
        sees the previous file or the complete new one, never a partial one.
        Restore with `model.restore_file(path)`."""
        write_file_atomic(path, self.snapshot(metadata))

    # -- state -----------------------------------------------------------------------
    @property
    def position(self) -> int:
        """Tokens consumed so far (the absolute position of the next token)."""
        return self.model.pool.positions[self.slot]

    @property
    def recent_ids(self) -> list[int]:
        """The last RECENT_IDS_WINDOW token ids consumed, oldest first."""
        return list(self._recent)

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        return check_token_ids(ids, self.model.config.vocab_size)

    def _consumed(self, ids: list[int], logits: torch.Tensor) -> str:
        """Record ids the pool just consumed; returns the text they complete."""
        if len(ids) == 1:
            return self._consumed_one(ids[0], logits)
        self._recent.extend(ids)
        self._logits = logits
        self._stopped_by = None
        if self._detok is None:
            return ""
        # Ids beyond the tokenizer (a model may have spare embedding rows) have no text.
        n = self.model.tokenizer.vocab_size
        return "".join(self._detok.push(i) for i in ids if i < n)

    def _consumed_one(self, token: int, logits: torch.Tensor) -> str:
        """`_consumed([token], logits)`: the per-token path of generation, kept lean."""
        self._recent.append(token)
        self._logits = logits
        self._stopped_by = None
        detok = self._detok
        if detok is None or token >= self._text_vocab:
            return ""
        return detok.push(token)

    def step(self, token_id: int) -> torch.Tensor:
        """Consume one token; return float32 logits [vocab] (on the model's
        device) for the next token."""
        self._check_open()
        (token,) = self._check_ids([token_id])
        with self.model.lock:
            logits = self.model.decode([self.slot], [token])[0].clone()  # decode's buffer is reused
        self._consumed([token], logits)
        return logits

    def feed(self, ids_or_text: Sequence[int] | str, add_bos: bool | None = None) -> torch.Tensor:
        """Consume many tokens with the parallel path (chunked, so any length
        runs in bounded memory); return float32 logits [vocab] after the last.

        Text is tokenized with the model's tokenizer; BOS is prepended when
        add_bos is True, or when it is None (default) and the session is at
        position 0. Token ids are consumed as given.
        """
        self._check_open()
        if isinstance(ids_or_text, str):
            tok = self.model.tokenizer
            if tok is None:
                raise ValueError("feed(text) needs a tokenizer, and this model has none; pass token ids")
            if not ids_or_text:
                raise ValueError("feed() got an empty string: there is nothing to consume")
            ids = tok.encode(ids_or_text, add_bos=self.position == 0 if add_bos is None else add_bos)
        else:
            if isinstance(ids_or_text, torch.Tensor):
                ids_or_text = ids_or_text.reshape(-1).tolist()
            ids = self._check_ids(ids_or_text)
        if not ids:
            raise ValueError("feed() got no tokens")
        with self.model.lock:
            logits = self.model.prefill(self.slot, ids)
        self._consumed(ids, logits)
        return logits

    # -- generation --------------------------------------------------------------------
    def generate(self, max_tokens: int | None = 256, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 presence_penalty: float = 0.0, stop: Sequence[str] | str = (),
                 stop_token_ids: Sequence[int] | None = None, seed: int | None = None) -> Iterator[Token]:
        """Sample tokens one at a time, consuming each, and yield them as `Token`s.

        Arguments are those of `SamplingParams` (validated here, before any
        work). The generation ends after max_tokens, or at a stop: a stop token
        (default: the tokenizer's eos and <end_of_turn>), which is consumed and
        yielded with no text of its own, or a stop string, whose token is
        consumed and yielded with the text before the stop string. Every
        yielded token is part of the session's state.

        After a stop, the session must get new input (`feed`/`step`) before it
        can generate again: a second `generate()` raises `StoppedError`, as
        continuing past an end-of-turn would have the model answer itself.
        Sampling runs on the model's device with the session's random stream
        (seed, counter), which each sampled token advances by one (greedy ones
        leave it): the same seed gives the same tokens, alone or in the
        engine's batches, and on CPU and CUDA up to floating-point rounding.
        """
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, repetition_penalty=repetition_penalty,
                                presence_penalty=presence_penalty, stop=stop,
                                stop_token_ids=None if stop_token_ids is None else tuple(stop_token_ids),
                                seed=seed)
        return self._generate(self.start_generation(params))

    def start_generation(self, params: SamplingParams) -> "Generation":
        """Check that this session can generate with `params` and return the
        `Generation` that picks and accepts its tokens (restarting the random
        stream at (params.seed, counter 0) if params.seed is set). `generate`
        drives it one token at a time; the batching engine drives many
        sessions' generations with one `decode` call per token. Raises as
        `generate` does."""
        self._check_open()
        if self._logits is None:
            if self.position == 0:
                raise ValueError("generate() needs a prompt: feed text or token ids first")
            raise ValueError("this session has no next-token logits (its snapshot was taken before any "
                             "logits existed): feed or step input before generate()")
        if self._stopped_by is not None:
            raise StoppedError(f"the last generation ended at {self._stopped_by}; feed new input "
                               f"(e.g. the next user turn) before generating again")
        if params.stop and self.model.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model has none; use stop_token_ids")
        stop_ids = self._stop_ids(params)
        if params.seed is not None:
            self._rng = RandomStream.seeded(params.seed)
        return Generation(self, params, stop_ids)

    def _stop_ids(self, params: SamplingParams) -> frozenset[int]:
        tok = self.model.tokenizer
        if params.stop_token_ids is not None:
            self._check_ids(params.stop_token_ids)
            return frozenset(params.stop_token_ids)
        if tok is None:
            return frozenset()
        return frozenset(i for i in (tok.eos_id, tok.piece_id(END_OF_TURN)) if i is not None and i >= 0)

    def _generate(self, generation: "Generation") -> Iterator[Token]:
        vocab = generation.vocab
        while True:
            with self.model.lock:
                # The step reads the sampled id on the device, so it is queued before
                # the id reaches the host: the device goes on while the host waits
                # for the id, then records the token and hands it to the caller.
                pending = PendingIds(self._logits[None, :vocab], [generation.sample_row()])
                next_logits = self.model.decode([self.slot], pending.device_ids)[0].clone()  # a reused buffer
                token = pending.ids()[0]
            out = generation.accept(token, next_logits)
            yield out
            if out.finish_reason is not None:
                return

    async def agenerate(self, **sampling) -> AsyncIterator[Token]:
        """`generate` for asyncio/anyio: each token is computed in a worker
        thread so the event loop stays free. Same arguments as `generate`.

        On cancellation, the token being computed finishes (it is consumed by
        the session: `position` tells where the session is) and nothing runs
        on the session after the cancellation has been delivered.
        """
        import anyio.to_thread

        tokens = self.generate(**sampling)
        try:
            while True:
                tok = await anyio.to_thread.run_sync(functools.partial(next, tokens, None))
                if tok is None:
                    return
                yield tok
        finally:
            tokens.close()


class Generation:
    """One generation in progress on a session: `pick()` samples the next token
    from the session's logits (penalties, the session's RNG); after the caller
    has run the model on that token, `accept(token, logits)` records it in the
    session and returns the `Token` to stream (stop tokens, stop strings,
    max_tokens). Split in two so a caller can run one batched `decode` for
    many sessions between the two halves: the engine samples many generations
    at once with `sampling.sample_rows` over their `sample_row()`s, which is
    what `pick()` does for one. Create with `Session.start_generation`."""

    def __init__(self, session: Session, params: SamplingParams, stop_ids: frozenset[int]):
        self.session = session
        self.params = params
        self.stop_ids = stop_ids
        # Only ids the tokenizer can spell are sampled (the model may have spare rows).
        self.vocab = sampled_vocab(session.model)
        self._penalize = params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
        self._stops = StopStrings(params.stop) if params.stop else None
        self._max_tokens = params.max_tokens if params.max_tokens is not None else math.inf
        self.generated = 0
        self.finish_reason: str | None = None

    def sample_row(self) -> SampleRow:
        """The sampling inputs of the next token (see `sampling.sample_rows`);
        its logits are `session._logits[:self.vocab]`. A sampled generation
        hands out the session's current (seed, counter) and advances the
        counter by one: call it once per token."""
        s, params = self.session, self.params
        return SampleRow(params, None if params.greedy else s._rng.take(),
                         s._recent.tensor() if self._penalize else None)

    def pick(self) -> int:
        """The next token id, sampled from the session's current logits."""
        return sample_rows(self.session._logits[None, :self.vocab], [self.sample_row()])[0]

    def accept(self, token: int, next_logits: torch.Tensor) -> Token:
        """Record that the session consumed `token` (its state already
        advanced), with `next_logits` (float32 [vocab], owned by the caller:
        not a reused buffer) the logits after it. Returns the Token to stream;
        its finish_reason is set when the generation has ended."""
        s = self.session
        text = s._consumed_one(token, next_logits)
        self.generated += 1
        finish = None
        stops = self._stops
        if token in self.stop_ids:
            text = ""  # a stop token's own text (e.g. "<end_of_turn>") is never emitted
            finish = "stop"
            tok = s.model.tokenizer
            s._stopped_by = f"stop token {token} ({tok.piece(token) if tok else 'no tokenizer'})"
        elif stops is not None:
            text, hit = stops.push(text)
            if hit:
                finish = "stop"
                s._stopped_by = f"stop string {stops.matched!r}"
        if finish is None and self.generated >= self._max_tokens:
            finish = "length"
        if finish is not None and stops is not None and stops.matched is None:
            text += stops.flush()  # ended without a stop string: held-back text is plain output
        self.finish_reason = finish
        return Token(token, text, finish)

    def flush(self) -> str:
        """Text held back as a possible stop-string start, released when the
        generation is ended early (cancelled)."""
        return self._stops.flush() if self._stops is not None else ""


def sampled_vocab(model: "Model") -> int:
    """How many leading logits entries generation samples from: the
    tokenizer's pieces (a checkpoint may have spare embedding rows beyond
    them), or the whole vocabulary without a tokenizer."""
    tok = model.tokenizer
    return tok.vocab_size if tok is not None else model.config.vocab_size
