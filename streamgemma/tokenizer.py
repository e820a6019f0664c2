"""Tokenization: the SentencePiece wrapper (Gemma's `tokenizer.model`), an
incremental detokenizer that streams UTF-8-safe text, and the Gemma chat turn
format."""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from pathlib import Path

from .errors import CheckpointError

SPACE_SYMBOL = "\u2581"  # SentencePiece's "▁": a space inside a piece
REPLACEMENT_CHARACTER = "\ufffd"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"


PIECE_TEXT, PIECE_BYTE, PIECE_CONTROL, PIECE_UNKNOWN = range(4)  # `Tokenizer.piece_kind`


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
        self._strip_mode = self._probe_first_space_rule()
        self._kinds: dict[int, tuple[int, str]] = {}  # `piece_kind` of the ids seen so far

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise CheckpointError(f"{p}: cannot read tokenizer ({e})") from None
        return cls(data, source=str(p))

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, {self.vocab_size} pieces)"

    @property
    def processor(self):
        """The underlying `sentencepiece.SentencePieceProcessor`."""
        return self._sp

    @property
    def first_space_rule(self) -> str:
        """How decoding treats the leading "▁" of the first piece: "none"
        (kept), "once" or "while_empty" (stripped), as SentencePiece does for this model."""
        return self._strip_mode

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def piece_id(self, piece: str) -> int | None:
        """The id of an exact piece such as "<end_of_turn>", or None if the
        vocabulary does not have it."""
        i = self._sp.PieceToId(piece)
        return None if i == self._sp.unk_id() and piece != self._sp.IdToPiece(i) else i

    def piece(self, token_id: int) -> str:
        """The raw piece of a token id ("▁hello", "<0xE2>", "<eos>")."""
        self.check_ids([token_id])
        return self._sp.IdToPiece(int(token_id))

    def piece_kind(self, token_id: int) -> tuple[int, str]:
        """(kind, piece) of a token id, remembered after the first ask (the
        detokenizer's per-token path: four SentencePiece calls per token
        were most of its cost). kind: PIECE_TEXT, PIECE_BYTE, PIECE_CONTROL or
        PIECE_UNKNOWN. ValueError for an id outside the vocabulary."""
        known = self._kinds.get(token_id)
        if known is not None:
            return known
        sp = self._sp
        if not 0 <= token_id < sp.GetPieceSize():
            raise ValueError(f"token id {token_id} is outside the tokenizer's vocabulary [0, {sp.GetPieceSize()})")
        kind = (PIECE_BYTE if sp.IsByte(token_id) else PIECE_CONTROL if sp.IsControl(token_id)
                else PIECE_UNKNOWN if sp.IsUnknown(token_id) else PIECE_TEXT)
        known = self._kinds[token_id] = (kind, sp.IdToPiece(token_id))
        return known

    def check_ids(self, ids: Iterable[int]) -> list[int]:
        """`ids` as ints; raises ValueError naming the first id outside the vocabulary."""
        out = [int(i) for i in ids]
        for k, i in enumerate(out):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} at index {k} is outside the tokenizer's "
                                 f"vocabulary [0, {self.vocab_size})")
        return out

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text` (with BOS first if `add_bos`)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: e.g. a byte of argv or stdin that was not UTF-8
            raise ValueError(f"the text is not valid UTF-8 (at character {e.start})") from None
        ids = self._sp.EncodeAsIds(text)
        return [self.bos_id, *ids] if add_bos and self.bos_id >= 0 else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids (invalid UTF-8 from byte pieces becomes U+FFFD, one per byte)."""
        return self._sp.DecodeIds(self.check_ids(ids))

    def unfinished(self, ids: list[int]) -> str:
        """What a final `Detokenizer.flush` adds after a stream ending in `ids`:
        U+FFFD for each byte of its trailing byte pieces that has not formed a
        character (text pieces flush the bytes before them, so the trailing
        byte pieces alone decide it)."""
        start = len(ids)
        while start and self.piece_kind(int(ids[start - 1]))[0] == PIECE_BYTE:
            start -= 1
        d = Detokenizer(self, at_start=False)
        for i in ids[start:]:
            d.push(i)
        return d.flush()

    def detokenizer(self) -> Detokenizer:
        """A fresh incremental detokenizer for a stream that starts at position 0."""
        return Detokenizer(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self._proto)

    # SentencePiece drops the "▁" of the first piece of a decode when the model
    # adds a dummy prefix (not Gemma's). How it does so has changed between
    # versions, so ask the installed library rather than parse the proto:
    # "none" (keep the space), "once" (strip one leading ▁ of the first visible
    # piece) or "while_empty" (strip from every piece until text appears).
    def _probe_first_space_rule(self) -> str:
        sp = self._sp
        word = next((i for i in range(sp.GetPieceSize()) if self._is_text(i)
                     and sp.IdToPiece(i).startswith(SPACE_SYMBOL) and len(sp.IdToPiece(i)) > 1), None)
        if word is None or sp.DecodeIds([word]).startswith(" "):
            return "none"
        space = sp.PieceToId(SPACE_SYMBOL)
        if sp.IdToPiece(space) != SPACE_SYMBOL:
            return "once"
        return "while_empty" if sp.DecodeIds([space, word]) == sp.DecodeIds([word]) else "once"

    def _is_text(self, i: int) -> bool:
        sp = self._sp
        return not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i))


class Detokenizer:
    """Turns a stream of token ids into text as soon as the text is final.

    Matches `Tokenizer.decode` of the whole stream: concatenating the results
    of `push` and a final `flush` equals `tokenizer.decode(all ids)`. A
    character spelled by byte-fallback pieces (`<0xE2><0x82><0xAC>`) is
    emitted whole once its last byte arrives; bytes that cannot form a valid
    character become U+FFFD, one per byte, as SentencePiece does. The leading
    "▁" of the first piece follows SentencePiece's decode rule for the model.
    """

    def __init__(self, tokenizer: Tokenizer, at_start: bool = True):
        self._sp = sp = tokenizer.processor
        self._kind = tokenizer.piece_kind
        self._strip_mode = tokenizer.first_space_rule
        self._unk_surface = sp.DecodeIds([sp.unk_id()]) if sp.unk_id() >= 0 else ""
        self.pending = bytearray()  # bytes of byte pieces that do not yet form a character
        self._text_seen = False  # any text emitted since position 0
        self._first_space_consumed = False  # the previous piece had its leading ▁ stripped
        self._at_start = at_start  # the first-piece rule may still apply

    @classmethod
    def resume(cls, tokenizer: Tokenizer, recent_ids: list[int], pending: bytes, window: int) -> Detokenizer:
        """A detokenizer in the state it had after `recent_ids` (the last
        `window` ids at most) with `pending` bytes still undecoded."""
        whole = len(recent_ids) < window  # else the stream is older than the window: well past its start
        d = cls(tokenizer, at_start=whole)
        if whole:  # replay it
            for i in recent_ids:
                d.push(i)
        d.pending = bytearray(pending)
        return d

    def copy(self) -> Detokenizer:
        """An independent copy (for `Session.fork`)."""
        d = Detokenizer.__new__(Detokenizer)
        d.__dict__.update(self.__dict__)
        d.pending = bytearray(self.pending)
        return d

    def push(self, token_id: int) -> str:
        """Text that token `token_id` completes ("" while bytes are pending)."""
        kind, piece = self._kind(int(token_id))
        if kind == PIECE_BYTE:
            self.pending.append(int(piece[3:5], 16))
            return self._emit(self._drain())
        if kind == PIECE_TEXT and not self._at_start and not self.pending:  # the common case, in short
            self._first_space_consumed = False
            text = piece.replace(SPACE_SYMBOL, " ")
            if text:
                self._text_seen = True
            return text
        text = self._flush_bytes()
        if self._first_space_consumed or self._text_seen or text:
            self._at_start = False
        self._first_space_consumed = False
        if kind == PIECE_CONTROL:
            return self._emit(text)
        if kind == PIECE_UNKNOWN:
            return self._emit(text + self._unk_surface)
        if self._at_start and self._strip_mode != "none" and piece.startswith(SPACE_SYMBOL):
            piece = piece[1:]
            self._first_space_consumed = self._strip_mode == "once"
        return self._emit(text + piece.replace(SPACE_SYMBOL, " "))

    def flush(self) -> str:
        """Text of bytes still pending at the end of the stream (U+FFFD each)."""
        return self._emit(self._flush_bytes())

    def _emit(self, text: str) -> str:
        if text:
            self._text_seen = True
        return text

    def _flush_bytes(self) -> str:
        text = self._drain() + REPLACEMENT_CHARACTER * len(self.pending)
        self.pending.clear()
        return text

    def _drain(self) -> str:
        """Decode whole characters from the front of `pending`, leaving a
        prefix that may still become a valid character."""
        out = []
        while self.pending:
            n = _utf8_length(self.pending[0])
            head = bytes(self.pending[:n])
            if n and len(head) == n:
                try:
                    out.append(head.decode("utf-8"))
                    del self.pending[:n]
                    continue
                except UnicodeDecodeError:
                    pass
            elif n:
                try:  # incomplete: wait for more bytes if it can still be a valid character
                    codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
                    break
                except UnicodeDecodeError:
                    pass
            out.append(REPLACEMENT_CHARACTER)
            del self.pending[0]
        return "".join(out)


def _utf8_length(lead: int) -> int:
    """Bytes in a UTF-8 character starting with byte `lead`; 0 if it cannot start one."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


# -- Gemma chat format -------------------------------------------------------------------
def gemma_turn(role: str, text: str) -> str:
    """One complete Gemma chat turn: "<start_of_turn>{role}\\n{text}<end_of_turn>\\n".
    role: "user" or "model"."""
    if role not in ("user", "model"):
        raise ValueError(f"chat role must be 'user' or 'model', got {role!r}")
    return f"{START_OF_TURN}{role}\n{text}{END_OF_TURN}\n"


def gemma_model_prefix() -> str:
    """What opens the model's turn, after which the model writes its reply."""
    return f"{START_OF_TURN}model\n"
