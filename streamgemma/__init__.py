"""streamgemma: streaming, stateful text generation with RecurrentGemma / Griffin models.

Names are imported on first use, so `import streamgemma.client` (or `sg.Client`)
does not import torch."""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GriffinConfig": "config",
    "Tokenizer": "tokenizer", "Detokenizer": "tokenizer",
    "Token": "types",
    "Model": "session.model", "load": "session.model",
    "Session": "session.session", "Tokens": "session.session", "Chat": "session.chat",
    "SnapshotStore": "session.store", "DirectorySnapshotStore": "session.store",
    "RedisSnapshotStore": "session.redis_store", "open_store": "session.stores",
    "SamplingParams": "sampling.params", "KernelConfig": "fast.tuning",
    "Engine": "serve.engine", "EngineError": "serve.record",
    "Server": "serve.server", "Limits": "serve.server", "serve_in_thread": "serve.server",
    "Client": "client.client", "ClientSession": "client.session", "ServerError": "client.events",
    "SyncClient": "client.client", "SyncSession": "client.client", "HttpConfig": "serve.http",
    **dict.fromkeys(("StreamgemmaError", "ConfigError", "CheckpointError", "DeviceError", "StoppedError",
                     "SnapshotError", "SnapshotFormatError", "SnapshotCorrupted", "SnapshotVersionError",
                     "SnapshotModelMismatch", "SnapshotMetadataError", "SnapshotNotFound", "SnapshotIdError",
                     "CapacityError", "InvalidValueError", "StoreError", "ServeError", "StoreUnavailable",
                     "SessionHeld", "LeaseLost"),
                    "errors"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'streamgemma' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
