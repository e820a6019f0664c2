"""Where suspended sessions live: the `SnapshotStore` interface (snapshot
bytes by session id), `DirectorySnapshotStore` (one file per session in a
directory, safe for several processes sharing it), and the atomic file write
that `Session.save` also uses."""

from __future__ import annotations

import abc
import contextlib
import math
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ..config import GriffinConfig
from ..errors import SnapshotNotFound, StoreError
from . import snapshot as snapshot_format
from .files import (
    SESSION_ID_PATTERN,
    TEMP_SUFFIX,
    fsync_directory,
    read_regular_file,
    validate_session_id,
    write_file_atomic,
)
from .journal import DirectoryJournal, Journal

__all__ = ["SESSION_ID_PATTERN", "DirectorySnapshotStore", "SnapshotStore", "validate_session_id",
           "write_file_atomic"]

# A temp file older than this at start-up belongs to a write that died (a
# write takes well under a second); a younger one may be another process's.
STALE_TEMP_AT_START_S = 60.0

class SnapshotStore(abc.ABC):
    """Snapshots (the bytes of `Session.snapshot()`) by session id.

    Ids are validated with `validate_session_id` (SnapshotIdError); a missing
    id raises SnapshotNotFound (a KeyError). `durable`: whether snapshots
    outlive the process."""

    durable = True

    def describe(self) -> str:
        """What and where the store is, for a log line."""
        return repr(self)

    def prepare(self) -> str:
        """Before serving: raise StoreError if the store cannot be written,
        clean up what earlier processes left; returns notes for the log."""
        return ""

    def older_than(self, seconds: float) -> list[str]:
        """Ids whose snapshot and journal were last written more than
        `seconds` ago (for expiry); a store that does not know returns []."""
        return []

    def journal(self) -> Journal | None:
        """The write-ahead journal kept beside the snapshots (see `journal`),
        None for a store that does not outlive the process."""
        return None

    # Ownership, for stores shared by a fleet of workers (`coordinated`; see
    # RedisSnapshotStore). A store of one process owns every session: no-ops.
    coordinated = False

    def claim(self, session_id: str) -> None:
        """Own `session_id` before reading or writing it (in a fleet: take its
        lease, asking the worker that holds it to hand it over)."""
        return None

    def try_claim(self, session_id: str, asked: str | None = None, ask: bool = True) -> str | None:
        """One attempt of `claim` that does not wait: None if owned now, else
        who holds it (asked to hand it over unless it is `asked`, or ask=False)."""
        return None

    def claim_if_free(self, session_id: str) -> bool:
        """Own `session_id` if no worker holds it (never asks one to hand it
        over); whether this worker owns it now. Expiry deletes only these."""
        return self.try_claim(session_id, ask=False) is None

    claim_wait = 0.0  # how long `claim` waits for a holder to hand over

    def release(self, session_id: str) -> None:
        """Stop owning `session_id` (its state is in the store)."""
        return None

    def release_all(self, keep: Iterable[str] = ()) -> None:
        """Release every session owned, except `keep`."""
        return None

    def on_release(self, session_id: str, callback: Callable[[], object]) -> Callable[[], None]:
        """Call `callback()` (from another thread) when the worker holding
        `session_id` releases it, until the returned function is called (a
        store of one process: never)."""
        return lambda: None

    def lost(self) -> list[str]:
        """Sessions another worker took from this one (their state here is stale)."""
        return []

    def wait_handover(self, timeout: float) -> str | None:
        """A session another worker asked this one to hand over, or None after `timeout` s."""
        time.sleep(timeout)
        return None

    @abc.abstractmethod
    def put(self, session_id: str, blob: bytes) -> None:
        """Store `blob` under `session_id`, replacing any previous snapshot atomically."""

    @abc.abstractmethod
    def get(self, session_id: str) -> bytes:
        """The snapshot stored under `session_id`."""

    @abc.abstractmethod
    def delete(self, session_id: str) -> None:
        """Remove the snapshot stored under `session_id`."""

    @abc.abstractmethod
    def list(self) -> list[str]:
        """Ids of all stored snapshots, sorted."""

    def __contains__(self, session_id: str) -> bool:
        return validate_session_id(session_id) in self.list()


