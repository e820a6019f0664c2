"""Where suspended sessions live: the `SnapshotStore` interface (snapshot
bytes by session id), `DirectorySnapshotStore` (one file per session in a
directory, safe for several processes sharing it), and the atomic file write
that `Session.save` also uses."""

from __future__ import annotations

import abc
import contextlib
import os
import re
import tempfile
import time
from pathlib import Path

from ..errors import SnapshotIdError, SnapshotNotFound

# Ids become file names: no separators, no leading dot (so no '.', '..' or
# hidden/temp names), short enough for a 255-byte file name with our suffixes.
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")
TEMP_SUFFIX = ".tmp"


def validate_session_id(session_id: object) -> str:
    """Return `session_id` if it can name a snapshot in a store: 1-200 characters
    of ASCII letters, digits, '_', '-', '.', not starting with '.'. Raises
    SnapshotIdError otherwise."""
    if not isinstance(session_id, str) or not SESSION_ID_PATTERN.fullmatch(session_id):
        raise SnapshotIdError(f"session id {session_id!r} is not valid: use 1-200 characters of ASCII "
                              "letters, digits, '_', '-' and '.', not starting with '.'")
    return session_id


def write_file_atomic(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> None:
    """Write `data` to `path` so that readers see either the old file or the
    complete new one, never a partial file, even across a crash: a temp file in
    the same directory, fsync, rename over `path`, fsync the directory.
    Concurrent writers of one path each write their own temp file; the last
    rename wins. The file is created with mode 0600 (snapshots hold
    conversation state)."""
    path = Path(path)
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable."""
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SnapshotStore(abc.ABC):
    """Snapshots (the bytes of `Session.snapshot()`) by session id.

    Ids are validated with `validate_session_id` (SnapshotIdError); a missing
    id raises SnapshotNotFound (a KeyError)."""

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
    in case name the same file."""

    SUFFIX = ".sgsnap"

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"DirectorySnapshotStore({str(self.directory)!r})"

    def path(self, session_id: str) -> Path:
        """The file that holds `session_id`'s snapshot."""
        return self.directory / (validate_session_id(session_id) + self.SUFFIX)

    def put(self, session_id: str, blob: bytes) -> None:
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise TypeError(f"a snapshot is bytes, got {type(blob).__name__}")
        write_file_atomic(self.path(session_id), blob)

    def get(self, session_id: str) -> bytes:
        path = self.path(session_id)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise SnapshotNotFound(f"no snapshot for session {session_id!r} in {self.directory}") from None

    def delete(self, session_id: str) -> None:
        path = self.path(session_id)
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise SnapshotNotFound(f"no snapshot for session {session_id!r} in {self.directory}") from None
        _fsync_directory(self.directory)

    def list(self) -> list[str]:
        ids = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                sid = entry.name[:-len(self.SUFFIX)]
                if (entry.name.endswith(self.SUFFIX) and SESSION_ID_PATTERN.fullmatch(sid)
                        and entry.is_file()):
                    ids.append(sid)
        return sorted(ids)

    def __contains__(self, session_id: str) -> bool:
        return self.path(session_id).is_file()

    def remove_stale_temp_files(self, older_than_s: float = 3600.0) -> int:
        """Delete temp files that writers which crashed mid-write left behind,
        if older than `older_than_s` seconds (younger ones may belong to a write
        in progress). Returns how many were removed."""
        removed = 0
        cutoff = time.time() - older_than_s
        with os.scandir(self.directory) as entries:
            for entry in entries:
                ours = (entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX)
                        and self.SUFFIX + "." in entry.name)
                if ours and entry.is_file() and entry.stat().st_mtime < cutoff:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
        return removed
