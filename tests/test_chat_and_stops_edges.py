"""The chat template against Gemma's official one (trimmed user turns), the prefix cache's pending store
writes, stop strings whatever the split of the text into tokens (each found by a review)."""

from __future__ import annotations

import pytest

import streamgemma as sg
from streamgemma.session.chat_template import chat_prompt_ids

# RecurrentGemma-2b-it's (and Gemma-1's) chat template, from its tokenizer_config.json.
OFFICIAL_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")


def official_gemma_text(messages) -> str:
    import jinja2

    def raise_exception(message):
        raise ValueError(message)

    return jinja2.Environment().from_string(OFFICIAL_GEMMA_TEMPLATE).render(
        messages=messages, bos_token="", add_generation_prompt=True, raise_exception=raise_exception)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is a list?"}],  # (agrees)
    [{"role": "user", "content": "What is a list?\n"}],  # a trailing newline, as a text box or `echo` sends
    [{"role": "user", "content": "  Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "Bye\n\n"}],
])
def test_user_turns_are_trimmed_as_gemmas_template_does(messages):
    tok = sg.load("demo").tokenizer
    ids = chat_prompt_ids(tok, messages)
    assert tok.decode(ids[1:]) == official_gemma_text(messages)


def test_pending_prefix_cache_writes_are_bounded(tmp_path):
    """Each finished request's state waits in `_writing` (host memory) until the store has it. With a store
    slower than the requests, nothing bounds them: not memory_bytes (here 0: the memory tier is off)."""
    import threading

    import anyio

    from streamgemma.serve.prefix_cache import PrefixCache

    model = sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0, device="cpu", dtype="float32")
    store = sg.DirectorySnapshotStore(tmp_path)
    gate, real_put = threading.Event(), store.put

    def slow_put(key, blob):  # a store that is slow (a remote one under load)
        gate.wait(60)
        real_put(key, blob)

    store.put = slow_put
    session = model.session()
    session.feed([5, 6, 7])
    contents = session.capture()  # one state stands for the 50 different requests' states

    async def main():
        cache = PrefixCache(model, store, max_bytes=1 << 30, memory_bytes=0)
        try:
            for i in range(50):  # 50 requests finish while the first write is still under way
                await cache.keep([5, 6, 100 + i], contents)
            return len(cache._writing)
        finally:
            gate.set()
            await cache.flush()
            cache.close()

    pending = anyio.run(main)
    assert pending <= 8, f"{pending} decoded states held in host memory waiting for the store"


@pytest.mark.parametrize("stops, text", [(["###", "\n###\n"], "ok\n###\nmore"), (["bc", "abcd"], "xabcdy")])
def test_a_stop_strings_cut_does_not_depend_on_how_the_text_is_split_into_tokens(stops, text):
    from streamgemma.sampling.stops import StopStrings

    def run(pieces):
        s, out = StopStrings(stops), []
        for p in pieces:
            emitted, hit = s.push(p)
            out.append(emitted)
            if hit:
                break
        return "".join(out)

    whole = run([text])
    by_char = run(list(text))
    assert whole == by_char


def test_a_cached_state_is_reused_only_by_a_model_with_the_same_numerics(tmp_path):
    """Workers of one checkpoint in other dtypes or weight formats share a fingerprint (snapshots move between
    them); a prefix-cache entry of one served another as an exact hit, which the docs promise bit for bit."""
    import anyio

    from streamgemma.serve.prefix_cache import PrefixCache

    config = sg.GriffinConfig.preset("tiny")
    plain = sg.Model.random(config, seed=0, device="cpu", dtype="float32")
    int8 = sg.Model.random(config, seed=0, device="cpu", dtype="float32", quantize="int8")
    assert plain.fingerprint == int8.fingerprint
    store = sg.DirectorySnapshotStore(tmp_path)
    session = plain.session()
    session.feed([5, 6, 7])

    async def main():
        writer = PrefixCache(plain, store, max_bytes=1 << 30, memory_bytes=0)
        await writer.keep([5, 6, 7], session.capture())
        await writer.flush()
        writer.close()
        found = []
        for model in (plain, int8):
            reader = PrefixCache(model, store, max_bytes=1 << 30, memory_bytes=0)
            found.append(await reader.lookup([5, 6, 7, 8]))
            reader.close()
        return found

    same, other = anyio.run(main)
    assert same is not None and same.tokens == 3 and other is None


def test_closing_a_generation_left_early_returns_the_text_held_for_a_stop_string():
    """The text held back as a possible stop string's start was consumed by the session and carried by no token
    when the caller stopped reading: lost (the engine's `done` carries it)."""
    model = sg.load("demo")
    stop = ["Python interpreterX"]  # never completes: " Python interpreter" is held back along the way

    def session():
        s = model.session(seed=0)
        s.feed("In this tutorial, we will")
        return s

    whole = list(session().generate(max_tokens=10, temperature=0, stop=stop))  # ended by length: all released
    tokens = session().generate(max_tokens=100, temperature=0, stop=stop)
    first = [next(tokens) for _ in range(10)]
    assert [t.id for t in first] == [t.id for t in whole]
    text, held = "".join(t.text for t in first), tokens.close()
    assert held and text + held == "".join(t.text for t in whole) == model.tokenizer.decode([t.id for t in whole])
    assert tokens.close() == ""  # (once)


def test_a_generation_replaced_by_a_later_one_does_not_go_on():
    """An earlier generator stayed usable after a later generate() ended at a stop: it sampled past the stop
    (the model answering itself) and cleared it."""
    model = sg.load("demo")
    s = model.session(seed=0)
    s.feed("In this tutorial, we will")
    first = s.generate(max_tokens=50, temperature=0)
    next(first)
    later = list(s.generate(max_tokens=50, temperature=0, stop=[" "]))
    assert later[-1].finish_reason == "stop"
    with pytest.raises(RuntimeError, match="replaced"):
        next(first)
    with pytest.raises(sg.StoppedError):
        next(s.generate(max_tokens=5))


def test_complete_checks_its_stop_token_ids_before_feeding_the_prompt():
    model = sg.load("demo")
    s = model.session(seed=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.complete("Hello world", max_tokens=5, stop_token_ids=[99999])
    assert s.position == 0  # (the prompt was fed, then refused: a retry fed it twice)


def test_a_user_turn_refused_leaves_the_chat_as_it_was():
    """The turn was marked fed (the system prompt dropped, the model's turn taken as open) before the feed
    refused its text: the next turn began with a stray <end_of_turn> and lost the system prompt."""
    model = sg.load("demo")
    chat = sg.Chat(model.session(), system="SYS")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        chat.user("ab\udcff")  # (a byte of stdin that was not UTF-8)
    chat.user("hello")
    fresh = sg.Chat(model.session(), system="SYS")
    fresh.user("hello")
    assert chat.session.recent_ids == fresh.session.recent_ids


def test_a_stop_string_that_is_not_valid_unicode_is_refused():
    """A lone surrogate (a byte of argv that was not UTF-8) can never match generated text: it was accepted
    and ignored (the websocket protocol already refused it)."""
    with pytest.raises(ValueError, match="not valid Unicode"):
        sg.SamplingParams(stop=["ab\udcff"])
