"""`Session`: one conversation's state in the pool, advanced token by token
(`step`), many tokens at a time (`feed`), or by sampling (`generate`)."""

from __future__ import annotations

import functools
import numbers
import os
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

import torch

from ..errors import SnapshotError, SnapshotFormatError, StoppedError
from ..sampling.logprobs import score_rows
from ..sampling.params import SamplingParams
from ..sampling.philox import RandomStream
from ..sampling.sampler import PendingIds
from ..tokenizer import END_OF_TURN
from ..types import Token
from . import snapshot as snapshot_format
from .generation import Generation, sampled_vocab
from .host import HostState, whole_on_interrupt
from .store import write_file_atomic


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


class Tokens(Iterator[Token]):
    """What `Session.generate` returns: its tokens, each computed when asked
    for. A loop left early (`break`) leaves the generation where it is;
    `close()` ends it and returns the text it held back as a possible start
    of a stop string, which no token carried yet ("" if none)."""

    def __init__(self, steps: Iterator[Token], generation: Generation):
        self._steps = steps
        self._generation = generation

    def __next__(self) -> Token:
        return next(self._steps)

    def close(self) -> str:
        self._steps.close()
        return self._generation.flush() if self._generation.finish_reason is None else ""


class Session:
    """A live conversation. Its state has a fixed size (one slot of the model's
    state pool plus a few kilobytes on the host) whatever the number of tokens
    consumed.

    Create with `model.session()`; release with `close()` (or a `with` block;
    the slot is also released when the session is garbage collected).
    A session is driven by one caller at a time; sessions of one model may be
    driven from different threads. `state` is its host state (`HostState`).
    """

    def __init__(self, model, slot: int, seed: int | None = None):
        self.model = model
        self.slot = slot
        self.seed = seed
        self._closed = False
        # The sampler's counter-based stream: (seed, counter), seed from `seed` or the OS's entropy.
        self.state = HostState(model.tokenizer, RandomStream.seeded(seed))
        self.snapshot_metadata: dict = {}  # the user metadata of the snapshot this session came from
        self._generation: Generation | None = None  # the latest started: an earlier one may not go on

    # -- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        """Release this session's slot. Further calls raise; `position` stays
        where the session ended."""
        if not self._closed:
            self._final_position = self.position
            self._closed = True
            self.state.logits = None
            with self.model.lock:
                self.model.pool.release(self.slot)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Session:
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
        rng = RandomStream.seeded(self.seed) if self.seed is not None else self.state.rng
        self.state = HostState(self.model.tokenizer, rng)

    def fork(self) -> Session:
        """An independent copy: same state, position, next-token logits, sampler
        stream and detokenizer state, in a new slot."""
        self._check_open()
        with self.model.lock:
            slot = self.model.pool.allocate()
            self.model.pool.copy_slot(self.slot, slot)
        child = Session(self.model, slot, seed=self.seed)
        child.state = self.state.copy()
        return child

    def state_bytes(self) -> int:
        """Bytes this session holds: its slot of the state pool (device) and its
        host state at its bounds. Constant over the session's life."""
        self._check_open()
        return self.model.pool.slot_bytes() + self.state.nbytes(self.model.config.vocab_size)

    # -- snapshots ---------------------------------------------------------------------
    def snapshot(self, metadata: dict[str, Any] | None = None,
                 level: int = snapshot_format.COMPRESSION_LEVEL, threads: int | None = None) -> bytes:
        """This session's complete state as bytes (format v2, see
        docs/snapshot-format.md), with `metadata`: a dict with str keys of
        None/bool/int/float/str/bytes/list/dict values (at most 1 MiB as
        msgpack; SnapshotMetadataError otherwise). `level`: zstd level (1:
        compact; -1: about a quarter larger, faster to restore). `threads`:
        how many compress its frames (None: one per core, at most 16).
        `model.restore(blob)` continues exactly where this session is."""
        return snapshot_format.encode_contents(self.capture(metadata), level, threads)

    def capture(self, metadata: dict[str, Any] | None = None) -> snapshot_format.SnapshotContents:
        """`snapshot` before encoding: the state copied to host memory and
        validated. `model.restore` takes it as it takes bytes; the engine
        suspends sessions with it and encodes in the background."""
        self._check_open()
        return snapshot_format.capture(self.model.pool, self.slot, fingerprint=self.model.fingerprint,
                                       extra=self.state.to_extra(), seed=self.seed, metadata=metadata)

    def restore_host(self, extra: dict) -> None:
        """Take the host state of a validated snapshot's `extra`. Bytes only the
        sampler can judge (its stream state) raise SnapshotFormatError."""
        try:
            self.state = HostState.from_extra(extra, self.model.tokenizer, self.state.rng, self.model.device)
        except SnapshotError:
            raise
        except (ValueError, TypeError, RuntimeError) as e:
            raise SnapshotFormatError(f"the snapshot's sampler or detokenizer state cannot be restored: {e}") from e

    def save(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None,
             level: int = snapshot_format.COMPRESSION_LEVEL, threads: int | None = None) -> None:
        """Write `snapshot(metadata, level, threads)` to `path` atomically
        (temp file, fsync, rename). Restore with `model.restore_file(path)`."""
        write_file_atomic(path, self.snapshot(metadata, level, threads))

    # -- state -----------------------------------------------------------------------
    @property
    def position(self) -> int:
        """Tokens consumed so far (the absolute position of the next token)."""
        if self._closed:  # (its slot may be another session's now)
            return self._final_position
        return self.model.pool.positions[self.slot]

    @property
    def recent_ids(self) -> list[int]:
        """The last token ids consumed (at most 1024), oldest first."""
        return list(self.state.recent)

    @property
    def logits(self) -> torch.Tensor | None:
        """float32 next-token logits [vocab] (None before any input): the session's own
        tensor, which its sampling and snapshots read: clone it before changing it in place."""
        return self.state.logits

    def step(self, token_id: int) -> torch.Tensor:
        """Consume one token; return float32 logits [vocab] (on the model's
        device) for the next token: a copy, the caller's to change."""
        self._check_open()
        (token,) = check_token_ids([token_id], self.model.config.vocab_size)
        with self.model.lock:
            logits = self.model.decode([self.slot], [token])[0]
        self.state.consume([token], logits)
        return logits.clone()  # (masked in place, the session's own would change what it samples next)

    def feed(self, ids_or_text: Sequence[int] | str, add_bos: bool | None = None) -> torch.Tensor:
        """Consume many tokens with the parallel path (chunked, so any length
        runs in bounded memory); return float32 logits [vocab] after the last
        (a copy, the caller's to change).

        Text is tokenized with the model's tokenizer; BOS is prepended when
        add_bos is True, or when it is None (default) and the session is at
        position 0. Token ids are consumed as given. Ctrl-C ends a long feed
        at the end of a chunk: the chunks consumed stay (`position` counts them).
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
            if isinstance(ids_or_text, (bytes, bytearray, memoryview)) or not isinstance(ids_or_text, Iterable):
                raise TypeError(f"feed() takes text or a sequence of token ids, got "
                                f"{type(ids_or_text).__name__}")
            if isinstance(ids_or_text, torch.Tensor):
                ids_or_text = ids_or_text.reshape(-1).tolist()
            ids = check_token_ids(ids_or_text, self.model.config.vocab_size)
        if not ids:
            raise ValueError("feed() got no tokens")
        with self.model.lock:  # chunk by chunk, so one interrupted keeps those before it (and `position`)
            for start in range(0, len(ids), self.model.prefill_chunk):
                part = ids[start:start + self.model.prefill_chunk]
                with whole_on_interrupt():
                    logits = self.model.prefill(self.slot, part)
                    self.state.consume(part, logits)
        return logits.clone()

    # -- generation --------------------------------------------------------------------
    def generate(self, max_tokens: int | None = 256, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 presence_penalty: float = 0.0, stop: Sequence[str] | str = (),
                 stop_token_ids: Sequence[int] | None = None, seed: int | None = None,
                 logprobs: int | None = None) -> Tokens:
        """Sample tokens one at a time, consuming each, and yield them as `Token`s
        (a `Tokens` iterator: its `close()` ends a generation left early and
        returns the text held back for the stop strings).

        Arguments are those of `SamplingParams` (validated here, before any
        work). The generation ends after max_tokens, or at a stop: a stop token
        (default: the tokenizer's eos and <end_of_turn>), which is consumed and
        yielded with no text of its own, or a stop string, whose token is
        consumed and yielded with the text before the stop string. Every
        yielded token is part of the session's state.

        After a stop, the session must get new input (`feed`/`step`) before it
        can generate again: a second `generate()` raises `StoppedError`, as
        continuing past an end-of-turn would have the model answer itself.
        Sampling uses the session's random stream (seed, counter), which each
        sampled token advances by one (greedy ones leave it): the same seed
        gives the same tokens, alone or in the engine's batches, and on CPU
        and CUDA up to floating-point rounding. logprobs: None, or k in [0,
        20]: each token carries `logprob` and its k likeliest alternatives
        (`top_logprobs`; definition in `streamgemma.sampling.logprobs`).
        """
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, repetition_penalty=repetition_penalty,
                                presence_penalty=presence_penalty, stop=stop,
                                stop_token_ids=stop_token_ids,
                                seed=seed, logprobs=logprobs)
        generation = self.start_generation(params)
        return Tokens(self._generate(generation), generation)

    def complete(self, prompt: Sequence[int] | str, **sampling: Any) -> str:
        """Feed `prompt` (as `feed`), generate (arguments as `generate`) and
        return the generated text, in one call. Bad sampling arguments are
        refused before the prompt is fed."""
        self._checked(SamplingParams(**sampling))
        self.feed(prompt)
        return "".join(t.text for t in self.generate(**sampling))

    def start_generation(self, params: SamplingParams) -> Generation:
        """Check that this session can generate with `params` and return the
        `Generation` that samples and accepts its tokens (restarting the
        random stream at (params.seed, 0) if params.seed is set). Raises as
        `generate` does."""
        self._check_open()
        state = self.state
        if state.logits is None:
            if self.position == 0:
                raise ValueError("generate() needs a prompt: feed text or token ids first")
            raise ValueError("this session has no next-token logits (its snapshot was taken before any "
                             "logits existed): feed or step input before generate()")
        if state.stopped is not None:
            raise StoppedError(f"the last generation ended at {state.stopped}; feed new input "
                               f"(e.g. the next user turn) before generating again")
        stop_ids = self._checked(params)
        if params.seed is not None:
            state.rng = RandomStream.seeded(params.seed)
        self._generation = Generation(state, params, stop_ids, sampled_vocab(self.model.tokenizer,
                                                                             self.model.config.vocab_size))
        return self._generation

    def _checked(self, params: SamplingParams) -> frozenset[int]:
        """The stop token ids of `params` for this model; raises on what the model cannot do."""
        tok = self.model.tokenizer
        if params.stop and tok is None:
            raise ValueError("stop strings need a tokenizer, and this model has none; use stop_token_ids")
        if params.stop_token_ids is not None:
            return frozenset(check_token_ids(params.stop_token_ids, self.model.config.vocab_size))
        if tok is None:
            return frozenset()
        return frozenset(i for i in (tok.eos_id, tok.piece_id(END_OF_TURN)) if i is not None and i >= 0)

    def _generate(self, generation: Generation) -> Iterator[Token]:
        while True:
            with self.model.lock:
                self._check_open()
                if generation.state is not self.state:
                    raise RuntimeError("this generation was ended by reset() or a restore of the session's "
                                       "state; call generate() again")
                if generation is not self._generation:
                    raise RuntimeError("a later generate() on this session replaced this generation")
                # The step reads the sampled id on the device, so it is queued before
                # the id reaches the host: the device goes on while the host waits.
                rows = [generation.sample_row()]
                pending = PendingIds(generation.logits()[None], rows, graphs=self.model.sampling_graphs)
                scored = score_rows(generation.logits()[None], pending.device_ids, rows)  # None: not asked
                next_logits = self.model.decode([self.slot], pending.device_ids)[0]
                token = pending.ids()[0]
            out = generation.accept(token, next_logits, scored.get(0) if scored is not None else None)
            yield out
            if out.finish_reason is not None:
                return

    async def agenerate(self, **sampling) -> AsyncIterator[Token]:
        """`generate` for asyncio/anyio: each token is computed in a worker
        thread so the event loop stays free. Same arguments as `generate`.

        On cancellation, the token being computed finishes (it is consumed by
        the session: `position` tells where the session is) and nothing runs
        on the session after the cancellation has been delivered. Text held
        back for the stop strings of a generation left early is dropped (an
        async generator returns nothing at its close): `generate`'s
        `Tokens.close()` returns it.
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
