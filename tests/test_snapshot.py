"""Snapshots: exact suspend/resume, validation of untrusted bytes, the
directory store."""

import gc
import io
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import torch
import zstandard
from conftest import random_tokens, subprocess_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streamgemma as sg
from streamgemma.session import snapshot as snapshot_format
from streamgemma.session import snapshot_bytes, snapshot_frames
from streamgemma.session.host import HostState
from streamgemma.session.store import write_file_atomic


@pytest.fixture(scope="module")
def model() -> sg.Model:
    return sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def blob30(model) -> bytes:
    """A snapshot at position 30 (the window-8 ring has wrapped)."""
    s = model.session(seed=7)
    s.feed(random_tokens(30, model.config.vocab_size))
    return s.snapshot({"user": "ada", "turn": 3})


def greedy(session: sg.Session, first_token: int, n: int) -> list[torch.Tensor]:
    """Logits of `n` greedy steps starting by feeding `first_token`."""
    out, token = [], first_token
    for _ in range(n):
        logits = session.step(token)
        out.append(logits)
        token = int(torch.argmax(logits))
    return out


def slot_state(session: sg.Session) -> list[torch.Tensor]:
    return [t[session.slot].clone() for layer in session.model.pool.layers for t in layer]


def run_conversation(model: sg.Model, position: int) -> tuple[sg.Session, int]:
    """A session at `position` (prefill for most tokens, then single steps) and
    the greedy next token."""
    s = model.session(seed=1)
    ids = random_tokens(position, model.config.vocab_size, seed=position)
    logits = s.feed(ids[:-2])
    for t in ids[-2:]:
        logits = s.step(t)
    return s, int(torch.argmax(logits))


def content(blob: bytes) -> bytes:
    """The msgpack document of a snapshot, read as a plain zstd decoder reads
    it (frames one after another, skippable frames such as the v2 index skipped)."""
    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()


def unpack(blob: bytes) -> dict:
    return msgpack.unpackb(content(blob), raw=False)


def repack(document, **packb) -> bytes:
    """A document (format v2) as the writer would compress it."""
    return snapshot_frames.pack([msgpack.packb(document, **packb)], level=1)


def one_frame(content: bytes) -> bytes:
    """A version-1 container: the document in one zstd frame."""
    return zstandard.ZstdCompressor(write_checksum=True).compress(content)


# -- exact resume ------------------------------------------------------------------------
@pytest.mark.parametrize("position", [0, 5, 30])
def test_restore_continues_bit_identically(model, position):
    metadata = {"user": "ada", "tags": ["a", "b"], "nested": {"n": 1, "x": 0.25, "raw": b"\x00\xff",
                                                             "none": None, "flag": True}}
    if position == 0:
        s, token = model.session(seed=1), 3
    else:
        s, token = run_conversation(model, position)
    blob = s.snapshot(metadata)
    restored = model.restore(blob)
    assert restored.position == position
    assert restored.seed == 1
    assert restored.snapshot_metadata == metadata
    for a, b in zip(slot_state(s), slot_state(restored)):
        assert torch.equal(a, b)
    expected, got = greedy(s, token, 12), greedy(restored, token, 12)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("position", [5, 30])
def test_restore_from_file_in_a_fresh_model(model, tmp_path, position):
    s, token = run_conversation(model, position)
    path = tmp_path / "conversation.sgsnap"
    s.save(path, metadata={"k": "v"})
    assert os.listdir(tmp_path) == ["conversation.sgsnap"]  # no temp file left
    fresh = sg.Model.random(model.config, seed=0, device="cpu", dtype="float32")
    restored = fresh.restore_file(path)
    assert restored.snapshot_metadata == {"k": "v"}
    for a, b in zip(greedy(s, token, 10), greedy(restored, token, 10)):
        assert torch.equal(a, b)


def test_load_into_overwrites_every_entry_of_a_used_slot(model):
    short, _ = run_conversation(model, 5)  # rings hold 5 of 8 rows
    used, _ = run_conversation(model, 30)
    contents = snapshot_format.decode(short.snapshot(), model.config, model.fingerprint)
    snapshot_format.load_into(model.pool, used.slot, contents)
    assert used.position == 5
    for a, b in zip(slot_state(short), slot_state(used)):
        assert torch.equal(a, b)


