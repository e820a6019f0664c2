"""streamgemma: streaming, stateful text generation with RecurrentGemma / Griffin models."""

from .chat import Chat
from .client import Client, ClientSession, ServerError
from .config import GriffinConfig
from .errors import (CheckpointError, ConfigError, DeviceError, SnapshotCorrupted, SnapshotError,
                     SnapshotFormatError, SnapshotIdError, SnapshotMetadataError, SnapshotModelMismatch,
                     SnapshotNotFound, SnapshotVersionError, StoppedError, StreamgemmaError)
from .engine import Engine, EngineError
from .model import Model, load
from .sampling import SamplingParams
from .server import Limits, Server
from .session import Session, Token
from .snapshot_store import DirectorySnapshotStore, SnapshotStore
from .tokenizer import Detokenizer, Tokenizer

__version__ = "0.1.0"

__all__ = [
    "GriffinConfig", "Model", "Session", "Token", "SamplingParams", "Chat", "Tokenizer", "Detokenizer", "load",
    "SnapshotStore", "DirectorySnapshotStore",
    "Engine", "EngineError", "Server", "Limits", "Client", "ClientSession", "ServerError",
    "StreamgemmaError", "ConfigError", "CheckpointError", "DeviceError", "StoppedError", "SnapshotError",
    "SnapshotFormatError", "SnapshotCorrupted", "SnapshotVersionError", "SnapshotModelMismatch",
    "SnapshotMetadataError", "SnapshotNotFound", "SnapshotIdError",
]
