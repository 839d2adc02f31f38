"""kvstorage: one async key-value API over memory, files, SQLite, Redis and S3.

>>> from kvstorage import create_storage
>>> storage = create_storage()                      # memory at the root
>>> storage.mount("cache", "redis://127.0.0.1:6379/0?base=app")  # doctest: +SKIP
"""

from __future__ import annotations

from .drivers.base import Capabilities, Driver, Record, Stat
from .errors import (
    ConditionFailedError,
    DriverError,
    DriverUnavailableError,
    InvalidKeyError,
    KVStorageError,
    ReadOnlyError,
    SerializationError,
)
from .keys import join_keys, normalize_base, normalize_key
from .serializers import JSONSerializer, Serializer, TaggedSerializer, get_serializer
from .snapshot import restore_snapshot, snapshot
from .storage import Entry, Meta, Mount, Storage, WatchCallback, create_storage, prefix_storage

__all__ = [
    "Capabilities",
    "ConditionFailedError",
    "Driver",
    "DriverError",
    "DriverUnavailableError",
    "Entry",
    "InvalidKeyError",
    "JSONSerializer",
    "KVStorageError",
    "Meta",
    "Mount",
    "ReadOnlyError",
    "Record",
    "SerializationError",
    "Serializer",
    "Stat",
    "Storage",
    "TaggedSerializer",
    "WatchCallback",
    "create_storage",
    "get_serializer",
    "join_keys",
    "normalize_base",
    "normalize_key",
    "prefix_storage",
    "restore_snapshot",
    "snapshot",
]