def test_a_restored_session_snapshots_identically(model, blob30):
    restored = model.restore(blob30)
    assert restored.snapshot(restored.snapshot_metadata) == blob30


def test_extra_state_round_trips_through_the_hooks(model, monkeypatch):
    extra = {"rng": b"\x01\x02generator-state", "detok_pending": b"\xe2\x82", "recent_ids": [5, 0, 255, 17],
             "logits": bytes(range(256)) * 4, "stopped": "stop string 'END'"}
    received = []
    monkeypatch.setattr(HostState, "to_extra", lambda self: dict(extra))
    monkeypatch.setattr(sg.Session, "restore_host", lambda self, d: received.append(d))
    s, _ = run_conversation(model, 12)
    model.restore(s.snapshot())
    assert received == [extra]


def test_extra_state_the_session_rejects_is_a_snapshot_error(model, monkeypatch):
    def reject(extra, tokenizer, rng, device):
        raise RuntimeError("generator state has the wrong size")

    s, _ = run_conversation(model, 12)
    blob = s.snapshot()
    model.session().close()  # a free slot, so the restore below does not grow the pool
    gc.collect()
    free_before = len(model.pool._free)
    monkeypatch.setattr(HostState, "from_extra", reject)
    with pytest.raises(sg.SnapshotFormatError, match="wrong size"):
        model.restore(blob)
    assert len(model.pool._free) == free_before  # the slot taken for the restore was given back


@pytest.mark.parametrize("bad", [
    {"rng": None, "detok_pending": b"", "recent_ids": [256], "logits": None, "stopped": None},  # outside the vocabulary
    {"rng": "text", "detok_pending": b"", "recent_ids": [], "logits": None, "stopped": None},
    {"rng": None, "detok_pending": b"", "recent_ids": [], "logits": None, "stopped": None, "more": 1},
    {"rng": None, "detok_pending": b"", "recent_ids": [], "logits": b"\x00" * 12, "stopped": None},  # wrong size
    {"rng": None, "detok_pending": b"", "recent_ids": [], "logits": None, "stopped": 7},
    {"rng": None, "detok_pending": b"", "recent_ids": []},  # the v1 keys are all required
])
def test_invalid_extra_state_is_refused_when_snapshotting(model, monkeypatch, bad):
    monkeypatch.setattr(HostState, "to_extra", lambda self: bad)
    with pytest.raises(sg.SnapshotError):
        model.session().snapshot()


# -- metadata -----------------------------------------------------------------------------
@pytest.mark.parametrize("metadata", [
    {1: "int key"},
    {"t": (1, 2)},  # a tuple would come back as a list
    {"s": {1, 2}},
    {"o": object()},
    {"big": 1 << 64},
    {"bad": "\ud800"},  # a lone surrogate is not UTF-8
    {"blob": b"x" * (snapshot_format.MAX_METADATA_BYTES + 1)},
    "not a map",
])
def test_invalid_metadata_is_refused(model, metadata):
    with pytest.raises(sg.SnapshotMetadataError):
        model.session().snapshot(metadata)


def test_too_deep_metadata_is_refused(model):
    deep: dict = {}
    node = deep
    for _ in range(snapshot_format.MAX_METADATA_DEPTH + 1):
        node["d"] = {}
        node = node["d"]
    with pytest.raises(sg.SnapshotMetadataError, match="nested deeper"):
        model.session().snapshot(deep)


# -- other models, other dtypes -----------------------------------------------------------
def test_restore_into_other_weights_is_refused(model, blob30):
    other = sg.Model.random(model.config, seed=1, device="cpu", dtype="float32")
    with pytest.raises(sg.SnapshotModelMismatch, match="different weights") as info:
        other.restore(blob30)
    assert model.fingerprint in str(info.value)


def test_restore_into_other_config_is_refused(model, blob30):
    other = sg.Model.random(model.config.replace(attention_window=16), seed=0, device="cpu", dtype="float32")
    with pytest.raises(sg.SnapshotModelMismatch, match="attention_window"):
        other.restore(blob30)


