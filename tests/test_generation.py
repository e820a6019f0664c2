"""Session.generate / agenerate / fork / reset, chat turns, snapshot hooks and bounded memory."""

import anyio
import pytest
import torch
from textfixtures import model, text_model, trained_tokenizer  # noqa: F401 (fixture)

import streamgemma as sg
from streamgemma.session.host import RECENT_IDS_WINDOW

PROMPT = "the quick brown fox 東京 😀"


def ids_of(tokens):
    return [t.id for t in tokens]


def test_streamed_text_is_the_decode_of_the_generated_ids(model):
    s = model.session(seed=3)
    s.feed(PROMPT)
    prompt_ids = s.recent_ids
    tokens = list(s.generate(max_tokens=60, stop_token_ids=[]))
    tok = model.tokenizer
    streamed = "".join(t.text for t in tokens) + s.state.detok.flush()
    assert tok.decode(prompt_ids) + streamed == tok.decode(prompt_ids + ids_of(tokens))
    assert s.position == len(prompt_ids) + 60
    assert tokens[-1].finish_reason == "length" and all(t.finish_reason is None for t in tokens[:-1])
    assert all(t.id < tok.vocab_size for t in tokens)  # spare embedding rows are never sampled


def test_same_seed_same_tokens_other_seed_other_tokens(model):
    def run(seed):
        s = model.session()
        s.feed(PROMPT)
        return ids_of(s.generate(max_tokens=30, seed=seed, top_k=50, stop_token_ids=[]))

    assert run(11) == run(11)
    assert run(11) != run(12)
    a, b = model.session(seed=5), model.session(seed=5)
    for s in (a, b):
        s.feed(PROMPT)
    assert ids_of(a.generate(max_tokens=20, stop_token_ids=[])) == ids_of(b.generate(max_tokens=20, stop_token_ids=[]))


def greedy_text(model, max_tokens=40):
    s = model.session()
    s.feed(PROMPT)
    return list(s.generate(max_tokens=max_tokens, temperature=0, stop_token_ids=[]))


def test_stop_string_across_tokens_is_never_emitted(model):
    tokens = greedy_text(model)
    full = "".join(t.text for t in tokens)
    k = next(k for k in range(5, len(tokens) - 1) if tokens[k].text and tokens[k + 1].text)
    stop = tokens[k].text[-1] + tokens[k + 1].text[0]  # spans the boundary of tokens k and k+1
    s = model.session()
    s.feed(PROMPT)
    out, emitted = [], ""
    for t in s.generate(max_tokens=40, temperature=0, stop=[stop, "never-there"], stop_token_ids=[]):
        out.append(t)
        emitted += t.text
        assert stop not in emitted
    assert emitted == full[:full.find(stop)]
    assert out[-1].finish_reason == "stop"
    assert ids_of(out) == ids_of(tokens[:len(out)])  # every yielded token was consumed
    assert s.position == len(model.tokenizer.encode(PROMPT, add_bos=True)) + len(out)


def test_generating_past_a_stop_needs_new_input(model):
    tokens = greedy_text(model, 10)
    stop_id = tokens[4].id
    s = model.session()
    s.feed(PROMPT)
    out = list(s.generate(max_tokens=10, temperature=0, stop_token_ids=[stop_id]))
    assert ids_of(out) == ids_of(tokens[:ids_of(tokens).index(stop_id) + 1])
    assert out[-1].finish_reason == "stop" and out[-1].text == ""
    with pytest.raises(sg.StoppedError, match=f"stop token {stop_id}"):
        s.generate(max_tokens=5)
    s.feed(" again")
    assert len(list(s.generate(max_tokens=5, stop_token_ids=[]))) == 5


def test_fork_then_diverge_leaves_the_parent_untouched(model):
    parent, twin = model.session(seed=1), model.session(seed=1)
    for s in (parent, twin):
        s.feed(PROMPT)
        list(s.generate(max_tokens=5, stop_token_ids=[]))
    child = parent.fork()
    assert child.position == parent.position and child.slot != parent.slot
    # Same state and RNG: without intervention the copy continues exactly like the parent would.
    fork_ids = ids_of(child.generate(max_tokens=12, stop_token_ids=[]))
    child.feed(" something else entirely")
    list(child.generate(max_tokens=20, seed=99, stop_token_ids=[]))
    assert ids_of(parent.generate(max_tokens=12, stop_token_ids=[])) == fork_ids
    assert ids_of(twin.generate(max_tokens=12, stop_token_ids=[])) == fork_ids
    assert torch.equal(parent.step(7), twin.step(7))
    assert torch.equal(parent.feed("hello world"), twin.feed("hello world"))


def test_reset_returns_to_position_zero(model):
    s = model.session(seed=4)
    s.feed(PROMPT)
    first = ids_of(s.generate(max_tokens=8, stop_token_ids=[]))
    s.reset()
    assert s.position == 0 and s.recent_ids == []
    with pytest.raises(ValueError, match="needs a prompt"):
        s.generate()
    s.feed(PROMPT)
    assert ids_of(s.generate(max_tokens=8, stop_token_ids=[])) == first


