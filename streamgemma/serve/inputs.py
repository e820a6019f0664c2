"""Queued input: every session's appends not yet consumed, with O(1)
accounting per session and for the whole engine, and the bounds on both.

An append is checked and queued at once (no model work): token ids become an
int32 array; short text is tokenized there and then, longer text waits as
text (counted in bytes) and is tokenized in the session's next input turn,
in a worker thread and inside the scheduler's input share, so a 1 MiB frame
never runs the tokenizer on the event loop. `take` gathers the next chunk of
a session's ids across its appends; `consumed` completes the appends it
covered with their positions. Nothing here touches the model.
"""

from __future__ import annotations

import array
from collections.abc import Sequence

from ..errors import InvalidValueError
from ..session.session import check_token_ids
from ..tokenizer import Tokenizer
from ..validate import check_position
from .record import EngineError, PendingInput, SessionRecord

DEFAULT_MAX_PENDING_TOKENS = 1 << 20  # queued input tokens per session
DEFAULT_MAX_QUEUED_TOKENS = 1 << 22  # all sessions: 16 MiB of int32 ids
DEFAULT_MAX_QUEUED_TEXT_BYTES = 1 << 24  # text waiting to be tokenized, all sessions
# beyond its first text, a session's queued text stays within this share of that pool (one session filled it)
SESSION_TEXT_SHARE = 4
# Text up to this size is tokenized as it is appended (well under a millisecond),
# so short input can ride along in decode rows at once.
INLINE_TEXT_BYTES = 1024


