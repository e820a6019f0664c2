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