def test_extra_state_round_trip_continues_exactly(model):
    s = model.session(seed=8)
    s.feed(PROMPT)
    list(s.generate(max_tokens=9, stop_token_ids=[]))
    extra = s.state.to_extra()
    assert set(extra) == {"rng", "detok_pending", "recent_ids", "logits", "stopped"}
    assert isinstance(extra["rng"], bytes) and isinstance(extra["detok_pending"], bytes)
    assert extra["recent_ids"] == s.recent_ids and all(type(i) is int for i in extra["recent_ids"])
    assert len(extra["logits"]) == 4 * model.config.vocab_size and extra["stopped"] is None
    other = model.session()
    model.pool.copy_slot(s.slot, other.slot)
    other.restore_host(extra)
    # the next-token logits travel too: both continue at once, sampling alike
    a = [(t.id, t.text) for t in s.generate(max_tokens=15, stop_token_ids=[])]
    b = [(t.id, t.text) for t in other.generate(max_tokens=15, stop_token_ids=[])]
    assert a == b


def test_pending_bytes_survive_the_extra_state(model):
    tok = model.tokenizer
    crab = tok.encode("🦀")  # four byte pieces
    s = model.session()
    s.feed([tok.bos_id, *crab[:2]])
    assert s.state.to_extra()["detok_pending"] == "🦀".encode()[:2]
    other = model.session()
    other.restore_host(s.state.to_extra())
    assert "".join(other.state.detok.push(i) for i in crab[2:]) == "🦀"


def test_state_memory_does_not_grow(model):
    s = model.session(seed=0)
    s.feed(PROMPT)
    list(s.generate(max_tokens=10 - s.position, stop_token_ids=[]))
    assert s.position == 10
    capacity, small = model.pool.capacity, s.state_bytes()
    s.feed(torch.randint(4, 400, (9_980,), generator=torch.Generator().manual_seed(0)).tolist())
    list(s.generate(max_tokens=10, stop_token_ids=[]))
    assert s.position == 10_000
    assert s.state_bytes() == small
    assert model.pool.capacity == capacity
    extra = s.state.to_extra()
    assert len(extra["recent_ids"]) == RECENT_IDS_WINDOW and len(extra["detok_pending"]) <= 3
    assert small < model.pool.slot_bytes() + 20_000  # the host side is a few kilobytes


def test_bad_input_is_named():
    m = text_model()
    s = m.session()
    with pytest.raises(ValueError, match="empty string"):
        s.feed("")
    with pytest.raises(ValueError, match="token id 512 at index 1"):
        s.feed([2, 512])
    with pytest.raises(ValueError, match="needs a prompt"):
        s.generate()
    s.feed("hello")
    with pytest.raises(ValueError, match="temperature must be >= 0.0, got -1"):
        s.generate(temperature=-1)
    with pytest.raises(ValueError, match="token id 9999"):
        s.generate(stop_token_ids=[9999])
    bare = sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0, device="cpu", dtype="float32")
    b = bare.session()
    with pytest.raises(ValueError, match="needs a tokenizer"):
        b.feed("hello")
    b.feed([1, 2, 3])
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        b.generate(stop=["x"])
    assert all(t.text == "" for t in b.generate(max_tokens=3))  # ids only, no text


def test_agenerate_matches_generate_and_cleans_up_on_cancel(model):
    sync = model.session()
    sync.feed(PROMPT)
    expected = ids_of(sync.generate(max_tokens=12, seed=2, stop_token_ids=[]))

    async def main():
        s = model.session()
        s.feed(PROMPT)
        got = [t.id async for t in s.agenerate(max_tokens=12, seed=2, stop_token_ids=[])]
        assert got == expected

        c = model.session()
        c.feed(PROMPT)
        start, received = c.position, []
        with anyio.move_on_after(30):
            async with anyio.create_task_group() as tg:
                async def consume():
                    async for t in c.agenerate(max_tokens=None, stop_token_ids=[]):
                        received.append(t.id)
                        if len(received) == 3:
                            tg.cancel_scope.cancel()
                tg.start_soon(consume)
        assert len(received) == 3
        position = c.position
        assert position - start in (3, 4)  # a step in flight at cancellation finishes and is kept
        await anyio.sleep(0.05)
        assert c.position == position  # nothing runs on the session after the cancel
        c.feed(" more")  # and it is usable again

    anyio.run(main)


