"""The write-ahead journal: what a session consumed since its last stored
snapshot, so that a crash loses nothing that was acknowledged.

A record is one step of the session as it was executed: a prefill chunk
(`feed`, its ids exactly as one `Session.feed` call took them, so replay uses
the same chunk boundaries), one token consumed by a decode row (`step`: an
input token riding along, or a generated token), or a change of the sampler
stream alone (`rng`: a generation started with a seed). Each record carries
the position it starts at and the host state the session had after it that
replay cannot recompute: the sampler stream (seed, counter) and the stop that
ended a generation. Recovery is `model.restore(snapshot)` and `replay` of the
records past the snapshot's position, through the same model calls.

`Journal` stores records by session id; `append` takes the records of many
sessions (one engine tick) and returns once all are durable: one group
commit per tick. `DirectoryJournal` keeps one append-only file per session.
"""

from __future__ import annotations

import abc
import concurrent.futures
import contextlib
import dataclasses
import os
import stat
import struct
import threading
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import msgpack

from ..errors import SnapshotFormatError
from .files import fsync_directory, read_regular_file, validate_session_id, write_file_atomic

KINDS = ("feed", "step", "rng")
# A record on disk: payload length and CRC-32 (u32 LE each), then the msgpack payload.
# A torn tail (a crash mid-append) fails the length or CRC check and ends the journal:
# that append never returned, so nothing in it was acknowledged.
FRAME = struct.Struct("<II")
MAX_RECORD_BYTES = 1 << 24  # a prefill chunk of ids is far smaller


@dataclasses.dataclass(frozen=True)
class JournalRecord:
    """One executed step of a session (see the module docstring). `position`:
    where it starts; `ids`: the tokens it consumed (none for "rng"); `rng`:
    the sampler stream after it (RandomStream.to_bytes); `stopped`: the
    session's `state.stopped` after it."""

    position: int
    kind: str
    ids: tuple[int, ...]
    rng: bytes
    stopped: str | None = None

    @property
    def end(self) -> int:
        """The session's position after the record."""
        return self.position + len(self.ids)

    def encode(self) -> bytes:
        return encode_record(self.position, self.kind, self.ids, self.rng, self.stopped)


def encode_record(position: int, kind: str, ids, rng: bytes, stopped: str | None) -> bytes:
    """A record's bytes: the frame, then msgpack [position, kind, ids, rng, stopped]
    (a few microseconds: one per session per tick, in the committer's thread)."""
    payload = msgpack.packb((position, kind, ids, rng, stopped), use_bin_type=True)
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def encode_records(fields: Iterable[tuple]) -> list[bytes]:
    """`encode_record` of each (position, kind, ids, rng, stopped), with one
    msgpack packer (half the time: a tick's 256 records in about 0.2 ms)."""
    pack, frame, crc32 = msgpack.Packer(use_bin_type=True).pack, FRAME.pack, zlib.crc32
    out = []
    for record in fields:
        payload = pack(record)
        out.append(frame(len(payload), crc32(payload)) + payload)
    return out


def _frames(data: bytes) -> Iterable[tuple[bytes, int]]:
    """(payload, offset after it) of each intact frame of `data`, up to a torn or damaged tail."""
    offset = 0
    while offset + FRAME.size <= len(data):
        size, crc = FRAME.unpack_from(data, offset)
        start, offset = offset + FRAME.size, offset + FRAME.size + size
        payload = data[start:offset]
        if size > MAX_RECORD_BYTES or len(payload) < size or zlib.crc32(payload) != crc:
            return
        yield payload, offset


def intact_length(data: bytes) -> int:
    """How many leading bytes of `data` are intact frames (where a torn tail starts)."""
    return max((end for _, end in _frames(data)), default=0)


