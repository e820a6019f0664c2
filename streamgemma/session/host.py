"""`HostState`: the part of a session that lives on the host (sampler stream,
recent ids, detokenizer, next-token logits, the stop that ended the last
generation). It is defined here once; snapshots store its `to_extra()`."""

from __future__ import annotations

import array
import contextlib
import signal
import threading
from collections.abc import Iterable, Iterator

import torch

from ..sampling.philox import STATE_BYTES as RNG_STATE_BYTES
from ..sampling.philox import RandomStream
from ..tokenizer import Detokenizer, Tokenizer

# Fixed so a session's memory does not grow with its length: penalties and the
# detokenizer see the last 1024 ids only.
RECENT_IDS_WINDOW = 1024
MAX_PENDING_BYTES = 3  # a UTF-8 character is at most 4 bytes; the 4th completes it


class RecentIds:
    """The last `capacity` token ids in a ring preallocated at creation."""

    def __init__(self, capacity: int = RECENT_IDS_WINDOW, ids: Iterable[int] = ()):
        self.capacity = capacity
        self._ring = array.array("q", bytes(8 * capacity))
        self.count = 0  # ids ever added
        self.extend(ids)

    def extend(self, ids: Iterable[int]) -> None:
        for i in ids:
            self.append(i)

    def append(self, i: int) -> None:
        self._ring[self.count % self.capacity] = i
        self.count += 1

    def tensor(self) -> torch.Tensor:
        """The ids as an int64 CPU tensor in ring order, sharing the ring's
        memory: copy it before the next append."""
        n = len(self)
        if n == 0:
            return torch.empty(0, dtype=torch.int64)
        return torch.frombuffer(self._ring, dtype=torch.int64, count=n)

    def __len__(self) -> int:
        return min(self.count, self.capacity)

    def __iter__(self) -> Iterator[int]:
        """Oldest first."""
        start = self.count - len(self)
        return (self._ring[k % self.capacity] for k in range(start, self.count))

    def copy(self) -> RecentIds:
        return RecentIds(self.capacity, self)

    @property
    def nbytes(self) -> int:
        return self._ring.itemsize * len(self._ring)


class HostState:
    """What a session keeps on the host. `logits` are the float32 next-token
    logits [vocab] (None before any input); `stopped` describes the stop that
    ended the last generation, until new input arrives."""

    def __init__(self, tokenizer: Tokenizer | None, rng: RandomStream):
        self.tokenizer = tokenizer
        self.rng = rng
        self.recent = RecentIds()
        self.detok: Detokenizer | None = tokenizer.detokenizer() if tokenizer is not None else None
        # Ids at or above this have no text (a checkpoint may have spare embedding rows).
        self.text_vocab = tokenizer.vocab_size if tokenizer is not None else 0
        self._logits: torch.Tensor | None = None
        self._row: tuple[torch.Tensor, int] | None = None  # (batch, i): the logits are batch[i]
        self.stopped: str | None = None

    @property
    def logits(self) -> torch.Tensor | None:
        # A batch's row becomes a view when first asked for: most ticks nobody asks
        # (a view per row per tick was a visible share of the engine's host work).
        if self._logits is None and self._row is not None:
            batch, i = self._row
            self._logits = batch[i]
        return self._logits

    @logits.setter
    def logits(self, value: torch.Tensor | None) -> None:
        self._logits, self._row = value, None

    def holds_row(self, batch: torch.Tensor, i: int) -> bool:
        """Whether the logits are row i of `batch` (as `consume_one` set them)."""
        row = self._row
        return row is not None and row[0] is batch and row[1] == i

    def consume(self, ids: list[int], logits: torch.Tensor) -> str:
        """Record ids the model just consumed and the logits after them;
        returns the text they complete."""
        if len(ids) == 1:
            return self.consume_one(ids[0], logits)
        self.recent.extend(ids)
        self.logits = logits
        self.stopped = None
        if self.detok is None:
            return ""
        return "".join(self.detok.push(i) for i in ids if i < self.text_vocab)

    def consume_one(self, token: int, logits: torch.Tensor | tuple[torch.Tensor, int]) -> str:
        """`consume([token], logits)`, the per-token path of generation.
        logits may be (batch, i): row i of batch [B, V], made a view when needed."""
        self.recent.append(token)
        if type(logits) is tuple:
            self._logits, self._row = None, logits
        else:
            self._logits, self._row = logits, None
        self.stopped = None
        if self.detok is None or token >= self.text_vocab:
            return ""
        return self.detok.push(token)

    def copy(self) -> HostState:
        other = HostState.__new__(HostState)
        other.tokenizer, other.text_vocab, other.stopped = self.tokenizer, self.text_vocab, self.stopped
        other.rng = self.rng.copy()
        other.recent = self.recent.copy()
        other.detok = self.detok.copy() if self.detok is not None else None
        other.logits = self.logits.clone() if self.logits is not None else None
        return other

    def nbytes(self, vocab_size: int) -> int:
        """Bytes held at their bounds: logits, the stream as stored, the ring, pending bytes."""
        return 4 * vocab_size + RNG_STATE_BYTES + self.recent.nbytes + MAX_PENDING_BYTES

    def to_extra(self) -> dict:
        """msgpack-ready values, stored verbatim in a snapshot's `extra`
        (docs/snapshot-format.md): rng (PHX1 bytes), detok_pending, recent_ids
        (oldest first), logits (float32 bytes or None), stopped."""
        logits = None
        if self.logits is not None:
            logits = self.logits.detach().float().cpu().contiguous().numpy().tobytes()
        return {
            "rng": self.rng.to_bytes(),
            "detok_pending": bytes(self.detok.pending) if self.detok is not None else b"",
            "recent_ids": list(self.recent),
            "logits": logits,
            "stopped": self.stopped,
        }

    @classmethod
    def from_extra(cls, extra: dict, tokenizer: Tokenizer | None, rng: RandomStream,
                   device: torch.device) -> HostState:
        """Inverse of `to_extra` (values validated by the snapshot decoder);
        an `rng` of None keeps `rng`. ValueError for a malformed stream state."""
        state = cls(tokenizer, rng if extra["rng"] is None else RandomStream.from_bytes(extra["rng"]))
        state.recent = RecentIds(RECENT_IDS_WINDOW, [int(i) for i in extra["recent_ids"]])
        if tokenizer is not None:
            text_ids = [i for i in state.recent if i < tokenizer.vocab_size]
            state.detok = Detokenizer.resume(tokenizer, text_ids, bytes(extra["detok_pending"]), RECENT_IDS_WINDOW)
        logits = extra.get("logits")
        if logits is not None:
            state.logits = torch.frombuffer(bytearray(logits), dtype=torch.float32).to(device)
        state.stopped = extra.get("stopped")
        return state


@contextlib.contextmanager
def whole_on_interrupt() -> Iterator[None]:
    """While inside, Ctrl-C waits for the block to end and then raises KeyboardInterrupt, so a
    chunk of input is consumed whole or not at all (its state is written layer by layer). Only
    in the main thread, and only over Python's own handler (an application's stays as it is)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