def test_chat_turns_match_rereading_the_history(model):
    tok = model.tokenizer
    eot = tok.piece_id("<end_of_turn>")
    s = model.session(seed=6)
    chat = sg.Chat(s)
    chat.user("hello world")
    reply1 = ids_of(chat.reply(max_tokens=6, stop_token_ids=[]))  # cut short: the next turn must close it
    chat.user("café 😀 again")
    reply2 = ids_of(chat.reply(max_tokens=4, stop_token_ids=[]))
    s.step(eot)  # as if the model had closed its turn itself
    last = chat.user("the end")
    history = s.recent_ids
    expected = (tok.encode("<start_of_turn>user\nhello world<end_of_turn>\n<start_of_turn>model\n", add_bos=True)
                + reply1 + tok.encode("<end_of_turn>\n<start_of_turn>user\ncafé 😀 again<end_of_turn>\n"
                                      "<start_of_turn>model\n")
                + reply2 + [eot] + tok.encode("\n<start_of_turn>user\nthe end<end_of_turn>\n<start_of_turn>model\n"))
    assert history == expected
    reread = model.session()
    assert torch.allclose(reread.feed(history), last, rtol=1e-5, atol=1e-5)
    reread_stepwise = model.session()
    for i in history:
        logits = reread_stepwise.step(i)
    assert torch.allclose(logits, last, rtol=1e-4, atol=1e-5)


def test_chat_needs_a_chat_tokenizer_and_a_user_turn(model):
    chat = sg.Chat(model.session())
    with pytest.raises(ValueError, match="needs a user turn"):
        chat.reply()
    with pytest.raises(ValueError, match="needs some text"):
        chat.user("  ")
    bare = sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0, device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        sg.Chat(bare.session())


@pytest.mark.parametrize("generated_before", [0, 3, 20])  # right after feed; before and after the ring (8) wraps
@pytest.mark.parametrize("via", ["bytes", "file"])
def test_sampled_generation_resumes_exactly_after_a_snapshot(model, tmp_path, generated_before, via):
    sampling = dict(temperature=0.9, top_p=0.9, repetition_penalty=1.1, stop_token_ids=[])
    s = model.session(seed=21)
    s.feed(PROMPT)
    if generated_before:
        list(s.generate(max_tokens=generated_before, **sampling))
    if via == "bytes":
        restored = model.restore(s.snapshot())
    else:
        s.save(tmp_path / "s.sgsnap")
        restored = model.restore_file(tmp_path / "s.sgsnap")
    want = [(t.id, t.text) for t in s.generate(max_tokens=25, **sampling)]
    got = [(t.id, t.text) for t in restored.generate(max_tokens=25, **sampling)]
    assert got == want
    assert restored.position == s.position


def test_warm_up_has_nothing_to_do_on_the_cpu_and_checks_its_argument():
    m = sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0, device="cpu")
    free = len(m.pool._free)
    assert m.warm_up(8) == 0.0
    assert len(m.pool._free) == free
    with pytest.raises(ValueError, match="max_batch"):
        m.warm_up(0)


def test_a_session_stopped_by_a_very_long_stop_string_can_be_snapshotted(monkeypatch):
    """The stop's description (kept in the snapshot, at most MAX_STOPPED_CHARS: lowered here to keep
    the test short) is cut, not refused by the snapshot."""
    monkeypatch.setattr("streamgemma.session.snapshot.MAX_STOPPED_CHARS", 60)
    monkeypatch.setattr("streamgemma.session.generation.MAX_STOPPED_CHARS", 60)
    model = text_model()
    s = model.session(seed=0)
    s.feed("hello")
    text = "".join(t.text for t in s.fork().generate(max_tokens=200, temperature=0.0, stop_token_ids=[]))
    stop = text[:80]
    out = "".join(t.text for t in s.generate(max_tokens=200, temperature=0.0, stop_token_ids=[], stop=[stop]))
    assert out == "" and s.state.stopped.startswith("stop string ") and len(s.state.stopped) == 60
    restored = model.restore(s.snapshot())
    assert restored.state.stopped == s.state.stopped


def test_complete_refuses_bad_sampling_before_feeding_the_prompt(model):
    s = model.session(seed=0)
    with pytest.raises(ValueError, match="temperature"):
        s.complete("hello world", temperature=-1.0)
    assert s.position == 0  # (the prompt used to be consumed first)


def test_numpy_top_k_generates_as_an_int_does(model):
    import numpy as np

    def run(top_k):
        s = model.session(seed=0)
        s.feed(PROMPT)
        return ids_of(s.generate(max_tokens=3, top_k=top_k, stop_token_ids=[]))

    assert run(np.int64(3)) == run(3)


def test_bytes_pending_before_a_stop_token_are_emitted(model):
    """An incomplete byte-fallback character right before a stop token: its U+FFFD is emitted, as
    tokenizer.decode of the ids gives it (the stop token's handling used to drop it)."""
    tok = model.tokenizer
    for stop in ([], ["zzz"]):  # without and with stop strings (held-back text)
        s = model.session(seed=0)
        s.feed("hello")
        gen = s.start_generation(sg.SamplingParams(max_tokens=10, stop=stop))
        ids = tok.encode(" world") + [tok.piece_id("<0xF0>")]
        out = [gen.accept(i, s.logits) for i in ids + [tok.piece_id("<end_of_turn>")]]
        assert out[-1].finish_reason == "stop" and out[-1].id == tok.piece_id("<end_of_turn>")
        assert "".join(t.text for t in out) == tok.decode(ids) and tok.decode(ids).endswith("\ufffd")
