"""The chat template of RecurrentGemma-IT (Gemma turns) for a list of
messages, as token ids. `Chat.from_messages` and the HTTP API's
`/v1/chat/completions` both use `chat_prompt_ids`, so a conversation gets
the same tokens whichever way it arrives (no torch here).

    <bos><start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n<start_of_turn>model\\n
    {reply}<end_of_turn>\\n<start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n

Gemma has no system role: system messages are joined and put at the top of
the first user turn, followed by a blank line, as Gemma's own template does.
Each turn's pieces are tokenized separately, and an assistant reply is
followed by the <end_of_turn> *id*: a conversation's tokens are then exactly
what the model consumed while it wrote its replies (the prompt, the reply's
tokens, the <end_of_turn> it sampled), so a server can find the state after
an earlier turn by its token ids (exact prefix reuse).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..tokenizer import END_OF_TURN, START_OF_TURN, Tokenizer

__all__ = ["ChatMessage", "chat_prompt_ids", "normalize_messages", "ROLES"]

ChatMessage = tuple[str, str]  # (role: "user" or "model", text)
# Roles a message may have, and the Gemma role each becomes.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "model", "model": "model"}


def normalize_messages(messages: Sequence[Mapping]) -> list[ChatMessage]:
    """OpenAI-style messages (`{"role": ..., "content": ...}`; content a
    string or a list of `{"type": "text", "text": ...}` parts) as Gemma
    turns: system messages folded into the first user turn, "assistant"
    named "model". ValueError names the message that is wrong: unknown role,
    no text, two turns of one side in a row, or a list that does not end
    with a user turn."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    system: list[str] = []
    turns: list[ChatMessage] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"messages[{i}] must be an object with \"role\" and \"content\"")
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        text = _content_text(msg.get("content"), i)
        role = ROLES[role]
        if role == "system":
            if turns:
                raise ValueError(f"messages[{i}]: a system message must come before the conversation's turns "
                                 "(Gemma folds it into the first user turn)")
            system.append(text)
            continue
        if role == "user":
            text = text.strip()  # as Gemma's template (`message['content'] | trim`); replies stay as written
            if not text:
                raise ValueError(f"messages[{i}]: a user turn needs some text")
        if turns and turns[-1][0] == role:
            raise ValueError(f"messages[{i}]: two {msg['role']} turns in a row; Gemma's turns alternate "
                             "between user and model (join them into one message)")
        if not turns and role != "user":
            raise ValueError(f"messages[{i}]: the conversation must start with a user turn")
        turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise ValueError("the last message must be a user turn (the model answers it)")
    if system:
        joined = "\n\n".join(s.strip() for s in system if s.strip())
        if joined:
            turns[0] = ("user", f"{joined}\n\n{turns[0][1]}")
    return turns


def _checked_turns(turns: Sequence[tuple]) -> list[ChatMessage]:
    """(role, text) turns as `normalize_messages` makes them: user and model alternating, from a user turn to a
    user turn, texts strings (user turns with text, trimmed); ValueError naming the first turn that is not."""
    for i, turn in enumerate(turns):
        role, text = turn if len(turn) == 2 else (None, None)
        want = "user" if i % 2 == 0 else "model"
        if role != want or not isinstance(text, str) or (role == "user" and not text.strip()):
            raise ValueError(f"turns[{i}] must be ({want!r}, text){' with some text' if want == 'user' else ''}: "
                             f"(role, text) turns alternate from a user turn, got {turn!r:.80}")
    if len(turns) % 2 == 0:
        raise ValueError("the last turn must be a user turn (the model answers it)")
    return [(role, text.strip() if role == "user" else text) for role, text in turns]  # (as normalize_messages)


def _content_text(content: object, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                 "are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise ValueError(f"messages[{i}].content must be a string or a list of text parts")


def chat_prompt_ids(tokenizer: Tokenizer, messages: Sequence[Mapping] | Sequence[ChatMessage],
                    add_bos: bool = True) -> list[int]:
    """Token ids of `messages` in Gemma's chat format, ending with the open
    model turn (`<start_of_turn>model\\n`) the reply follows. `messages`:
    OpenAI-style dicts (see `normalize_messages`) or (role, text) turns
    already normalized."""
    tuples = isinstance(messages, Sequence) and not isinstance(messages, (str, bytes)) and bool(messages) \
        and all(isinstance(m, tuple) for m in messages)
    turns = _checked_turns(messages) if tuples else normalize_messages(messages)
    end_of_turn = tokenizer.piece_id(END_OF_TURN)
    if end_of_turn is None or tokenizer.piece_id(START_OF_TURN) is None:
        raise ValueError(f"the tokenizer ({tokenizer.source}) has no {START_OF_TURN}/{END_OF_TURN} pieces: "
                         "it is not a Gemma chat tokenizer")
    ids = [tokenizer.bos_id] if add_bos and tokenizer.bos_id >= 0 else []
    for role, text in turns:
        if role == "user":
            ids += tokenizer.encode(f"{START_OF_TURN}user\n{text}{END_OF_TURN}\n")
        else:  # the reply as the model wrote it: its text, then the <end_of_turn> it sampled
            if text:
                ids += tokenizer.encode(text)
            ids.append(end_of_turn)
            ids += tokenizer.encode("\n")
        if role == "user":
            ids += tokenizer.encode(f"{START_OF_TURN}model\n")
    return ids