@pytest.mark.parametrize("position", [5, 30])
def test_restore_float32_snapshot_into_bfloat16_model(model, position):
    """Documented in docs/snapshot-format.md: state is rounded to bfloat16, the
    RG-LRU state stays exact; logits then stay within 0.1 standard deviations."""
    s, token = run_conversation(model, position)
    low = sg.Model.random(model.config, seed=0, device="cpu", dtype="bfloat16")
    restored = low.restore(s.snapshot())
    for a, b in zip(slot_state(s), slot_state(restored)):
        assert torch.equal(a.to(b.dtype), b)
    expected, got = s.step(token), restored.step(token)
    assert got.dtype == torch.float32
    assert (expected - got).abs().max() <= 0.1 * expected.std()
    assert torch.nn.functional.cosine_similarity(expected, got, dim=0) > 0.999


def test_restore_bfloat16_snapshot_into_float32_model_is_exact(model):
    low = sg.Model.random(model.config, seed=0, device="cpu", dtype="bfloat16")
    s = low.session()
    s.feed(random_tokens(20, model.config.vocab_size))
    restored = model.restore(s.snapshot())
    for a, b in zip(slot_state(s), slot_state(restored)):
        assert b.dtype == torch.float32 and torch.equal(a.float(), b)


def test_short_session_snapshot_is_much_smaller_than_full_window():
    config = sg.GriffinConfig.preset("tiny", attention_window=256)
    m = sg.Model.random(config, seed=0, device="cpu", dtype="float32")
    short, full = m.session(), m.session()
    short.feed(random_tokens(5, config.vocab_size))
    full.feed(random_tokens(300, config.vocab_size))
    short_blob, full_blob = short.snapshot(), full.snapshot()
    assert len(short_blob) * 4 < len(full_blob)
    assert len(full_blob) <= m.pool.slot_bytes() + 4096  # raw state plus the envelope
    assert m.restore(short_blob).position == 5


# -- validation of untrusted bytes -----------------------------------------------------------
def assert_restores_exactly_or_refuses(model, blob, original):
    """A damaged blob must raise SnapshotError; the rare damage zstd cannot see
    (e.g. a header bit that does not change the content) must restore exactly."""
    try:
        restored = model.restore(blob)
    except sg.SnapshotError:
        return
    reference = model.restore(original)
    assert restored.position == reference.position
    for a, b in zip(slot_state(reference), slot_state(restored)):
        assert torch.equal(a, b)


fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@fuzz
@given(cut=st.integers(min_value=0, max_value=10**9))
def test_truncation_is_refused(model, blob30, cut):
    with pytest.raises(sg.SnapshotError):
        model.restore(blob30[:cut % len(blob30)])


@fuzz
@given(index=st.integers(min_value=0, max_value=10**9), bit=st.integers(min_value=0, max_value=7))
def test_bit_flips_are_refused(model, blob30, index, bit):
    damaged = bytearray(blob30)
    damaged[index % len(damaged)] ^= 1 << bit
    assert_restores_exactly_or_refuses(model, bytes(damaged), blob30)


@fuzz
@given(garbage=st.binary(max_size=512), zstd_prefix=st.booleans())
def test_garbage_is_refused(model, garbage, zstd_prefix):
    with pytest.raises(sg.SnapshotError):
        model.restore((b"\x28\xb5\x2f\xfd" if zstd_prefix else b"") + garbage)


@fuzz
@given(content=st.binary(max_size=256))
def test_valid_frames_of_garbage_are_refused(model, content):
    with pytest.raises(sg.SnapshotError):
        model.restore(zstandard.ZstdCompressor(write_checksum=True).compress(content))


@fuzz
@given(value=st.recursive(st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats()
                          | st.text() | st.binary(),
                          lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(), kids, max_size=4),
                          max_leaves=12),
       field=st.sampled_from(sorted(snapshot_format._TOP_KEYS) + ["layer", "tensor", "extra.recent_ids"]))
def test_wrong_field_values_are_refused(model, blob30, value, field):
    document = unpack(blob30)
    if field == "layer":
        document["layers"][2] = value
    elif field == "tensor":
        document["layers"][2]["keys"] = value
    elif field == "extra.recent_ids":
        document["extra"]["recent_ids"] = value
    else:
        document[field] = value
    # A re-packed document has a valid checksum: a value that keeps it self-consistent
    # (e.g. position 8 instead of 30 with a window of 8: the ring holds 8 rows either
    # way) is a legitimate snapshot. What must never happen is any other exception.
    try:
        restored = model.restore(repack(document))
    except sg.SnapshotError:
        return
    assert restored.position == document["position"]


