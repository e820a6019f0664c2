"""The snapshot container (docs/snapshot-format.md, section 1): version 2's
frame index and independent frames, untrusted-input checks of both, and
version-1 snapshots restoring exactly."""

import io
import os
import struct
import time
import zlib
from pathlib import Path

import msgpack
import pytest
import torch
import zstandard
from conftest import random_tokens
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streamgemma as sg
from streamgemma.session import snapshot as snapshot_format
from streamgemma.session import snapshot_frames

FIXTURE_V1 = Path(__file__).parent / "data" / "snapshot_v1_tiny.sgsnap"


@pytest.fixture(scope="module")
def model() -> sg.Model:
    return sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def framed(model) -> bytes:
    """A snapshot at position 30 in about ten frames of 1000 bytes."""
    s = model.session(seed=3)
    s.feed(random_tokens(30, model.config.vocab_size))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(snapshot_frames, "FRAME_BYTES", 1000)
        return s.snapshot({"k": "v"})


def slot_state(session: sg.Session) -> list[torch.Tensor]:
    return [t[session.slot].clone() for layer in session.model.pool.layers for t in layer]


def assert_same_state(a: sg.Session, b: sg.Session) -> None:
    assert a.position == b.position
    for x, y in zip(slot_state(a), slot_state(b)):
        assert torch.equal(x, y)


def document(blob: bytes) -> dict:
    """As a plain zstd decoder reads it: frames in order, the index skipped."""
    packed = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
    return msgpack.unpackb(packed, raw=False)


def parse(blob: bytes) -> tuple[list[tuple[int, int, int]], list[bytes]]:
    """(index entries, frames) of a version-2 blob, for tests that tamper with them."""
    (count,) = struct.unpack_from("<I", blob, 12)
    entries = [struct.unpack_from("<III", blob, 16 + 12 * i) for i in range(count)]
    at, frames = 16 + 12 * count + 4, []
    for size, _, _ in entries:
        frames.append(blob[at:at + size])
        at += size
    return entries, frames


def build(entries, frames, *, count=None, payload=None, tag=b"SGS2", crc=None) -> bytes:
    """A version-2 container from index entries and frames, any field overridable."""
    count = len(entries) if count is None else count
    body = tag + struct.pack("<I", count) + b"".join(struct.pack("<III", *e) for e in entries)
    payload = len(body) + 4 if payload is None else payload
    crc = zlib.crc32(body) if crc is None else crc
    return struct.pack("<II", 0x184D2A53, payload) + body + struct.pack("<I", crc) + b"".join(frames)


