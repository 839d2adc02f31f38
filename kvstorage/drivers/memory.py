"""MemoryDriver: a dict in this process, with an optional LRU bound. Runs on any anyio
backend (asyncio, trio)."""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Sequence

from ..keys import base_covers
from .base import SCAN_PAGE, Capabilities, Driver, Record, check_condition, is_expired

__all__ = ["MemoryDriver"]

_versions = itertools.count(1)  # etags are hex(next(_versions)): cheaper than str()


def _dict_store(data: dict[str, Record]) -> Callable[[str, bytes, float | None], str]:
    """A function storing a new record straight into ``data`` (an unbounded driver's: never
    replaced, clear() empties it) and returning its etag: the memory hot path."""

    def store(key: str, value: bytes, expires_at: float | None) -> str:
        etag = hex(next(_versions))
        data[key] = Record(value, etag, time.time(), expires_at)
        return etag

    return store


class MemoryDriver(Driver):
    """Keeps every value in a dict of this process; nothing survives a restart.

    Args:
        max_entries: keep at most this many keys, evicting the least recently used
            (read or written) first. None (default) means unbounded.

    An expired key is invisible at once; its memory is freed when it is swept
    (``storage.sweep()`` or the storage's ``sweep_interval``), overwritten or removed.
    Operations never wait, so conditions are atomic by construction. Listing copies the
    key references (8 bytes per key) so that writes during iteration are safe.
    """

    name = "memory"
    capabilities = Capabilities(conditions=True)

    def __init__(self, *, max_entries: int | None = None) -> None:
        if max_entries is not None and max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        # Bounded: an OrderedDict, least recently used first (O(1) moves and evictions).
        self._data: dict[str, Record] = {} if max_entries is None else OrderedDict()
        self._lru: OrderedDict[str, Record] | None = (
            self._data if isinstance(self._data, OrderedDict) else None
        )
        self._max_entries = max_entries
        # Stores a new record, returns its etag (and is what synchronous_set offers).
        self._store: Callable[[str, bytes, float | None], str] = (
            _dict_store(self._data) if self._lru is None else self._evicting_store
        )

    @classmethod
    def from_url(cls, url: str) -> MemoryDriver:
        """Build from ``memory://`` (optionally ``memory://?max_entries=1000``)."""
        from urllib.parse import parse_qs, urlsplit

        query = parse_qs(urlsplit(url).query)
        max_entries = query.get("max_entries")
        return cls(max_entries=int(max_entries[0]) if max_entries else None)

    @property
    def max_entries(self) -> int | None:
        """The LRU bound given, or None."""
        return self._max_entries

    def __repr__(self) -> str:
        bound = f"max_entries={self._max_entries}" if self._max_entries else ""
        return f"MemoryDriver({bound})"

    async def get(self, key: str) -> Record | None:
        return self.peek(key)

    def synchronous_get(self) -> Callable[[str], Record | None] | None:
        # A subclass that overrides get is awaited as usual.
        if type(self).get is not MemoryDriver.get:
            return None
        if self._lru is not None:
            return self.peek
        # Unbounded: the dict's own get. The core treats an expired record as missing.
        return self._data.get

    async def get_many(self, keys: Sequence[str]) -> list[Record | None]:
        return [self.peek(key) for key in keys]

    async def set(
        self,
        key: str,
        value: bytes,
        *,
        expires_at: float | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> str:
        if if_absent or if_match is not None:
            current = self.peek(key)
            etag = None if current is None else current.etag
            check_condition(key, etag, if_absent=if_absent, if_match=if_match)
        return self._store(key, value, expires_at)

    def synchronous_set(self) -> Callable[[str, bytes, float | None], str] | None:
        # A subclass that overrides set is awaited as usual.
        return self._store if type(self).set is MemoryDriver.set else None

    def _evicting_store(self, key: str, value: bytes, expires_at: float | None) -> str:
        etag = hex(next(_versions))
        self.put(key, Record(value, etag, time.time(), expires_at))
        return etag

    # -- for caches: records kept as another driver reported them ------------------------

    def peek(self, key: str) -> Record | None:
        """The live record at ``key`` or None, without awaiting (an expired one is
        dropped; a read counts as a use for the LRU bound)."""
        record = self._data.get(key)
        if record is None:
            return None
        if record.expires_at is not None and record.expires_at <= time.time():
            del self._data[key]
            return None
        if self._lru is not None:
            self._lru.move_to_end(key)  # most recently used goes last
        return record

    def put(self, key: str, record: Record) -> None:
        """Store ``record`` exactly as given -- etag and times included -- without
        awaiting, evicting the least recently used keys beyond ``max_entries``. For caches
        that keep the records of another driver (``TieredDriver``)."""
        lru = self._lru
        if lru is None:
            self._data[key] = record
            return
        if key in lru:
            lru.move_to_end(key)
        else:
            limit = self._max_entries or 0
            while len(lru) >= limit:
                lru.popitem(last=False)
        lru[key] = record

    def discard(self, key: str) -> None:
        """Forget ``key`` if it is stored, without awaiting."""
        self._data.pop(key, None)

    async def set_many(
        self, items: Sequence[tuple[str, bytes]], *, expires_at: float | None = None
    ) -> None:
        for key, value in items:
            self._store(key, value, expires_at)

    async def remove(self, key: str) -> bool:
        record = self._data.pop(key, None)
        return record is not None and not is_expired(record.expires_at)

    async def remove_many(self, keys: Sequence[str]) -> int:
        now = time.time()
        removed = 0
        for key in keys:
            record = self._data.pop(key, None)
            if record is not None and not is_expired(record.expires_at, now):
                removed += 1
        return removed

    scan = Driver.scan_by_pages

    async def scan_pages(
        self, base: str = "", *, max_depth: int | None = None
    ) -> AsyncGenerator[list[str], None]:
        # Over a copy of the key references, a page at a time: writes between pages are
        # safe, and a key removed or expired by then is left out.
        prefix = base + ":" if base else ""
        data = self._data
        keys = list(data)
        now = time.time()
        for start in range(0, len(keys), SCAN_PAGE):
            page = [
                key
                for key in keys[start : start + SCAN_PAGE]
                if key.startswith(prefix)
                and (record := data.get(key)) is not None
                and (record.expires_at is None or record.expires_at > now)
            ]
            if page:
                yield page

    async def clear(self, base: str = "") -> None:
        if not base:
            self._data.clear()
            return
        for key in [key for key in self._data if base_covers(base, key)]:
            del self._data[key]

    async def touch(self, key: str, *, expires_at: float | None) -> bool:
        record = self.peek(key)
        if record is None:
            return False
        self._data[key] = Record(record.value, record.etag, record.mtime, expires_at)
        return True

    async def sweep(self, base: str = "") -> int:
        now = time.time()
        expired = [
            key
            for key, record in self._data.items()
            if is_expired(record.expires_at, now) and base_covers(base, key)
        ]
        for key in expired:
            del self._data[key]
        return len(expired)

    async def dispose(self) -> None:
        self._data.clear()