class InputQueues:
    """The queued input of an engine's sessions. `waiting` holds the sessions
    with queued input in turn order (the scheduler's round robin)."""

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int,
                 max_pending_tokens: int = DEFAULT_MAX_PENDING_TOKENS,
                 max_queued_tokens: int = DEFAULT_MAX_QUEUED_TOKENS,
                 max_queued_text_bytes: int = DEFAULT_MAX_QUEUED_TEXT_BYTES):
        for name, value in (("max_pending_tokens", max_pending_tokens), ("max_queued_tokens", max_queued_tokens),
                            ("max_queued_text_bytes", max_queued_text_bytes)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_pending_tokens = max_pending_tokens
        self.max_queued_tokens = max_queued_tokens
        self.max_queued_text_bytes = max_queued_text_bytes
        self.tokens = 0  # queued ids, all sessions
        self.text_bytes = 0  # queued text not yet tokenized, all sessions
        self.waiting: dict[str, SessionRecord] = {}

    # -- appending ---------------------------------------------------------------------
    def add(self, es: SessionRecord, ids_or_text: Sequence[int] | array.array | str) -> PendingInput:
        """Check and queue input for `es`. Raises EngineError("limit") when a
        bound would be passed, InvalidValueError past the snapshot format's
        position bound, ValueError/TypeError for bad input."""
        add_bos = es.position == 0 and not es.inputs
        if isinstance(ids_or_text, str):
            pending = self._text(es, ids_or_text, add_bos)
        else:
            pending = PendingInput(self._ids(ids_or_text))
            self._check_room(es, len(pending.ids), "tokens")
        es.inputs.append(pending)
        es.queued_tokens += pending.remaining
        self.tokens += pending.remaining
        es.queued_text_bytes += pending.text_bytes
        self.text_bytes += pending.text_bytes
        self.waiting.setdefault(es.id, es)
        return pending

    def _text(self, es: SessionRecord, text: str, add_bos: bool) -> PendingInput:
        if self.tokenizer is None:
            raise ValueError("text input needs a tokenizer, and this model has none; send token ids")
        if not text:
            raise ValueError("the text is empty: there is nothing to append")
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError("the text is not valid Unicode (it holds a lone surrogate), so it cannot be "
                             "tokenized") from None
        if size <= INLINE_TEXT_BYTES:
            ids = array.array("i", self.tokenizer.encode(text, add_bos=add_bos))
            if not ids:
                raise ValueError("the text has no tokens (the tokenizer drops all of it)")
            self._check_room(es, len(ids), "text")
            return PendingInput(ids, add_bos=add_bos)
        if es.queued_text_bytes and es.queued_text_bytes + size > self.max_queued_text_bytes // SESSION_TEXT_SHARE:
            raise EngineError("limit", f"{es.queued_text_bytes} bytes of this session's text are waiting to be "
                                       f"tokenized; a session may hold one text, or several up to "
                                       f"{self.max_queued_text_bytes // SESSION_TEXT_SHARE} bytes: wait for "
                                       "'appended' replies")
        if self.text_bytes + size > self.max_queued_text_bytes:
            raise EngineError("limit", f"the server holds {self.text_bytes} bytes of text waiting to be tokenized; "
                                       f"at most {self.max_queued_text_bytes} may wait: retry after 'appended' "
                                       "replies")
        self._check_room(es, 1, "text")
        return PendingInput(None, text, add_bos, size)

    def _ids(self, ids: Sequence[int] | array.array) -> array.array:
        if isinstance(ids, array.array) and ids.typecode == "i":  # the protocol checked the types
            if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
                bad = next(t for t in ids if not 0 <= t < self.vocab_size)
                raise InvalidValueError("tokens", f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        elif isinstance(ids, (bytes, bytearray, memoryview)):  # (each byte was taken for a token id)
            raise TypeError(f"append takes text or a sequence of token ids, got {type(ids).__name__}: decode "
                            "bytes to text first")
        else:
            ids = array.array("i", check_token_ids(ids, self.vocab_size))
        if not ids:
            raise ValueError("no tokens to append")
        return ids

    def _check_room(self, es: SessionRecord, count: int, field: str) -> None:
        if count > self.max_pending_tokens:
            raise EngineError("limit", f"this input is {count} tokens; at most {self.max_pending_tokens} of a "
                                       "session's input may wait to be consumed: send it in parts")
        if es.queued_tokens + count > self.max_pending_tokens:
            raise EngineError("limit", f"{es.queued_tokens} tokens of this session's input are still waiting to be "
                                       f"consumed; at most {self.max_pending_tokens} may wait: wait for "
                                       "'appended' replies")
        if self.tokens + count > self.max_queued_tokens:
            raise EngineError("limit", f"the server holds {self.tokens} tokens of input waiting to be consumed "
                                       f"(its limit is {self.max_queued_tokens}); retry later")
        check_position(es.position + es.queued_tokens + count, field)

    # -- tokenizing (in an input turn) -----------------------------------------------------
    def text_to_tokenize(self, es: SessionRecord) -> PendingInput | None:
        """The first queued input of `es` if it is text waiting to be tokenized."""
        first = es.inputs[0]
        return first if first.ids is None else None

    def tokenize(self, pending: PendingInput) -> array.array:
        """The ids of `pending`'s text (worker thread; the engine's lock held)."""
        return array.array("i", self.tokenizer.encode(pending.text, add_bos=pending.add_bos))

    def tokenized(self, es: SessionRecord, pending: PendingInput, ids: array.array) -> None:
        """`pending` (the first input of `es`) now holds `ids`; raises as
        `add` if they do not fit (the caller fails the input with it)."""
        if not es.inputs or es.inputs[0] is not pending:  # dropped meanwhile (and released)
            return
        self._release_text(es, pending)
        if not ids:
            raise ValueError("the text has no tokens (the tokenizer drops all of it)")
        self._check_room(es, len(ids), "text")
        pending.ids = ids
        es.queued_tokens += len(ids)
        self.tokens += len(ids)

    def _release_text(self, es: SessionRecord, pending: PendingInput) -> None:
        es.queued_text_bytes -= pending.text_bytes
        self.text_bytes -= pending.text_bytes
        pending.text, pending.text_bytes = None, 0

    # -- consuming --------------------------------------------------------------------------
    def take(self, es: SessionRecord, limit: int) -> list[int]:
        """Up to `limit` next ids of `es`, across its appends, stopping before
        text that is not tokenized yet."""
        out: list[int] = []
        for pending in es.inputs:
            if pending.ids is None:
                break
            out += pending.ids[pending.offset:pending.offset + limit - len(out)]
            if len(out) >= limit:
                break
        return out

    def consumed(self, es: SessionRecord, count: int) -> list[PendingInput]:
        """The next `count` queued ids of `es` were consumed (the session's
        position already counts them): the appends they finish, their
        positions set, to `complete` once that is durable (see `journaling`)."""
        finished = []
        self.tokens -= count
        es.queued_tokens -= count
        position = es.position - count
        while count:
            pending = es.inputs[0]
            step = min(count, pending.remaining)
            pending.offset += step
            position += step
            count -= step
            if pending.remaining == 0:
                es.inputs.popleft()
                pending.position = position
                finished.append(pending)
        if not es.inputs:
            self.waiting.pop(es.id, None)
        return finished

    def started(self, es: SessionRecord) -> bool:
        """Whether the first queued input of `es` is partly consumed."""
        return bool(es.inputs) and es.inputs[0].offset > 0

    def fail_first(self, es: SessionRecord, error: BaseException) -> None:
        """The first queued input of `es` failed with `error`."""
        failed = es.inputs.popleft()
        self._finish(es, failed, error)
        if es.position == 0 and failed.offset == 0 and es.inputs and es.inputs[0].add_bos is False:
            self._start_with_bos(es, es.inputs[0])  # the session's first text now: it begins as one does
        if not es.inputs:
            self.waiting.pop(es.id, None)

    def _start_with_bos(self, es: SessionRecord, pending: PendingInput) -> None:
        pending.add_bos = True
        bos = self.tokenizer.bos_id
        if pending.ids is not None and bos >= 0:  # (tokenized when appended)
            pending.ids = array.array("i", [bos]) + pending.ids
            es.queued_tokens += 1
            self.tokens += 1

    def drop(self, es: SessionRecord, error: BaseException) -> int:
        """Fail every queued input of `es` with `error`; how many there were."""
        self.waiting.pop(es.id, None)
        dropped = len(es.inputs)
        while es.inputs:
            self._finish(es, es.inputs.popleft(), error)
        return dropped

    def _finish(self, es: SessionRecord, pending: PendingInput, error: BaseException) -> None:
        self.tokens -= pending.remaining
        es.queued_tokens -= pending.remaining
        if pending.text is not None:
            self._release_text(es, pending)
        pending.error = error
        pending.complete()

    def next_turn(self, es: SessionRecord) -> None:
        """`es` had its input turn: its next one comes after the others waiting."""
        if es.inputs and self.waiting.pop(es.id, None) is not None:
            self.waiting[es.id] = es
