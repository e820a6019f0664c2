"""streamgemma: streaming, stateful text generation with RecurrentGemma / Griffin models."""

from .config import GriffinConfig
from .errors import CheckpointError, ConfigError, DeviceError, SnapshotError, StreamgemmaError
from .model import Model, load
from .session import Session
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "GriffinConfig", "Model", "Session", "Tokenizer", "load",
    "StreamgemmaError", "ConfigError", "CheckpointError", "DeviceError", "SnapshotError",
]