def mutate(document: dict, change: str) -> None:
    layers = document["layers"]
    if change == "magic":
        document["magic"] = "something-else"
    elif change == "version0":
        document["version"] = 0
    elif change == "missing":
        del document["extra"]
    elif change == "unknown":
        document["surprise"] = 1
    elif change == "dtype":
        document["dtype"] = "int8"
    elif change == "position":
        document["position"] = 3  # the rings hold 8 rows: 3 tokens fill only 3
    elif change == "layers":
        layers.pop()
    elif change == "kind":
        layers[0], layers[2] = layers[2], layers[0]
    elif change == "shape":
        layers[0]["conv"]["shape"] = [3, 65]
    elif change == "data":
        layers[2]["values"]["data"] = layers[2]["values"]["data"][:-1]
    elif change == "h_dtype":
        layers[0]["h"]["dtype"] = "bfloat16"
    elif change == "recent_ids":
        document["extra"]["recent_ids"] = [1, -1]
    elif change == "metadata":
        document["metadata"] = [1, 2]
    elif change == "fingerprint":
        document["model"]["fingerprint"] = 12


@pytest.mark.parametrize("change", ["magic", "version0", "missing", "unknown", "dtype", "position", "layers",
                                    "kind", "shape", "data", "h_dtype", "recent_ids", "metadata", "fingerprint"])
def test_malformed_content_is_refused(model, blob30, change):
    document = unpack(blob30)
    mutate(document, change)
    with pytest.raises(sg.SnapshotFormatError):
        model.restore(repack(document))


def test_newer_version_is_refused(model, blob30):
    document = unpack(blob30)
    document["version"] = snapshot_format.FORMAT_VERSION + 1
    document["new_field"] = "from the future"
    with pytest.raises(sg.SnapshotVersionError, match="upgrade streamgemma"):
        model.restore(repack(document))


def test_wrong_magic_is_refused(model):
    with pytest.raises(sg.SnapshotFormatError, match="does not start with a zstd frame"):
        model.restore(b"PK\x03\x04 a zip file")
    with pytest.raises(sg.SnapshotFormatError):
        model.restore(b"")
    with pytest.raises(sg.SnapshotFormatError):
        model.restore("a string")


def test_trailing_bytes_are_refused(model, blob30):
    with pytest.raises(sg.SnapshotCorrupted):
        model.restore(blob30 + b"\x00")


def test_frames_without_checksum_or_size_are_refused(model, blob30):
    """Version-1 containers; tests/test_snapshot_frames.py has the version-2 ones."""
    packed = content(blob30)
    with pytest.raises(sg.SnapshotFormatError, match="checksum"):
        model.restore(zstandard.ZstdCompressor(write_checksum=False).compress(packed))
    unsized = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False)
    stream = unsized.compressobj()
    with pytest.raises(sg.SnapshotFormatError, match="content size"):
        model.restore(stream.compress(packed) + stream.flush())


def test_small_blob_declaring_a_huge_content_is_refused_before_decompressing(model):
    bomb = zstandard.ZstdCompressor(write_checksum=True).compress(bytes(256 << 20))
    assert len(bomb) < 64 << 10
    start = time.perf_counter()
    with pytest.raises(sg.SnapshotFormatError, match="more than"):
        model.restore(bomb)
    assert time.perf_counter() - start < 0.5  # refused from the header, not by decompressing 256 MB


@pytest.mark.parametrize("container", ["v1", "v2"])
@pytest.mark.parametrize("header", [b"\xdd\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff"])
def test_msgpack_headers_claiming_huge_lengths_are_refused(model, header, container):
    """array32 / bin32 / map32 with 2**32 - 1 entries in a 5-byte document."""
    with pytest.raises(sg.SnapshotFormatError, match="msgpack"):
        model.restore(one_frame(header) if container == "v1" else snapshot_frames.pack([header], 1))


def test_msgpack_extension_types_are_refused(model, blob30):
    document = unpack(blob30)
    document["metadata"] = {"when": msgpack.Timestamp(1, 0)}
    with pytest.raises(sg.SnapshotFormatError):
        model.restore(repack(document, datetime=False))