class DirectorySnapshotStore(SnapshotStore):
    """One file `<session_id>.sgsnap` per snapshot in `directory` (created if
    missing). Several processes may use one directory at once: each write goes
    to a temp file that is renamed into place, so `get` and `list` never see a
    partial snapshot. On a case-insensitive file system, ids that differ only
    in case name the same file.

    `get` reads at most `max_bytes` (default: the largest snapshot of any
    preset's model; `snapshot.max_file_bytes(config)` for one model) and only
    regular files, opened without blocking, so a planted FIFO or huge file
    is refused, not read."""

    SUFFIX = ".sgsnap"

    def __init__(self, directory: str | os.PathLike, max_bytes: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if max_bytes is None:
            max_bytes = max(snapshot_format.max_file_bytes(GriffinConfig.preset(name))
                            for name in GriffinConfig.presets())
        self.max_bytes = max_bytes
        self._journal: DirectoryJournal | None = None

    def __repr__(self) -> str:
        return f"DirectorySnapshotStore({str(self.directory)!r})"

    def journal(self) -> DirectoryJournal:
        """Journals in the subdirectory `journal` (made on first use)."""
        if self._journal is None:
            self._journal = DirectoryJournal(self.directory / "journal")  # (remove_stale_temp_files knows it)
        return self._journal

    def describe(self) -> str:
        return f"directory {self.directory}"

    def path(self, session_id: str) -> Path:
        """The file that holds `session_id`'s snapshot."""
        return self.directory / (validate_session_id(session_id) + self.SUFFIX)

    def put(self, session_id: str, blob: bytes) -> None:
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise TypeError(f"a snapshot is bytes, got {type(blob).__name__}")
        write_file_atomic(self.path(session_id), blob)

    def get(self, session_id: str) -> bytes:
        try:
            return read_regular_file(self.path(session_id), self.max_bytes)
        except FileNotFoundError:
            raise SnapshotNotFound(f"no snapshot for session {session_id} in {self.directory}") from None

    def delete(self, session_id: str) -> None:
        path = self.path(session_id)
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise SnapshotNotFound(f"no snapshot for session {session_id} in {self.directory}") from None
        fsync_directory(self.directory)

    def list(self) -> list[str]:
        return sorted(sid for sid, _ in self._entries())

    def _entries(self):
        """(id, DirEntry) of every snapshot file."""
        with os.scandir(self.directory) as entries:
            for entry in entries:
                sid = entry.name[:-len(self.SUFFIX)]
                if (entry.name.endswith(self.SUFFIX) and SESSION_ID_PATTERN.fullmatch(sid)
                        and entry.is_file()):
                    yield sid, entry

    def __contains__(self, session_id: str) -> bool:
        return self.path(session_id).is_file()

    def older_than(self, seconds: float) -> list[str]:
        """Ids whose snapshot and journal were both last written more than `seconds` ago."""
        cutoff = time.time() - seconds
        journals = self.journal().directory
        old = []
        for sid, entry in self._entries():
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < cutoff and _mtime(journals / (sid + DirectoryJournal.SUFFIX)) < cutoff:
                    old.append(sid)
        return sorted(old)

    def prepare(self) -> str:
        """Check that the directory takes a file (write, fsync, rename and
        delete a probe), remove temp files of writes that died; StoreError
        if it cannot be written."""
        try:
            # A name of this process's own: servers sharing the directory probe it at the same time.
            probe = self.directory / f"write-probe-{os.getpid()}-{secrets.token_hex(4)}"
            write_file_atomic(probe, b"streamgemma")
            os.unlink(probe)
        except OSError as e:
            raise StoreError(f"the snapshot store {self.directory} is not writable: "
                             f"{e.strerror or e}") from None
        removed = self.remove_stale_temp_files(STALE_TEMP_AT_START_S)
        free = shutil.disk_usage(self.directory).free
        notes = f"{len(self.list())} snapshots, {free / 2**30:.1f} GiB free"
        return notes + (f", removed {removed} temp files of interrupted writes" if removed else "")

    def remove_stale_temp_files(self, older_than_s: float = 3600.0) -> int:
        """Delete temp files that writers which crashed mid-write left behind,
        if older than `older_than_s` seconds (younger ones may belong to a write
        in progress). Returns how many were removed."""
        removed = 0
        cutoff = time.time() - older_than_s
        # (directory, what a temp file's name holds, other temp names): snapshots and the journals' compactions
        marks = {self.directory: (self.SUFFIX + ".", ".write-probe"),
                 self.directory / "journal": (DirectoryJournal.SUFFIX + ".",)}
        for directory, (suffix, *probe) in marks.items():
            with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
                for entry in entries:
                    ours = (entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX)
                            and (suffix in entry.name or any(entry.name.startswith(p) for p in probe)))
                    # (a file another writer renames or deletes meanwhile is not ours to remove)
                    with contextlib.suppress(FileNotFoundError):
                        if ours and entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                            os.unlink(entry.path)
                            removed += 1
        return removed


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return -math.inf
