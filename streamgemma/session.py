"""`Session`: one conversation's state in the pool, advanced token by token
(`step`) or many tokens at a time (`feed`)."""

from __future__ import annotations

import numbers
import os
from typing import TYPE_CHECKING, Any, Sequence

import torch

from . import snapshot as snapshot_format
from .snapshot_store import write_file_atomic

if TYPE_CHECKING:
    from .model import Model


class Session:
    """A live conversation. Its state has a fixed size (one slot of the model's
    state pool) whatever the number of tokens consumed.

    Create with `model.session()`; release with `close()` (or a `with` block;
    the slot is also released when the session is garbage collected).
    """

    def __init__(self, model: "Model", slot: int, seed: int | None = None):
        self.model = model
        self.slot = slot
        self.seed = seed
        self._closed = False
        # The user metadata of the snapshot this session was restored from.
        self.snapshot_metadata: dict = {}

    # -- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        """Release this session's slot. Further calls raise."""
        if not self._closed:
            self._closed = True
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

    # -- host-side state beyond the pool (saved in snapshots) ------------------------------
    def _extra_state(self) -> dict:
        """Session state that lives outside the pool, as msgpack-ready values:
        {"rng": bytes | None (sampler RNG state), "detok_pending": bytes (UTF-8
        bytes not yet emitted), "recent_ids": list[int] (recent token ids the
        detokenizer and penalties need)}. Snapshots store it verbatim."""
        return {"rng": None, "detok_pending": b"", "recent_ids": []}

    def _restore_extra_state(self, extra: dict) -> None:
        """Inverse of `_extra_state` (values already validated by the caller)."""

    # -- snapshots ---------------------------------------------------------------------
    def snapshot(self, metadata: dict[str, Any] | None = None) -> bytes:
        """This session's complete state as bytes (format v1, see
        docs/snapshot-format.md): the state tensors (attention rings only as far
        as filled), the position, the sampler and detokenizer state, and
        `metadata`, a dict with str keys of None/bool/int/float/str/bytes/list/
        dict values (at most 1 MiB as msgpack; SnapshotMetadataError otherwise).
        `model.restore(blob)` continues exactly where this session is."""
        self._check_open()
        return snapshot_format.encode(self.model.pool, self.slot, fingerprint=self.model.fingerprint,
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

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        vocab = self.model.config.vocab_size
        out = []
        for i, t in enumerate(ids):
            if isinstance(t, torch.Tensor) and t.numel() == 1 and not t.is_floating_point():
                t = int(t.item())
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise TypeError(f"token at index {i} is {t!r} ({type(t).__name__}); expected an int")
            if not 0 <= int(t) < vocab:
                raise ValueError(f"token id {int(t)} at index {i} is outside the vocabulary [0, {vocab})")
            out.append(int(t))
        return out

    def step(self, token_id: int) -> torch.Tensor:
        """Consume one token; return float32 logits [vocab] (on the model's
        device) for the next token."""
        self._check_open()
        (token,) = self._check_ids([token_id])
        return self.model.decode([self.slot], [token])[0]

    def feed(self, ids_or_text: Sequence[int] | str) -> torch.Tensor:
        """Consume many tokens with the parallel path (chunked, so any length
        runs in bounded memory); return float32 logits [vocab] after the last.

        Text is tokenized with the model's tokenizer; BOS is prepended when the
        session is at position 0.
        """
        self._check_open()
        if isinstance(ids_or_text, str):
            tok = self.model.tokenizer
            if tok is None:
                raise ValueError("feed(text) needs a tokenizer, and this model has none; pass token ids")
            ids = tok.encode(ids_or_text, add_bos=self.position == 0)
        else:
            if isinstance(ids_or_text, torch.Tensor):
                ids_or_text = ids_or_text.reshape(-1).tolist()
            ids = self._check_ids(ids_or_text)
        if not ids:
            raise ValueError("feed() got no tokens")
        return self.model.prefill(self.slot, ids)