def test_oversized_file_is_refused_before_reading(model, tmp_path):
    path = tmp_path / "huge.sgsnap"
    with open(path, "wb") as f:
        f.truncate(snapshot_format.max_file_bytes(model.config) + 1)  # sparse: costs no disk
    with pytest.raises(sg.SnapshotFormatError, match="larger than"):
        model.restore_file(path)


# -- the directory store -------------------------------------------------------------------------
def test_directory_store_put_get_delete_list(model, blob30, tmp_path):
    store = sg.DirectorySnapshotStore(tmp_path / "snaps")
    assert isinstance(store, sg.SnapshotStore)
    assert store.list() == []
    store.put("b-2", blob30)
    store.put("a.1", b"other bytes")
    assert store.list() == ["a.1", "b-2"]
    assert "b-2" in store and "c" not in store
    assert store.get("a.1") == b"other bytes"
    assert model.restore(store.get("b-2")).position == 30
    store.put("a.1", blob30)  # replaces
    assert store.get("a.1") == blob30
    store.delete("a.1")
    assert store.list() == ["b-2"]
    with pytest.raises(sg.SnapshotNotFound):
        store.get("a.1")
    with pytest.raises(KeyError):
        store.delete("a.1")
    assert sorted(os.listdir(store.directory)) == ["b-2.sgsnap"]


@pytest.mark.parametrize("bad_id", ["", ".", "..", "../escape", "a/b", "a\\b", ".hidden", "a\x00b", "é",
                                    "x" * 201, 5, None])
def test_directory_store_rejects_bad_ids(tmp_path, bad_id):
    store = sg.DirectorySnapshotStore(tmp_path)
    for call in (lambda: store.put(bad_id, b"x"), lambda: store.get(bad_id), lambda: store.delete(bad_id)):
        with pytest.raises(sg.SnapshotIdError):
            call()
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "s.sgsnap"
    write_file_atomic(path, b"old")
    with pytest.raises(TypeError):
        write_file_atomic(path, object())  # fails mid-write
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["s.sgsnap"]


def test_an_atomic_write_takes_any_legal_file_name(tmp_path):
    """A 255-character name (the usual limit) writes: the temp file's marks once made its name too long."""
    path = tmp_path / ("n" * 251 + ".sgs")
    write_file_atomic(path, b"data")
    assert path.read_bytes() == b"data" and os.listdir(tmp_path) == [path.name]


def test_stale_temp_files_are_removed(tmp_path):
    store = sg.DirectorySnapshotStore(tmp_path)
    stale, fresh = tmp_path / ".s.sgsnap.abc.tmp", tmp_path / ".s.sgsnap.def.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert store.remove_stale_temp_files(older_than_s=3600) == 1
    assert sorted(os.listdir(tmp_path)) == [fresh.name]
    assert store.list() == []


def _write_repeatedly(directory, blob: bytes, times: int) -> None:
    store = sg.DirectorySnapshotStore(directory)
    for _ in range(times):
        store.put("shared", blob)


def test_concurrent_writers_leave_one_valid_snapshot(model, tmp_path):
    blobs = []
    for n in (5, 17, 30):
        s = model.session()
        s.feed(random_tokens(n, model.config.vocab_size, seed=n))
        blobs.append(s.snapshot({"writer": n}))
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    writers = [ctx.Process(target=_write_repeatedly, args=(tmp_path, b, 25)) for b in blobs]
    for w in writers:
        w.start()
    store = sg.DirectorySnapshotStore(tmp_path)
    reads = 0
    while any(w.is_alive() for w in writers):
        try:
            seen = store.get("shared")
        except sg.SnapshotNotFound:  # before the first rename
            continue
        assert seen in blobs  # never a partial file
        reads += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert os.listdir(tmp_path) == ["shared.sgsnap"]
    assert store.list() == ["shared"]
    final = store.get("shared")
    assert final in blobs
    assert model.restore(final).snapshot_metadata["writer"] in (5, 17, 30)


@pytest.mark.slow
def test_snapshot_resume_example_runs():
    example = Path(__file__).resolve().parent.parent / "examples" / "snapshot_resume.py"
    done = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=120,
                          env=subprocess_env())
    assert done.returncode == 0, done.stderr
    assert "identical continuation, bit for bit" in done.stdout


