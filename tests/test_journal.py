"""The write-ahead journal: records survive as framed, checksummed appends
(a torn tail is ignored), compaction drops what a snapshot covers, and an
engine that dies between two ticks (no shutdown, no suspension) is recovered
from its store by another engine: last snapshot + replay through the same
prefill chunks and decode steps, sampler stream included, so the
continuation is token-identical on the CPU in float32."""

from __future__ import annotations

import os

import anyio
import pytest
import torch
from textfixtures import text_model

import streamgemma as sg
from streamgemma.sampling.params import SamplingParams
from streamgemma.serve.engine import Engine
from streamgemma.session.journal import DirectoryJournal, JournalRecord, decode_records, replay


def record(position: int, kind: str = "step", ids=(5,)) -> JournalRecord:
    return JournalRecord(position, kind, tuple(ids), b"PHX1" + bytes(16), None)


def test_records_round_trip_and_a_torn_tail_is_ignored(tmp_path):
    journal = DirectoryJournal(tmp_path)
    journal.append({"a": [record(0, "feed", [2, 7, 9]).encode(), record(3).encode()], "b": [record(0).encode()]})
    assert journal.read("a") == [record(0, "feed", [2, 7, 9]), record(3)]
    with open(journal.path("a"), "ab") as f:  # a crash in the middle of an append
        f.write(record(4).encode()[:-3])
    assert journal.read("a") == [record(0, "feed", [2, 7, 9]), record(3)]
    damaged = bytearray(record(4).encode())
    damaged[-1] ^= 1
    assert decode_records(record(3).encode() + bytes(damaged)) == [record(3)]
    assert journal.read("missing") == []


@pytest.mark.parametrize("fields, message", [
    ({"position": 0}, "not \\[position"),
    ([0, "step", [5], b"PHX1" + bytes(16)], "not \\[position"),
    ([0, "jump", [5], b"PHX1" + bytes(16), None], "unknown kind"),
    ([0.5, "step", [5], b"PHX1" + bytes(16), None], "position"),
    ([-1, "step", [5], b"PHX1" + bytes(16), None], "position"),
    ([0, "step", ["5"], b"PHX1" + bytes(16), None], "ids"),
    ([0, "step", [True], b"PHX1" + bytes(16), None], "ids"),
    ([0, "step", [], b"PHX1" + bytes(16), None], "'step' record with 0 ids"),
    ([0, "feed", [], b"PHX1" + bytes(16), None], "'feed' record with 0 ids"),
    ([0, "rng", [5], b"PHX1" + bytes(16), None], "'rng' record with 1 ids"),
    ([0, "step", [5], b"PHX1", None], "sampler state"),
    ([0, "step", [5], "PHX1" + "0" * 16, None], "sampler state"),
    ([0, "step", [5], b"PHX1" + bytes(16), 7], "stop"),
])
def test_a_record_with_intact_framing_but_bad_fields_is_refused_by_name(fields, message):
    """A record that passes its CRC but was not written by the journal (another program, a bug): a
    SnapshotFormatError naming the field at read time, not a TypeError or IndexError inside a replay."""
    import zlib

    import msgpack

    from streamgemma.session.journal import FRAME

    payload = msgpack.packb(fields, use_bin_type=True)
    data = record(0).encode() + FRAME.pack(len(payload), zlib.crc32(payload)) + payload
    with pytest.raises(sg.SnapshotFormatError, match=message):
        decode_records(data)


def test_records_appended_after_a_torn_tail_are_read(tmp_path):
    """A crash mid-append leaves a torn tail; the next process's first append cuts it off, so its
    records (acknowledged once durable) are not hidden behind it, also after compaction."""
    DirectoryJournal(tmp_path).append({"a": [record(0, "feed", [2, 7, 9]).encode(), record(3).encode()]})
    with open(tmp_path / "a.sgjournal", "ab") as f:
        f.write(record(4).encode()[:-3])
    recovered = DirectoryJournal(tmp_path)  # a restarted server
    recovered.append({"a": [record(4).encode()]})
    recovered.append({"a": [record(5).encode()]})  # (the file is known intact now: no second check)
    assert recovered.read("a") == [record(0, "feed", [2, 7, 9]), record(3), record(4), record(5)]
    recovered.compact("a", 4)
    assert DirectoryJournal(tmp_path).read("a") == [record(4), record(5)]


