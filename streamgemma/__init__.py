"""streamgemma: streaming, stateful text generation with RecurrentGemma / Griffin models."""

from .config import GriffinConfig
from .errors import (CheckpointError, ConfigError, DeviceError, SnapshotCorrupted, SnapshotError,
                     SnapshotFormatError, SnapshotIdError, SnapshotMetadataError, SnapshotModelMismatch,
                     SnapshotNotFound, SnapshotVersionError, StreamgemmaError)
from .model import Model, load
from .session import Session
from .snapshot_store import DirectorySnapshotStore, SnapshotStore
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "GriffinConfig", "Model", "Session", "Tokenizer", "load",
    "SnapshotStore", "DirectorySnapshotStore",
    "StreamgemmaError", "ConfigError", "CheckpointError", "DeviceError", "SnapshotError",
    "SnapshotFormatError", "SnapshotCorrupted", "SnapshotVersionError", "SnapshotModelMismatch",
    "SnapshotMetadataError", "SnapshotNotFound", "SnapshotIdError",
]
