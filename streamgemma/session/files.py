"""Files of the stores: session ids as file names, and the atomic write
(temp file, fsync, rename, fsync the directory) that snapshots use."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from pathlib import Path

from ..errors import SnapshotFormatError, SnapshotIdError
from ..validate import short

# Ids become file names: no separators, no leading dot (so no '.', '..' or
# hidden/temp names), short enough for a 255-byte file name with our suffixes.
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")
TEMP_SUFFIX = ".tmp"


def validate_session_id(session_id: object) -> str:
    """Return `session_id` if it can name a snapshot in a store: 1-200 characters
    of ASCII letters, digits, '_', '-', '.', not starting with '.'. Raises
    SnapshotIdError otherwise."""
    if not isinstance(session_id, str) or not SESSION_ID_PATTERN.fullmatch(session_id):
        raise SnapshotIdError(f"session id {short(session_id)} is not valid: use 1-200 characters of ASCII "
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
    # (the name's last 200 characters: a legal name of up to 255 must leave room for the temp marks)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[-200:]}.", suffix=TEMP_SUFFIX, dir=directory)
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
    fsync_directory(directory)


def read_regular_file(path: Path, max_bytes: int | None = None) -> bytes:
    """The bytes of `path`, a regular file of at most `max_bytes` (None: any
    size). FileNotFoundError if it is not there; SnapshotFormatError if it is
    something else (a FIFO planted under the name would block the read, and
    the thread, forever) or too large."""
    # O_NONBLOCK: opening a FIFO must not wait for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SnapshotFormatError(f"{path} is not a regular file")
        limit = info.st_size if max_bytes is None else max_bytes
        if info.st_size > limit:
            raise SnapshotFormatError(f"{path} is {info.st_size} bytes, larger than it can be ({limit} bytes)")
        parts, size = [], 0
        while max_bytes is None or size <= max_bytes:  # up to one byte more than allowed: a file that grew
            part = os.read(fd, 1 << 20 if max_bytes is None else min(1 << 20, max_bytes + 1 - size))
            if not part:
                break
            parts.append(part)
            size += len(part)
    finally:
        os.close(fd)
    if max_bytes is not None and size > max_bytes:
        raise SnapshotFormatError(f"{path} is more than {max_bytes} bytes, more than it can be")
    return b"".join(parts)


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable."""
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
