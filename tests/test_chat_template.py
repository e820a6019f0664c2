"""The Gemma chat template for message lists (`chat_prompt_ids`), shared by
`sg.Chat.from_messages` and the HTTP API."""

from __future__ import annotations

import pytest

import streamgemma as sg
from streamgemma.session.chat_template import chat_prompt_ids, normalize_messages


@pytest.fixture(scope="module")
def model():
    return sg.load("demo")


def test_system_messages_fold_into_the_first_user_turn():
    turns = normalize_messages([{"role": "system", "content": "Be brief."},
                                {"role": "developer", "content": [{"type": "text", "text": "No jokes."}]},
                                {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                             {"type": "text", "text": " there"}]},
                                {"role": "assistant", "content": "Hello."},
                                {"role": "user", "content": "Bye"}])
    assert turns == [("user", "Be brief.\n\nNo jokes.\n\nHi there"), ("model", "Hello."), ("user", "Bye")]


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "user"}], "content must be"),
    ([{"role": "robot", "content": "x"}], "role must be one of"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "before the conversation"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message must be a user"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "in a row"),
])
def test_bad_messages_name_the_problem(messages, match):
    with pytest.raises(ValueError, match=match):
        normalize_messages(messages)


def test_the_template_as_text(model):
    tok = model.tokenizer
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"}]
    ids = chat_prompt_ids(tok, messages)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids[1:]) == ("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
                                   "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_a_conversation_extends_the_tokens_the_model_consumed(model):
    """What prefix reuse relies on: the next turn's ids start with the previous
    prompt and the ids the model generated (its <end_of_turn> included)."""
    question = [{"role": "user", "content": "What is a module?"}]
    session = model.session()
    chat = sg.Chat.from_messages(session, question)
    generated = [t for t in chat.reply(max_tokens=30, temperature=0)]
    prompt = chat_prompt_ids(model.tokenizer, question)
    reply = "".join(t.text for t in generated)
    history = question + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Thanks"}]
    consumed = prompt + [t.id for t in generated]
    assert chat_prompt_ids(model.tokenizer, history)[:len(consumed)] == consumed
    assert session.position == len(consumed)


def test_from_messages_needs_a_fresh_session(model):
    session = model.session()
    session.feed("x")
    with pytest.raises(ValueError, match="position 0"):
        sg.Chat.from_messages(session, [{"role": "user", "content": "Hi"}])