# -- the fast paths: one host copy, pieces instead of a packed copy, threads ------------------
@pytest.mark.parametrize("position", [3, 30])
def test_packed_pieces_are_exactly_msgpack_of_the_document(model, position):
    """The encoder streams the document in pieces (tensor data as is): their
    concatenation is msgpack's own packing, so the format is unchanged."""
    s, _ = run_conversation(model, position)
    blob = s.snapshot({"k": [1, 2.5, b"x" * 300]})
    document = unpack(blob)
    assert content(blob) == msgpack.packb(document)
    for size in (0, 5, 255, 256, 65535, 65536, 70000):  # every bin header width
        doc = {"layers": [{"kind": "k", "t": {"dtype": "x", "shape": [size], "data": b"\x01" * size}}], "z": 1}
        assert b"".join(snapshot_bytes.msgpack_pieces(doc)) == msgpack.packb(doc)
    s.close()


def test_frames_do_not_depend_on_the_thread_count(model, blob30, monkeypatch):
    contents = snapshot_format.decode(blob30, model.config, model.fingerprint)
    monkeypatch.setattr(snapshot_frames, "FRAME_BYTES", 1000)  # about ten frames
    blobs = [snapshot_format.encode_contents(contents, threads=n) for n in (1, 2, 3)]
    assert blobs[0] == blobs[1] == blobs[2] != blob30
    assert unpack(blobs[0]) == unpack(blob30)
    for n in (1, 2, 5):
        decoded = snapshot_format.decode(blobs[0], model.config, model.fingerprint, threads=n)
        assert snapshot_format.encode_contents(decoded) == blobs[0]


@pytest.mark.parametrize("position", [0, 3, 30])
def test_captured_records_are_slices_of_one_arena(model, position):
    s = run_conversation(model, position)[0] if position else model.session()
    contents = s.capture()
    records = [r for layer in contents.layers for r in layer]
    arena = contents.arena.numpy()
    for r in records:
        assert bytes(r.data) == arena[r.offset:r.offset + len(r.data)].tobytes()
    # Staged for a device (here the CPU, the same code): from the arena, or gathered
    # from separate records (a decoded blob), the same tensors.
    decoded = snapshot_format.decode(snapshot_format.encode_contents(contents), model.config, model.fingerprint)
    for c in (contents, decoded):
        rs = [r for layer in c.layers for r in layer]
        arena = c.arena if c is contents else None
        staged = snapshot_bytes.to_device([r.data for r in rs], torch.device("cpu"), arena, [r.offset for r in rs])
        assert all(torch.equal(t.view(r.dtype).view(r.shape), snapshot_bytes.host_tensor(r.data, r.dtype, r.shape))
                   for t, r in zip(staged, rs))
    s.close()


def test_servers_sharing_a_store_directory_can_start_at_the_same_time(tmp_path):
    """prepare() (a server's start) probes the directory under a name of its own and tolerates temp
    files that other writers rename meanwhile: concurrent starts and writes raise nothing."""
    import threading

    from streamgemma.session.store import DirectorySnapshotStore

    errors, stop = [], threading.Event()

    def start(n: int) -> None:
        try:
            for _ in range(n):
                DirectorySnapshotStore(tmp_path).prepare()
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    def write() -> None:
        store, k = DirectorySnapshotStore(tmp_path), 0
        while not stop.is_set():
            store.put(f"s{k % 4}", b"x" * 1000)
            k += 1

    writer = threading.Thread(target=write)
    writer.start()
    starters = [threading.Thread(target=start, args=(60,)) for _ in range(4)]
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    stop.set()
    writer.join()
    assert errors == []
    assert not [p for p in tmp_path.iterdir() if "probe" in p.name]


# -- hostile documents and captured states (a review's findings) -------------------------
def test_a_bytes_key_beside_an_unknown_key_is_a_snapshot_error(model, blob30):
    """Naming the unknown fields sorted str and bytes keys together: a bare TypeError before."""
    doc = unpack(blob30)
    doc[b"junk"], doc["junk2"] = 1, 2
    with pytest.raises(sg.SnapshotFormatError, match="unknown fields"):
        model.restore(repack(doc))
    doc = unpack(blob30)
    doc["model"]["config"][b"junk"] = 1
    with pytest.raises(sg.SnapshotModelMismatch, match="configs differ"):
        model.restore(repack(doc))


