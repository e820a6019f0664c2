"""Sessions at their edges: generators of closed or reset sessions, restore while the pool grows, feed of
bytes or a non-iterable, a pool growth that runs out of memory (each found by a review)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from textfixtures import model, text_model  # noqa: F401 (fixture)

from streamgemma.session import snapshot_bytes

PROMPT = "the quick brown fox jumps over the lazy dog"


def test_generator_of_a_closed_session_says_it_is_closed(model):
    s = model.session(seed=0)
    s.feed(PROMPT)
    gen = s.generate(max_tokens=10, stop_token_ids=[])
    next(gen)
    s.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(gen)


def test_generator_of_a_session_closed_mid_step_never_writes_into_a_reused_slot(model):
    s = model.session(seed=0)
    s.feed(PROMPT)
    gen = s.generate(max_tokens=10, stop_token_ids=[])
    real_decode = model.decode
    in_step, go = threading.Event(), threading.Event()

    def slow_decode(slots, tokens):
        if threading.current_thread() is not threading.main_thread():
            in_step.set()
            go.wait(10)
        return real_decode(slots, tokens)

    model.decode = slow_decode
    worker = threading.Thread(target=next, args=(gen,))
    worker.start()
    assert in_step.wait(10)
    closer = threading.Thread(target=s.close)  # e.g. the event loop closing a session while agenerate's step runs
    closer.start()
    while not s.closed:
        pass
    go.set()
    worker.join(10)
    closer.join(10)
    model.decode = real_decode
    other = model.session(seed=0)
    assert other.slot == s.slot  # the slot was given back and handed out again
    other.feed(PROMPT)
    before = other.position
    try:
        next(gen)
    except RuntimeError:
        pass
    assert other.position == before  # the closed session's generator must not step another session's slot


def test_reset_while_a_generation_is_suspended(model):
    s = model.session(seed=0)
    s.feed(PROMPT)
    gen = s.generate(max_tokens=10, stop_token_ids=[])
    next(gen)
    s.reset()
    try:
        t = next(gen)
    except (RuntimeError, ValueError, StopIteration):
        return  # refusing is fine
    # if it goes on, the session's host state must describe what the slot consumed
    assert s.position == 1
    assert s.recent_ids == [t.id]
    assert s.logits is not None


def test_restore_while_another_thread_grows_the_pool(model, monkeypatch):
    s = model.session(seed=0)
    s.feed(PROMPT)
    blob = s.snapshot()
    twin = model.restore(blob)
    want = twin.step(5)
    twin.close()
    real = snapshot_bytes.cpu_destination_and_source
    opened, threads = [], []

    def grow_midway(*args):
        if not threads:  # another thread opens sessions (the pool grows) while this restore writes the slot
            t = threading.Thread(target=lambda: opened.extend(model.session() for _ in range(4)))
            threads.append(t)
            t.start()
            t.join(2)  # with the model lock held during the write, it waits for the restore instead
        return real(*args)

    monkeypatch.setattr(snapshot_bytes, "cpu_destination_and_source", grow_midway)
    restored = model.restore(blob)
    monkeypatch.undo()
    threads[0].join(10)
    assert len(opened) == 4
    assert restored.position == s.position
    assert torch.allclose(restored.step(5), want)


@pytest.mark.parametrize("bad", [b"hello", 5, None, 3.0])
def test_feed_refuses_non_token_input_with_a_named_error(model, bad):
    s = model.session()
    with pytest.raises((TypeError, ValueError), match="token|text|feed"):
        s.feed(bad)
    assert s.position == 0


def test_numpy_and_tensor_ids(model):
    a, b = model.session(), model.session()
    ids = model.tokenizer.encode(PROMPT, add_bos=True)
    la = a.feed(np.array(ids))
    lb = b.feed(torch.tensor(ids))
    assert torch.equal(la, lb)
    assert torch.equal(a.step(np.int64(7)), b.step(torch.tensor(7)))


def test_a_failed_growth_leaves_the_pool_usable(model, monkeypatch):
    s = model.session(seed=0)
    s.feed(PROMPT)
    pool = model.pool
    real = pool._alloc_layer
    calls = []

    def oom_on_second(kind, n):
        calls.append(kind)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("simulated")
        return real(kind, n)

    monkeypatch.setattr(pool, "_alloc_layer", oom_on_second)
    with pytest.raises(torch.OutOfMemoryError):
        model.session()
    monkeypatch.undo()
    other = model.session()  # memory is back: growing must work
    other.feed(PROMPT)
    s.step(5)
    other.step(5)


def test_position_and_recent_ids_after_stops(model):
    s = model.session(seed=3)
    ids = model.tokenizer.encode(PROMPT, add_bos=True)
    s.feed(ids)
    toks = list(s.generate(max_tokens=30, stop_token_ids=[], temperature=0))
    stop = toks[2].text or "e"
    s2 = model.session(seed=3)
    s2.feed(ids)
    got = list(s2.generate(max_tokens=30, stop=[stop], stop_token_ids=[], temperature=0))
    assert s2.position == len(ids) + len(got)
    assert s2.recent_ids[len(ids):] == [t.id for t in got]


def test_fork_mid_generation_continues_alike(model):
    s = model.session(seed=1)
    s.feed(PROMPT)
    gen = s.generate(max_tokens=20, stop_token_ids=[])
    for _ in range(5):
        next(gen)
    child = s.fork()
    a = [t.id for t in gen]
    b = [t.id for t in child.generate(max_tokens=15, stop_token_ids=[])]
    assert a == b


def test_restore_mid_generation_continues_alike(model):
    s = model.session(seed=1)
    s.feed(PROMPT)
    gen = s.generate(max_tokens=20, stop_token_ids=[])
    for _ in range(5):
        next(gen)
    r = model.restore(s.snapshot())
    a = [(t.id, t.text) for t in gen]
    b = [(t.id, t.text) for t in r.generate(max_tokens=15, stop_token_ids=[])]
    assert a == b


def test_model_decode_and_prefill_refuse_ids_outside_the_vocabulary(model):
    """`Model.decode` / `prefill` (public: docs/gpu.md) took -1 as the last row of the embedding and
    failed on vocab_size with a bare IndexError (on a device: a read out of bounds)."""
    vocab = model.config.vocab_size
    s = model.session()
    s.feed([2, 5])
    for bad in (-1, vocab):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model.decode([s.slot], [bad])
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model.prefill(s.slot, [5, bad])
    with pytest.raises(TypeError, match="expected an int"):
        model.decode([s.slot], ["a"])
    assert s.position == 2  # nothing consumed
    model.decode([s.slot], [vocab - 1])
    assert s.position == 3


def test_a_closed_session_does_not_report_the_position_of_its_slots_next_owner(model):
    a = model.session()
    a.feed([2, 5, 7])
    a.close()
    b = model.session()
    b.feed([2] * 11)
    assert a.position == 3 and repr(a) == "Session(position=3, closed)"
    with pytest.raises(RuntimeError, match="closed"):
        a.state_bytes()
    b.close()


def test_sessions_restored_from_one_capture_do_not_share_their_metadata(model):
    s = model.session()
    s.feed([2, 5])
    contents = s.capture(metadata={"user": "x"})
    r1, r2 = model.restore(contents), model.restore(contents)
    r1.snapshot_metadata["user"] = "changed"
    assert r2.snapshot_metadata.get("user") != "changed"


def test_restore_file_refuses_a_fifo_instead_of_blocking(model, tmp_path):
    import os

    from streamgemma import SnapshotFormatError

    fifo = tmp_path / "s.sgsnap"
    os.mkfifo(fifo)
    outcome = {}

    def restore():
        try:
            model.restore_file(fifo)
        except Exception as e:  # noqa: BLE001
            outcome["error"] = e

    thread = threading.Thread(target=restore, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "restore_file blocked on a FIFO"
    assert isinstance(outcome.get("error"), SnapshotFormatError)


def test_a_random_stream_at_its_last_counter_is_refused_before_it_advances():
    from streamgemma.sampling.philox import RandomStream

    stream = RandomStream(7, 2 ** 64 - 1)
    with pytest.raises(ValueError, match="used up"):
        stream.take()
    assert stream.counter == 2 ** 64 - 1 and len(stream.to_bytes()) == 20


def test_load_of_a_non_path_is_a_type_error_naming_it():
    import streamgemma as sg

    with pytest.raises(TypeError, match="path must be"):
        sg.load(123)


def test_ctrl_c_during_a_long_feed_keeps_the_session_consistent(monkeypatch):
    """Ctrl-C mid-feed left the state advanced by the chunks done while `position`'s host side,
    `recent_ids` and the logits were those of before the feed: generate() sampled from stale logits
    and a snapshot stored them. Now the feed ends at a chunk's end, keeping the chunks consumed."""
    import os
    import signal

    import streamgemma as sg

    model = sg.load("demo")
    model.prefill_chunk = 64
    ids = [2] + [5 + i % 200 for i in range(400)]
    s = model.session(seed=0)
    real, calls = model.prefill, [0]

    def prefill(slot, tokens, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # (delivered while the third chunk runs)
        return real(slot, tokens, *args, **kwargs)

    monkeypatch.setattr(model, "prefill", prefill)
    with pytest.raises(KeyboardInterrupt):
        s.feed(ids)
    monkeypatch.undo()
    assert s.position == 3 * 64 and len(s.recent_ids) == 3 * 64
    fresh = model.session(seed=0)
    fresh.feed(ids[:3 * 64])
    assert torch.equal(s.logits, fresh.logits)
    s.feed(ids[3 * 64:])  # the rest, resent, continues as one feed would have
    whole = model.session(seed=0)
    whole.feed(ids)
    assert torch.allclose(s.logits, whole.logits, atol=1e-5)


def test_an_empty_model_path_is_refused_not_the_current_directory(tmp_path, monkeypatch):
    import streamgemma as sg

    sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0, dtype="float32").save(tmp_path)
    monkeypatch.chdir(tmp_path)  # (a checkpoint here was loaded by sg.load(""))
    for path in ("", "  "):
        with pytest.raises(ValueError, match="the model path is empty"):
            sg.load(path)


