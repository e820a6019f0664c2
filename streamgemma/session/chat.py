"""`Chat`: Gemma chat turns on a live session. Each turn feeds only its own
tokens; the history is never re-read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..tokenizer import END_OF_TURN, START_OF_TURN, gemma_model_prefix, gemma_turn
from .chat_template import chat_prompt_ids
from .session import Session, Tokens


class Chat:
    """Multi-turn chat in Gemma's format on `session`:

        <start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n{reply}<end_of_turn>\\n...

    `user(text)` appends a user turn and opens the model's turn; `reply(...)`
    generates the model's turn (stopping at <end_of_turn> or eos). If a reply
    ended any other way (max_tokens, a stop string, the caller stopped
    reading), the next `user` closes the model's turn first.

    Gemma has no system role: a `system` prompt is put at the top of the
    first user turn, followed by a blank line, as Gemma's chat template does.
    """

    def __init__(self, session: Session, model_turn_open: bool | None = None, system: str | None = None):
        """model_turn_open: whether the session's history ends inside a model
        turn (default: it does iff the session has consumed tokens, as a
        conversation restored from a snapshot taken after a reply).
        system: instructions folded into the first user turn (ignored when
        the conversation already has turns)."""
        tok = session.model.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer, and this model has none")
        missing = [p for p in (START_OF_TURN, END_OF_TURN) if tok.piece_id(p) is None]
        if missing:
            raise ValueError(f"the tokenizer ({tok.source}) has no {' or '.join(missing)} piece: "
                             f"it is not a Gemma chat tokenizer")
        self.session = session
        self._end_of_turn = tok.piece_id(END_OF_TURN)
        self._model_turn_open = session.position > 0 if model_turn_open is None else model_turn_open
        self._system = system.strip() if system and session.position == 0 else None

    @classmethod
    def from_messages(cls, session: Session, messages: Sequence[Mapping]) -> Chat:
        """A chat whose history is `messages` (OpenAI-style `{"role",
        "content"}` dicts: system, user, assistant; see
        `chat_template.normalize_messages`), fed to `session` (at position
        0) with the template the HTTP API uses. The last message is a user
        turn, so the model's turn is open: call `reply()` next."""
        if session.position != 0:
            raise ValueError(f"from_messages needs a session at position 0 (this one is at {session.position}): "
                             "the messages are the whole conversation")
        tok = session.model.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer, and this model has none")
        session.feed(chat_prompt_ids(tok, messages))
        return cls(session, model_turn_open=True)

    def user(self, text: str) -> torch.Tensor:
        """Append a user turn and open the model's turn; returns the float32
        logits [vocab] for the reply's first token."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a user turn needs some text, got {text!r}")
        text = text.strip()  # as Gemma's chat template (`content | trim`) and `chat_prompt_ids`
        prefix = ""
        if self._model_turn_open:
            # An <end_of_turn> the model produced is already consumed; only its newline is missing.
            last = self.session.recent_ids[-1:]
            prefix = "\n" if last == [self._end_of_turn] else f"{END_OF_TURN}\n"
        if self._system:
            text = f"{self._system}\n\n{text}"
        logits = self.session.feed(prefix + gemma_turn("user", text) + gemma_model_prefix())
        self._system = None  # (only once it is fed: a turn refused leaves the chat as it was)
        self._model_turn_open = True
        return logits

    def reply(self, **sampling) -> Tokens:
        """Generate the model's turn; arguments and result as `Session.generate`."""
        self._check_turn()
        return self.session.generate(**sampling)

    def _check_turn(self) -> None:
        if not self._model_turn_open:
            raise ValueError("reply() needs a user turn first: call user(text)")