@pytest.mark.parametrize("field", ["dtype", "seed", "version", "position"])
def test_a_field_nested_a_thousand_deep_is_a_snapshot_error(model, blob30, field):
    """msgpack takes 1,024 levels; the message's repr of such a value exhausted the stack."""
    value = 0
    for _ in range(1000):
        value = [value]
    doc = unpack(blob30)
    doc[field] = value
    with pytest.raises(sg.SnapshotFormatError):
        model.restore(repack(doc))


def test_a_small_blob_cannot_make_the_reader_build_far_more_than_its_bound(model):
    """A ~1 KB blob of 65536-long lists of empty lists: each 1 byte packed, 56 built. The reader counts
    what it builds and stops, so its memory stays near the content bound (it was ~60 times that)."""
    import tracemalloc

    limit = snapshot_format.max_snapshot_bytes(model.config)
    head = b"\x82" + msgpack.packb("magic") + msgpack.packb(snapshot_format.MAGIC) + msgpack.packb("x")
    empties = msgpack.packb([[]] * 65536)
    count = (limit - len(head) - 64) // len(empties)
    small = snapshot_frames.pack([head + b"\xdd" + count.to_bytes(4, "big") + empties * count], level=19)
    assert len(small) < 4096
    tracemalloc.start()
    try:
        with pytest.raises(sg.SnapshotFormatError, match="entries"):
            snapshot_format.decode(small, model.config, model.fingerprint)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * limit


def test_metadata_over_the_entry_bound_is_refused_when_written(model):
    s = model.session()
    s.feed([1, 2])
    with pytest.raises(sg.SnapshotMetadataError, match="131079 lists, maps and entries"):
        s.snapshot({"x": [[0] * 65536, [0] * 65536]})
    s.snapshot({"x": [[0] * 65536, [0] * 65529]})  # the map 2, the outer list 3, the inner ones 131,067


def test_a_captured_state_of_another_model_is_refused(model):
    """Model.restore of Session.capture() output checks the model as a blob's restore does: other
    weights were restored silently, another config failed with numpy's broadcast ValueError."""
    import dataclasses

    s = model.session(seed=7)
    s.feed(list(range(1, 31)))
    captured = s.capture()
    config = model.config
    for other in (sg.Model.random(config, seed=1, device="cpu", dtype="float32"),
                  sg.Model.random(dataclasses.replace(config, attention_window=16), seed=0, device="cpu",
                                  dtype="float32")):
        with pytest.raises(sg.SnapshotModelMismatch):
            other.restore(captured)
    assert model.restore(captured).position == 30


def test_capture_keeps_a_copy_of_the_metadata_it_checked(model):
    s = model.session()
    s.feed([1, 2])
    metadata = {"tags": ["a"]}
    captured = s.capture(metadata)
    metadata["tags"].append({1, 2})  # (a set: not storable) after the capture
    assert model.restore(captured).snapshot_metadata == {"tags": ["a"]}


def test_bytes_after_a_frame_inside_its_slot_are_refused(model, blob30):
    """zstd stops at a frame's end: garbage between it and the slot's end (which still ends with the
    index's checksum bytes) was accepted. Each frame must fill its slot exactly."""
    import struct
    import zlib

    count = struct.unpack_from("<I", blob30, 12)[0]
    entries = [list(struct.unpack_from("<III", blob30, 16 + 12 * i)) for i in range(count)]
    at, frames = 20 + 12 * count, []
    for compressed, _, _ in entries:
        frames.append(blob30[at:at + compressed])
        at += compressed
    frames[0] = frames[0] + b"GARBAGE!" * 64 + frames[0][-4:]
    entries[0][0] = len(frames[0])
    body = b"SGS2" + struct.pack("<I", count) + b"".join(struct.pack("<III", *e) for e in entries)
    hostile = (snapshot_frames.INDEX_MAGIC + struct.pack("<I", len(body) + 4) + body
               + struct.pack("<I", zlib.crc32(body)) + b"".join(frames))
    for threads in (1, 2):
        with pytest.raises(sg.SnapshotCorrupted, match="does not fill its slot"):
            model.restore(hostile, threads=threads)