def test_engine_append_refuses_bytes_instead_of_taking_each_byte_for_a_token(model):
    import anyio

    from streamgemma.serve.engine import Engine

    async def main():
        engine = Engine(model, max_active=1)
        es = await engine.open(seed=0)
        for data in (b"Hello", bytearray(b"Hi"), memoryview(b"Hi")):
            with pytest.raises(TypeError, match="decode bytes to text first"):
                engine.append(es, data)

    anyio.run(main, backend="asyncio")


def test_logits_returned_by_feed_and_step_are_the_callers_to_change(model):
    """They were the session's own tensor: masking one in place changed what generate() sampled."""
    s, t = model.session(seed=0), model.session(seed=0)
    first = s.feed(PROMPT)
    t.feed(PROMPT)
    first[first.argmax()] = float("-inf")
    s.step(3)[:] = 0
    t.step(3)
    assert torch.equal(s.logits, t.logits)
    assert [x.id for x in s.generate(max_tokens=5, temperature=0)] == \
        [x.id for x in t.generate(max_tokens=5, temperature=0)]


def test_bad_arguments_of_snapshot_warm_up_and_save_are_clear_errors(model, tmp_path):
    """zstandard's TypeError about 'str' objects, a '<' between str and int, and a save writing a
    file per tensor for max_shard_bytes=0 (review)."""
    s = model.session(seed=0)
    s.feed(PROMPT)
    for level in ("1", 1.5, True):
        with pytest.raises(TypeError, match="level must be an int"):
            s.snapshot(level=level)
    with pytest.raises(TypeError, match="max_batch must be an integer"):
        model.warm_up("2")
    for size in (0, -1):
        with pytest.raises(ValueError, match="max_shard_bytes must be in"):
            model.save(tmp_path / "x", max_shard_bytes=size)
    assert not (tmp_path / "x").exists()
