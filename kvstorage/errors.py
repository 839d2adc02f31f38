"""The exceptions raised by kvstorage. Every one derives from :class:`KVStorageError`."""

from __future__ import annotations

__all__ = [
    "ConditionFailedError",
    "DriverError",
    "DriverUnavailableError",
    "InvalidKeyError",
    "KVStorageError",
    "ReadOnlyError",
    "SerializationError",
]


class KVStorageError(Exception):
    """Base class of every error raised by kvstorage."""


class InvalidKeyError(KVStorageError, ValueError):
    """A key or base was rejected before any driver was called (empty, `.`/`..`, control
    characters, longer than 1024 UTF-8 bytes)."""


class SerializationError(KVStorageError, TypeError):
    """A value cannot be serialized (raised before anything is written) or stored bytes
    cannot be deserialized."""


class ConditionFailedError(KVStorageError):
    """A conditional write (`if_absent` / `if_match`) found the condition false; nothing
    was written."""


class ReadOnlyError(KVStorageError):
    """A write was attempted on a read-only driver."""


class DriverError(KVStorageError):
    """A backend failed. ``driver`` names the driver; the original exception is chained
    as ``__cause__``."""

    def __init__(self, message: str, *, driver: str = "") -> None:
        super().__init__(f"[{driver}] {message}" if driver else message)
        self.driver = driver


class DriverUnavailableError(DriverError):
    """The backend cannot be reached; the message says where the driver tried."""