# -- round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 255, 256, 257, 1000, 3 * 256 + 7])
@pytest.mark.parametrize("level", [-1, 1, 3])
def test_pack_unpack_round_trips(monkeypatch, size, level):
    monkeypatch.setattr(snapshot_frames, "FRAME_BYTES", 256)
    data = os.urandom(size // 2) + bytes(size - size // 2)
    pieces = [data[:size // 3], memoryview(data)[size // 3:], b""]
    blob = snapshot_frames.pack(pieces, level, threads=2)
    assert snapshot_frames.unpack(blob, size) == (2, data)
    assert snapshot_frames.unpack(blob, size, threads=1) == (2, data)
    assert len(parse(blob)[0]) == -(-size // 256)
    assert snapshot_frames.pack(pieces, level, threads=1) == blob
    with pytest.raises(sg.SnapshotFormatError, match="more than"):
        snapshot_frames.unpack(blob, size - 1)  # the bound is checked on the index


def test_a_large_document_uses_larger_frames_not_more(monkeypatch):
    monkeypatch.setattr(snapshot_frames, "FRAME_BYTES", 16)
    data = os.urandom(snapshot_frames.MAX_FRAMES * 16 + 5)
    blob = snapshot_frames.pack([data], -1)
    assert len(parse(blob)[0]) == -(-len(data) // 17) <= snapshot_frames.MAX_FRAMES  # frames of 17 bytes
    assert snapshot_frames.unpack(blob, len(data)) == (2, data)


def test_incompressible_content_fits_the_file_bound():
    data = os.urandom(300_000)
    assert len(snapshot_frames.pack([data], 1)) <= snapshot_frames.max_container_bytes(len(data))


@pytest.mark.parametrize("frame_bytes", [64, 1000, 1 << 30])
@pytest.mark.parametrize("position", [0, 5, 30])
def test_restore_of_several_frames_continues_bit_identically(model, monkeypatch, frame_bytes, position):
    monkeypatch.setattr(snapshot_frames, "FRAME_BYTES", frame_bytes)
    s = model.session(seed=11)
    if position:
        s.feed(random_tokens(position, model.config.vocab_size, seed=position))
    blob = s.snapshot({"n": position})
    restored = model.restore(blob)
    assert_same_state(s, restored)
    assert restored.snapshot_metadata == {"n": position}
    if position:  # a session at position 0 has nothing to generate from
        expected = [t.id for t in s.generate(max_tokens=6, temperature=0.9, top_k=20)]
        assert [t.id for t in restored.generate(max_tokens=6, temperature=0.9, top_k=20)] == expected


def test_a_full_window_snapshot_uses_several_frames_by_default():
    """Default frame size, a state of ~1 MB: several frames, decoded in parallel."""
    config = sg.GriffinConfig.preset("tiny", attention_window=2048)
    m = sg.Model.random(config, seed=0, device="cpu", dtype="float32")
    s = m.session(seed=0)
    s.feed(random_tokens(2100, config.vocab_size))
    blob = s.snapshot()
    entries, _ = parse(blob)
    assert len(entries) == -(-sum(e[1] for e in entries) // snapshot_frames.FRAME_BYTES) >= 4
    restored = m.restore(snapshot_format.encode_contents(
        snapshot_format.decode(blob, config, m.fingerprint, threads=3), threads=1))
    assert_same_state(s, restored)
    assert restored.snapshot() == blob


# -- version 1 ------------------------------------------------------------------------------------
def test_a_version_1_file_restores_exactly(model):
    """tests/data/snapshot_v1_tiny.sgsnap was written by the version-1 writer
    (before frames): the tiny model of seed 0, session seed 7, the ids below
    fed, three tokens sampled, metadata {"fixture": ..., "n": 3}. Restored,
    its state is the file's bit for bit; against the same session computed
    here it agrees to float32 rounding (the file was written on another
    machine, whose CPU kernels may round differently)."""
    blob = FIXTURE_V1.read_bytes()
    old = document(blob)
    assert blob[:4] == b"\x28\xb5\x2f\xfd" and old["version"] == 1
    live = model.session(seed=7)
    live.feed([(i * 37 + 11) % 256 for i in range(30)])
    assert [t.id for t in live.generate(max_tokens=3, temperature=0.8, top_p=0.9)] == [141, 251, 251]
    restored = model.restore_file(FIXTURE_V1)
    assert restored.snapshot_metadata == {"fixture": "format version 1", "n": 3}
    assert live.position == restored.position
    for x, y in zip(slot_state(live), slot_state(restored)):
        torch.testing.assert_close(y, x)
    # re-saved, it is a version-2 snapshot of the same state, bit for bit
    resaved = document(restored.snapshot(restored.snapshot_metadata))
    assert resaved["version"] == 2
    assert {k: v for k, v in resaved.items() if k != "version"} == {k: v for k, v in old.items() if k != "version"}
    again = model.restore(restored.snapshot(restored.snapshot_metadata))
    assert_same_state(restored, again)
    for session in (restored, again):
        assert [t.id for t in session.generate(max_tokens=8, temperature=0.8, top_p=0.9)] == \
            [t.id for t in live.fork().generate(max_tokens=8, temperature=0.8, top_p=0.9)]


@pytest.mark.parametrize("position", [0, 5, 30])
def test_version_1_snapshots_of_the_old_writer_restore_exactly(model, position):
    """The version-1 writer: the same document, version 1, in one zstd frame."""
    s = model.session(seed=5)
    if position:
        s.feed(random_tokens(position, model.config.vocab_size, seed=position))
    blob = s.snapshot({"p": position})
    doc = document(blob)
    doc["version"] = 1
    v1 = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(msgpack.packb(doc))
    restored = model.restore(v1)
    assert_same_state(s, restored)
    assert restored.snapshot({"p": position}) == blob


def test_the_version_must_match_the_container(model, framed):
    doc = document(framed)
    with pytest.raises(sg.SnapshotFormatError, match="container"):  # a v2 document in one frame
        model.restore(zstandard.ZstdCompressor(write_checksum=True).compress(msgpack.packb(doc)))
    doc["version"] = 1
    with pytest.raises(sg.SnapshotFormatError, match="container"):  # a v1 document behind an index
        model.restore(snapshot_frames.pack([msgpack.packb(doc)], 1))


# -- untrusted containers -------------------------------------------------------------------------------
fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def assert_restores_exactly_or_refuses(model, blob, original):
    try:
        restored = model.restore(blob)
    except sg.SnapshotError:
        return
    assert_same_state(model.restore(original), restored)


@fuzz
@given(cut=st.integers(min_value=0, max_value=10**9))
def test_truncation_is_refused(model, framed, cut):
    with pytest.raises(sg.SnapshotError):
        model.restore(framed[:cut % len(framed)])


@fuzz
@given(index=st.integers(min_value=0, max_value=10**9), bit=st.integers(min_value=0, max_value=7),
       in_index=st.booleans())
def test_bit_flips_are_refused(model, framed, index, bit, in_index):
    damaged = bytearray(framed)
    damaged[index % (16 + 12 * len(parse(framed)[0]) + 4 if in_index else len(damaged))] ^= 1 << bit
    assert_restores_exactly_or_refuses(model, bytes(damaged), framed)


@fuzz
@given(entries=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                                  st.integers(0, 2**32 - 1)), min_size=1, max_size=4),
       tail=st.binary(max_size=300), count=st.none() | st.integers(0, 2**32 - 1))
def test_indexes_that_lie_are_refused(model, entries, tail, count):
    with pytest.raises(sg.SnapshotError):
        model.restore(build(entries, [tail], count=count))


@fuzz
@given(garbage=st.binary(max_size=400), threads=st.sampled_from([1, 2]), zstd_magic=st.booleans())
def test_garbage_behind_a_valid_index_is_refused(model, garbage, threads, zstd_magic):
    cut = len(garbage) // 2
    frames = [garbage[:cut], garbage[cut:]]
    if zstd_magic:
        frames = [b"\x28\xb5\x2f\xfd" + f for f in frames]
    entries = [(len(f), max(len(f), 1), struct.unpack("<I", f[-4:])[0] if len(f) >= 4 else 0) for f in frames]
    with pytest.raises(sg.SnapshotError):
        model.restore(build(entries, frames), threads=threads)


@fuzz
@given(packed=st.binary(min_size=1, max_size=300))
def test_valid_frames_of_garbage_are_refused(model, packed):
    with pytest.raises(sg.SnapshotError):
        model.restore(snapshot_frames.pack([packed], 1))


def test_a_huge_declared_content_is_refused_before_decompressing(model):
    bomb = zstandard.ZstdCompressor(write_checksum=True).compress(bytes(64 << 20))
    blob = build([(len(bomb), 64 << 20, struct.unpack("<I", bomb[-4:])[0])], [bomb])
    start = time.perf_counter()
    with pytest.raises(sg.SnapshotFormatError, match="more than"):
        model.restore(blob)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("change, error, match", [
    ("count0", sg.SnapshotFormatError, "malformed"),
    ("too_many", sg.SnapshotFormatError, "malformed"),
    ("payload", sg.SnapshotFormatError, "malformed"),
    ("tag", sg.SnapshotFormatError, "not a streamgemma frame index"),
    ("crc", sg.SnapshotCorrupted, "checksum"),
    ("short_index", sg.SnapshotCorrupted, "truncated"),
    ("compressed_smaller", sg.SnapshotCorrupted, "trailing"),
    ("compressed_larger", sg.SnapshotCorrupted, "truncated"),
    ("content_size", sg.SnapshotCorrupted, "declares"),
    ("checksum", sg.SnapshotCorrupted, "checksum its index gives"),
    ("swapped", sg.SnapshotCorrupted, "reordered"),
    ("empty_frame", sg.SnapshotFormatError, "empty frame"),
    ("no_frame_magic", sg.SnapshotCorrupted, "does not start with a zstd frame"),
    ("trailing", sg.SnapshotCorrupted, "trailing"),
])
def test_malformed_indexes_are_refused(model, framed, change, error, match):
    entries, frames = parse(framed)
    entries = [list(e) for e in entries]
    kwargs = {}
    if change == "count0":
        kwargs["count"] = 0
    elif change == "too_many":
        entries *= snapshot_frames.MAX_FRAMES // len(entries) + 1
        frames *= snapshot_frames.MAX_FRAMES // len(frames) + 1
    elif change == "payload":
        kwargs["payload"] = 12 * len(entries) + 13
    elif change == "tag":
        kwargs["tag"] = b"XYZ2"
    elif change == "crc":
        kwargs["crc"] = 0
    elif change == "compressed_smaller":
        entries[-1][0] -= 1
    elif change == "compressed_larger":
        entries[0][0] += 1
    elif change == "content_size":
        entries[1][1] += 1
    elif change == "checksum":
        entries[2][2] ^= 1
    elif change == "swapped":
        frames[1], frames[2] = frames[2], frames[1]
    elif change == "empty_frame":
        entries[0][1] = 0
    elif change == "no_frame_magic":
        frames[0] = b"\x00" + frames[0][1:]
    blob = build(entries, frames, **kwargs)
    if change == "short_index":
        blob = blob[:20]
    elif change == "trailing":
        blob += b"\x00"
    with pytest.raises(error, match=match):
        model.restore(blob)


@pytest.mark.parametrize("writer, match", [
    (zstandard.ZstdCompressor(write_checksum=False), "no content checksum"),
    (zstandard.ZstdCompressor(write_checksum=True, write_content_size=False), "content size"),
])
def test_frames_without_checksum_or_size_are_refused(model, framed, writer, match):
    entries, frames = parse(framed)
    data = zstandard.ZstdDecompressor().decompress(frames[1])
    stream = writer.compressobj()
    frames[1] = stream.compress(data) + stream.flush()
    entries[1] = (len(frames[1]), len(data), struct.unpack("<I", frames[1][-4:])[0])
    with pytest.raises(sg.SnapshotFormatError, match=match):
        model.restore(build(entries, frames))


def test_a_frame_that_fails_its_checksum_is_refused(model, framed):
    """Content damaged where zstd's block decoding cannot see it: only the checksum can."""
    entries, frames = parse(framed)
    data = bytearray(zstandard.ZstdDecompressor().decompress(frames[1]))
    good = zstandard.ZstdCompressor(level=-1, write_checksum=True).compress(bytes(data))
    data[10] ^= 1
    damaged = zstandard.ZstdCompressor(level=-1, write_checksum=True).compress(bytes(data))
    frames[1] = damaged[:-4] + good[-4:]  # the original content's checksum
    entries[1] = (len(frames[1]), len(data), struct.unpack("<I", good[-4:])[0])
    for threads in (1, 2):  # one frame after another, and zstandard's threads
        with pytest.raises(sg.SnapshotCorrupted, match="checksum"):
            model.restore(build(entries, frames), threads=threads)


def test_other_skippable_frames_are_not_snapshots(model):
    with pytest.raises(sg.SnapshotFormatError, match="does not start"):
        model.restore(struct.pack("<II", 0x184D2A50, 4) + b"abcd")


def test_threads_of_the_public_api(model, monkeypatch):
    monkeypatch.setattr(snapshot_frames, "FRAME_BYTES", 512)
    s = model.session(seed=2)
    s.feed(random_tokens(12, model.config.vocab_size))
    blob = s.snapshot(threads=1)
    assert s.snapshot(threads=4) == blob and len(parse(blob)[0]) > 4
    assert_same_state(s, model.restore(blob, threads=3))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            s.snapshot(threads=bad)
        with pytest.raises(ValueError, match="threads"):
            model.restore(blob, threads=bad)
