"""SentencePiece tokenizer wrapper (Gemma's `tokenizer.model`)."""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError


class Tokenizer:
    """Text <-> token ids with a SentencePiece model.

    The serialized model is kept so `Model.save` can write it back out.
    """

    def __init__(self, model_proto: bytes, source: str = "tokenizer.model"):
        import sentencepiece as spm

        self.source = source
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as e:
            raise CheckpointError(f"{source}: not a SentencePiece model ({e})") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise CheckpointError(f"{p}: cannot read tokenizer ({e})") from None
        return cls(data, source=str(p))

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text` (with BOS first if `add_bos`)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self._sp.EncodeAsIds(text)
        return [self.bos_id, *ids] if add_bos and self.bos_id >= 0 else ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids."""
        return self._sp.DecodeIds([int(i) for i in ids])

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self._proto)
