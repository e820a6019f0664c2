"""The exceptions streamgemma raises on bad input. Each names what is wrong
(the file, key or field) so a person can act on it."""


class StreamgemmaError(Exception):
    """Base of every error streamgemma raises on purpose."""


class ConfigError(StreamgemmaError, ValueError):
    """A model config is invalid or contradicts the weights."""


class CheckpointError(StreamgemmaError, ValueError):
    """A checkpoint is missing, of an unknown format, or does not match the model."""


class DeviceError(StreamgemmaError, RuntimeError):
    """The requested device or dtype cannot run the model."""


class SnapshotError(StreamgemmaError, ValueError):
    """Base of every snapshot decode/validation failure."""


class StoppedError(StreamgemmaError, RuntimeError):
    """`generate()` was called on a session whose last generation ended at a
    stop (stop token or stop string) with no new input since."""


class SnapshotFormatError(SnapshotError):
    """The bytes are not a streamgemma snapshot, or its content does not follow
    the format (missing or mistyped fields, impossible sizes)."""


class SnapshotCorrupted(SnapshotError):
    """The snapshot was damaged after it was written: truncated, or its zstd
    checksum does not match."""


class SnapshotVersionError(SnapshotError):
    """The snapshot was written in a format version this streamgemma cannot read."""


class SnapshotModelMismatch(SnapshotError):
    """The snapshot was made with another model (other config or other weights)."""


class SnapshotMetadataError(SnapshotError, TypeError):
    """User metadata is not a map of plain msgpack values, or is too large."""


class SnapshotNotFound(SnapshotError, KeyError):
    """A snapshot store has no snapshot under this id."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class SnapshotIdError(SnapshotError):
    """A session id cannot name a snapshot in a store (bad characters, length)."""


class InvalidValueError(StreamgemmaError, ValueError):
    """A value outside what streamgemma can honour (a seed the snapshot format
    cannot hold, a float that float32 turns into 0 or infinity, a position past
    the format's bound). `field` names the argument or protocol field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class StoreError(StreamgemmaError, RuntimeError):
    """A snapshot store cannot be used (not writable, not a directory), or
    sessions could not be saved to it."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (Redis down, slow or restarting) after
    retries; clients see the error code `store_unavailable`. Retry later."""


class SessionHeld(StoreError):
    """Another live worker of the fleet holds the session and did not hand it
    over in time (clients see `session_busy`)."""


class LeaseLost(StoreError):
    """A write refused by the fence: another worker owns the session now (this
    one's lease expired, e.g. while it was paused). Its state here is stale."""


class ServeError(StreamgemmaError, RuntimeError):
    """`streamgemma serve` cannot start (the address is taken, a bad option),
    or shut down without saving every session."""


class CapacityError(StreamgemmaError, RuntimeError):
    """No room for another session: the sessions open hold all of the state
    pool's memory budget (or its session limit). Close sessions, or load the
    model with a larger `max_state_bytes=` / `max_sessions=`."""