def test_a_short_write_is_completed(tmp_path, monkeypatch):
    """os.write may write part of a buffer without raising (a full disk): the rest is written too."""
    import streamgemma.session.journal as journal_module

    real_write = os.write
    monkeypatch.setattr(journal_module.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    journal = DirectoryJournal(tmp_path)
    journal.append({"a": [record(0, "feed", [2, 7, 9]).encode(), record(3).encode()]})
    monkeypatch.setattr(journal_module.os, "write", lambda fd, data: 0)
    with pytest.raises(OSError, match="could not write to the journal"):
        journal.append({"a": [record(4).encode()]})
    monkeypatch.undo()
    assert journal.read("a") == [record(0, "feed", [2, 7, 9]), record(3)]


def test_compaction_drops_what_a_snapshot_covers(tmp_path):
    journal = DirectoryJournal(tmp_path)
    journal.append({"a": [record(0, "feed", [1, 2, 3]).encode(), record(3).encode(), record(4).encode()]})
    journal.compact("a", 4)
    assert journal.read("a") == [record(4)]
    journal.compact("a", 5)
    assert journal.read("a") == [] and not journal.path("a").exists()
    journal.delete("a")  # none: no error


def test_replay_refuses_a_gap():
    session = text_model().session()
    session.feed([2, 5, 6])
    with pytest.raises(sg.SnapshotFormatError, match="missing"):
        replay(session, [record(5)])


def test_replay_refuses_a_token_the_model_does_not_have():
    """A journal of another model (a larger vocabulary) stops the replay with a SnapshotFormatError,
    which the engine answers with snapshot_error, not with the model's ValueError."""
    session = text_model().session()
    session.feed([2, 5, 6])
    vocab = session.model.config.vocab_size
    for bad in (record(3, ids=[vocab]), record(3, "feed", [4, vocab + 7])):
        with pytest.raises(sg.SnapshotFormatError, match="position 3 does not fit this model.*outside"):
            replay(session, [bad])
        assert session.position == 3


def test_an_engine_that_died_between_ticks_is_recovered_token_identically(tmp_path):
    """Sessions in every state (mid-generation sampled with and without a
    seed, input consumed in prefill chunks and riding along in decode rows,
    input still queued, suspended) at a tick boundary; the engine is then
    abandoned. A new engine on the same store resumes each at the position
    the first one acknowledged, with the same state: the next tokens match."""
    model = text_model()
    texts = ["the quick brown fox jumps over the lazy dog " * 3, "hello world", "stream gemma token"]

    async def main():
        store = sg.DirectorySnapshotStore(tmp_path)
        engine = Engine(model, max_active=3, store=store, input_chunk=8, step_input_tokens=4)
        sessions = [await engine.open(seed=None if i % 2 else 100 + i) for i in range(4)]
        acked: dict[str, int] = {}
        for es, text in zip(sessions, texts + ["café naïve"]):
            pending = engine.append(es, text)
            pending.add_done_callback(lambda p, sid=es.id: acked.__setitem__(sid, p.position))
        for _ in range(12):
            await engine.tick()
        streams = [await engine.generate(es, SamplingParams(max_tokens=40, stop_token_ids=(),
                                                            seed=7 if i == 0 else None))
                   for i, es in enumerate(sessions[:3])]
        for _ in range(5):
            await engine.tick()
        engine.append(sessions[1], [9, 10, 11])  # rides along (short) in the next ticks
        engine.append(sessions[2], list(range(20, 40)))  # prefill chunks of 8
        for _ in range(4):
            await engine.tick()
        engine.append(sessions[3], [12, 13])  # queued, never consumed: never acknowledged
        sent = {es.id: len(s.take_ready()) for es, s in zip(sessions, streams)}
        assert all(sent.values())
        # The crash: engine abandoned here. The survivor reads the same directory.
        assert sum(len(store.journal().read(es.id)) for es in sessions) > 20  # recovery replays them
        survivor = Engine(model, max_active=4, store=sg.DirectorySnapshotStore(tmp_path))
        for es in sessions:
            recovered = await survivor.resume(es.id)
            assert recovered.position == es.position  # everything consumed at a tick's end is durable
            assert es.position >= acked.get(es.id, 0)
            # (one suspended in the first engine is restored there from its memory copy)
            a = es.live if es.live is not None else await engine.offloader.restore(es.id)
            b = recovered.live if recovered.live is not None else await survivor.offloader.restore(es.id)
            assert torch.allclose(a.logits, b.logits, atol=1e-5, rtol=0)
            assert a.state.rng == b.state.rng and a.state.stopped == b.state.stopped
            assert list(a.state.recent) == list(b.state.recent)
            assert ([t.id for t in a.generate(max_tokens=12, stop_token_ids=[])]
                    == [t.id for t in b.generate(max_tokens=12, stop_token_ids=[])])

    anyio.run(main)


def test_background_snapshots_bound_the_journal(tmp_path):
    model = text_model()

    async def main():
        store = sg.DirectorySnapshotStore(tmp_path)
        engine = Engine(model, store=store, snapshot_every=8)
        es = await engine.open(seed=4)
        pending = engine.append(es, "hello world")
        while not pending.done:
            await engine.tick()
        stream = await engine.generate(es, SamplingParams(max_tokens=30, stop_token_ids=()))
        while es.generation is not None:
            await engine.tick()
        await anyio.sleep(0.2)  # the last background write
        records = store.journal().read(es.id)
        assert len(records) < 10 and records[0].position >= 30  # compacted behind the snapshots
        assert model.restore(store.get(es.id)).position > 30  # the snapshot written in the background
        recovered = await Engine(model, store=sg.DirectorySnapshotStore(tmp_path)).resume(es.id)
        assert recovered.position == es.position
        return [t.id for t in stream.take_ready()]

    assert len(anyio.run(main)) == 30


def test_a_journal_that_does_not_continue_the_snapshot_is_a_snapshot_error(tmp_path):
    """Records missing between the stored snapshot and the journal: `resume` refuses with the engine's
    snapshot_error, and no half-replayed session stays in the engine."""
    model = text_model()

    async def main():
        store = sg.DirectorySnapshotStore(tmp_path)
        engine = Engine(model, max_active=2, store=store)
        es = await engine.open(seed=1)
        engine.append(es, [2, 5, 6, 7])
        await engine.tick()
        await engine.snapshot(es)
        assert es.position == 4
        await engine.close(es, delete=False)
        store.journal().append({es.id: [record(es.position + 5).encode()]})  # a gap of five positions
        survivor = Engine(model, max_active=2, store=sg.DirectorySnapshotStore(tmp_path))
        with pytest.raises(sg.EngineError) as refused:
            await survivor.resume(es.id)
        return refused.value.code, es.id, survivor

    code, sid, survivor = anyio.run(main)
    assert code == "snapshot_error" and sid not in survivor.sessions and survivor.active == 0