def decode_records(data: bytes) -> list[JournalRecord]:
    """The records framed in `data`, up to a torn or damaged tail (ignored:
    its append never completed)."""
    records = []
    for payload, _ in _frames(data):
        try:
            fields = msgpack.unpackb(payload, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise SnapshotFormatError(f"a journal record cannot be read: {e}") from None
        records.append(_record(fields))
    return records


def _record(fields) -> JournalRecord:
    """A decoded payload as a record, every field checked: a record that passed its CRC
    but was written by something else is refused here, not deep inside a replay."""
    from ..sampling.philox import RandomStream

    if not isinstance(fields, list) or len(fields) != 5:
        raise SnapshotFormatError("a journal record is not [position, kind, ids, rng, stopped]")
    position, kind, ids, rng, stopped = fields
    if not isinstance(kind, str) or kind not in KINDS:
        raise SnapshotFormatError(f"a journal record has the unknown kind {kind!r}")
    if type(position) is not int or position < 0:
        raise SnapshotFormatError(f"a journal record's position is not an int >= 0: {position!r}")
    if not isinstance(ids, list) or not all(type(i) is int and 0 <= i < 1 << 31 for i in ids):
        raise SnapshotFormatError("a journal record's ids are not a list of token ids")
    if len(ids) != {"feed": max(1, len(ids)), "step": 1, "rng": 0}[kind]:
        raise SnapshotFormatError(f"a journal {kind!r} record with {len(ids)} ids")
    if stopped is not None and not isinstance(stopped, str):
        raise SnapshotFormatError(f"a journal record's stop is not text: {stopped!r}")
    try:
        RandomStream.from_bytes(rng if isinstance(rng, bytes) else b"")
    except ValueError as e:
        raise SnapshotFormatError(f"a journal record's sampler state: {e}") from None
    return JournalRecord(position, kind, tuple(ids), rng, stopped)


def replay(session, records: Iterable[JournalRecord]) -> int:
    """Advance `session` (restored from a snapshot) through the records past
    its position, with the calls that executed them; how many were replayed.
    SnapshotFormatError when the records do not continue the session (a gap:
    the snapshot is older than the journal's start) or hold a token id the
    model does not have."""
    from ..sampling.philox import RandomStream

    count = 0
    for record in records:
        if record.end <= session.position and record.kind != "rng" or record.position < session.position:
            continue  # covered by the snapshot
        if record.position != session.position:
            raise SnapshotFormatError(f"the journal continues at position {record.position}, the snapshot "
                                      f"ends at {session.position}: records are missing")
        try:
            if record.kind == "feed":
                session.feed(list(record.ids))
            elif record.kind == "step":
                session.step(record.ids[0])
        except ValueError as e:  # (a token id this model does not have)
            raise SnapshotFormatError(f"the journal record at position {record.position} does not fit this "
                                      f"model: {e}") from None
        session.state.rng = RandomStream.from_bytes(record.rng)
        session.state.stopped = record.stopped
        count += 1
    return count


def beyond(records: Iterable[JournalRecord], position: int) -> bool:
    """Whether some record continues a session snapshotted at `position`."""
    return any(r.position >= position and (r.ids or r.kind == "rng") for r in records)


class Journal(abc.ABC):
    """Records by session id (ids validated as a store's)."""

    @abc.abstractmethod
    def append(self, batch: Mapping[str, list[bytes]]) -> set[str]:
        """Append encoded records to each session's journal; returns once all
        of them are durable (one group commit), with the ids whose records
        were refused because this process no longer owns them (a fleet's
        fence). Raises on failure (then any of them may or may not be stored:
        the caller retries the whole batch; `replay` skips a record stored
        twice)."""

    @abc.abstractmethod
    def read(self, session_id: str) -> list[JournalRecord]:
        """The records of `session_id`, oldest first ([] if none)."""

    @abc.abstractmethod
    def compact(self, session_id: str, position: int) -> None:
        """A snapshot at `position` is stored: drop the records it covers."""

    @abc.abstractmethod
    def delete(self, session_id: str) -> None:
        """Forget `session_id`'s records (no error if there are none)."""


class DirectoryJournal(Journal):
    """One append-only file `<session_id>.sgjournal` per session in
    `directory`. A batch's files are written and fsynced in parallel
    (`threads`), so a tick of many sessions costs about one fsync. Meant for
    one process at a time per session (the directory store's single server).
    The first append to a file (per process, and after a failed one) cuts
    off a torn tail first: records appended after one would never be read."""

    SUFFIX = ".sgjournal"

    def __init__(self, directory: str | os.PathLike, threads: int = 8):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="streamgemma-journal")
        # Striped locks: a session's appends, compactions and deletion never overlap, and no lock is
        # ever dropped while a thread may still hold it (a lock per id would have to be).
        self._locks = [threading.Lock() for _ in range(64)]
        self._intact: set[str] = set()  # sessions whose file this process knows ends with a whole record

    def __repr__(self) -> str:
        return f"DirectoryJournal({str(self.directory)!r})"

    def path(self, session_id: str) -> Path:
        return self.directory / (validate_session_id(session_id) + self.SUFFIX)

    def _lock(self, session_id: str) -> threading.Lock:
        return self._locks[zlib.crc32(validate_session_id(session_id).encode()) % len(self._locks)]

    def _append_one(self, session_id: str, records: list[bytes]) -> None:
        path = self.path(session_id)
        with self._lock(session_id):
            new = not path.exists()
            # O_NONBLOCK: a FIFO planted under the name fails (ENXIO) instead of waiting for a reader
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0),
                         0o600)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise SnapshotFormatError(f"{path} is not a regular file")
                known = session_id in self._intact
                self._intact.discard(session_id)  # until this append is durable
                if not new and not known:
                    data = read_regular_file(path)
                    if (keep := intact_length(data)) < len(data):
                        os.ftruncate(fd, keep)
                _write_all(fd, b"".join(records))
                os.fsync(fd)
            finally:
                os.close(fd)
            if new or not known:  # the file's name must survive a crash too (also when a failed try made it)
                fsync_directory(self.directory)
            self._intact.add(session_id)

    def append(self, batch: Mapping[str, list[bytes]]) -> set[str]:
        if len(batch) == 1:
            self._append_one(*next(iter(batch.items())))
            return set()
        futures = [self._pool.submit(self._append_one, sid, records) for sid, records in batch.items()]
        for future in futures:
            future.result()
        return set()

    def read(self, session_id: str) -> list[JournalRecord]:
        try:
            return decode_records(read_regular_file(self.path(session_id)))
        except FileNotFoundError:
            return []

    def compact(self, session_id: str, position: int) -> None:
        with self._lock(session_id):
            path = self.path(session_id)
            try:
                records = decode_records(read_regular_file(path))
            except FileNotFoundError:
                return
            keep = [r for r in records if r.end > position or (r.kind == "rng" and r.position >= position)]
            if not keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    fsync_directory(self.directory)
            elif len(keep) < len(records):
                write_file_atomic(path, b"".join(r.encode() for r in keep))

    def delete(self, session_id: str) -> None:
        with self._lock(session_id), contextlib.suppress(FileNotFoundError):
            self._intact.discard(session_id)
            self.path(session_id).unlink()
            fsync_directory(self.directory)  # (a crash must not bring a closed session's records back)



def _write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written (a full disk may write part and not raise)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(f"could not write to the journal: {written} bytes written")
        view = view[written:]
