"""`Storage`: one async key-value API over any number of drivers mounted at key prefixes.

Everything that can be done once for all drivers lives here: key rules, serialization,
routing by mount, TTL arithmetic and read-side expiry, batching per mount, conditional-write
emulation for drivers that cannot do it natively, watch events, and the background sweeper.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Literal, NoReturn, Self, TypeAlias, TypeVar

import anyio
import anyio.abc

from ._mounts import Mount, MountPoint, MountTable, Slice
from .drivers import from_url
from .drivers.base import Driver, Record, Stat, check_condition, is_expired
from .drivers.memory import MemoryDriver
from .errors import (
    ConditionFailedError,
    DriverError,
    InvalidKeyError,
    KVStorageError,
    ReadOnlyError,
    SerializationError,
)
from .keys import (
    MAX_KEY_BYTES,
    base_covers,
    depth_below,
    is_normal,
    join_keys,
    normalize_base,
    normalize_key,
)
from .retry import backoff
from .serializers import (
    DECODE_ERRORS,
    JSONSerializer,
    Serializer,
    decode_error,
    get_serializer,
)

__all__ = ["Entry", "Meta", "Mount", "Storage", "WatchCallback", "create_storage", "prefix_storage"]

logger = logging.getLogger("kvstorage")

_T = TypeVar("_T")

#: ``callback(event, key)`` with ``event`` ``"update"`` or ``"remove"`` and the full key.
WatchCallback: TypeAlias = Callable[[Literal["update", "remove"], str], None]
#: A time to live: seconds (int or float, > 0) or a ``timedelta``.
TTL: TypeAlias = float | timedelta
_BATCH = 1000


@dataclass(frozen=True, slots=True)
class Meta:
    """What :meth:`Storage.get_meta` knows about a stored item."""

    size: int
    """Size of the stored bytes."""
    etag: str
    """Changes on every write; pass it to ``set_item(..., if_match=)``."""
    mtime_timestamp: float | None = None
    """Last write (Unix seconds) or None when the backend does not record it."""
    expires_timestamp: float | None = None
    """When the item expires (Unix seconds), or None."""

    @property
    def ttl(self) -> float | None:
        """Seconds left before expiry (now), or None."""
        expires = self.expires_timestamp
        return None if expires is None else max(expires - time.time(), 0.0)

    @property
    def mtime(self) -> datetime | None:
        """Last write (aware UTC) or None when the backend does not record it."""
        return _utc(self.mtime_timestamp)

    @property
    def expires_at(self) -> datetime | None:
        """When the item expires (aware UTC), or None."""
        return _utc(self.expires_timestamp)


@dataclass(frozen=True, slots=True)
class Entry:
    """A value read together with its etag and metadata (:meth:`Storage.get_entry`)."""

    value: Any
    etag: str
    meta: Meta


@dataclass(eq=False, slots=True)
class _Shared:
    """What a storage and its `prefix_storage` views share."""

    serializer: Serializer
    mounts: MountTable = field(default_factory=MountTable)
    watchers: list[tuple[WatchCallback, str]] = field(default_factory=list)
    sweep_interval: float | None = None
    task_group: anyio.abc.TaskGroup | None = None

    def emit(self, event: Literal["update", "remove"], full_key: str) -> None:
        for callback, prefix in list(self.watchers):
            if full_key.startswith(prefix):
                try:
                    callback(event, full_key[len(prefix) :])
                except Exception:
                    logger.exception("watch callback %r failed", callback)


def _decode_failure(mount: MountPoint, exc: Exception) -> Exception:
    """What to raise for ``exc``, one of :data:`DECODE_ERRORS` from ``mount.loads``: a
    :class:`SerializationError` for the JSON serializer's fast path; a custom serializer's
    own error unchanged, as its other reads raise it."""
    return decode_error(exc) if type(mount.serializer) is JSONSerializer else exc


def _raise_driver_error(mount: MountPoint, exc: Exception) -> NoReturn:
    """Re-raise a driver exception: ours as they are, anything else as DriverError."""
    if isinstance(exc, KVStorageError):
        raise exc
    name = mount.driver.name
    raise DriverError(f"{type(exc).__name__}: {exc}", driver=name) from exc


def _refuse_write(mount: MountPoint) -> NoReturn:
    where = f"mount {mount.base!r}" if mount.base else "the root mount"
    raise ReadOnlyError(f"{mount.driver.name} driver at {where} is read-only")


def _expires_at(ttl: TTL | None) -> float | None:
    if type(ttl) is float and 0 < ttl < math.inf:  # the common case, checked inline
        return time.time() + ttl
    return None if ttl is None else time.time() + ttl_seconds(ttl)


def ttl_seconds(ttl: TTL, name: str = "ttl") -> float:
    """``ttl`` in seconds; ``TypeError`` unless it is a number or a ``timedelta``,
    ``ValueError`` unless it is finite and positive (the message names it ``name``)."""
    if isinstance(ttl, timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, int | float) and not isinstance(ttl, bool):
        seconds = float(ttl)
    else:
        raise TypeError(f"{name} must be seconds or a timedelta, not {type(ttl).__name__}")
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {ttl!r}")
    return seconds


def _utc(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)


def _meta(size: int, etag: str, mtime: float | None, expires_at: float | None) -> Meta:
    return Meta(size, etag, mtime, expires_at)


def _entry(value: Any, record: Record) -> Entry:
    meta = _meta(len(record.value), record.etag, record.mtime, record.expires_at)
    return Entry(value, record.etag, meta)


def _check_conditions(if_absent: bool, if_match: str | None) -> None:
    if not isinstance(if_absent, bool):
        raise TypeError(f"if_absent must be a bool, not {type(if_absent).__name__}")
    if if_match is not None and not isinstance(if_match, str):
        raise TypeError(f"if_match must be an etag string, not {type(if_match).__name__}")
    if if_absent and if_match is not None:
        raise ValueError("pass if_absent or if_match, not both")


def _check_depth(max_depth: int | None) -> None:
    if max_depth is None:
        return
    if not isinstance(max_depth, int) or isinstance(max_depth, bool):
        raise TypeError(f"max_depth must be an int or None, not {type(max_depth).__name__}")
    if max_depth < 0:
        raise ValueError(f"max_depth must be >= 0, got {max_depth}")


def _key_list(keys: Iterable[str]) -> Iterable[str]:
    """``keys`` itself, unless it is one string (which would iterate as characters)."""
    if isinstance(keys, str | bytes):
        raise TypeError(f"keys must be an iterable of keys, not a single {type(keys).__name__}")
    return keys


def _pairs(items: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
    if isinstance(items, Mapping):
        return list(items.items())
    if isinstance(items, str | bytes):
        raise TypeError("items must be a mapping or an iterable of (key, value) pairs")
    pairs = list(items)
    for pair in pairs:
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise TypeError(f"items must be (key, value) pairs, got {pair!r:.60}")
    return pairs


def _as_bytes(data: Any) -> bytes:
    if type(data) is bytes:
        return data
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise SerializationError(f"raw values must be bytes, not {type(data).__name__}")


async def _scan_visible(part: Slice, max_depth: int | None) -> AsyncGenerator[list[str], None]:
    """The driver keys of ``part`` that a listing shows, a page at a time: not hidden by a
    nested mount and, when the driver does not honour ``max_depth`` itself, not deeper
    than it."""
    driver = part.mount.driver
    depth = None if driver.capabilities.max_depth else max_depth  # to filter here
    async with aclosing(driver.scan_pages(part.driver_base, max_depth=max_depth)) as pages:
        async for page in pages:
            if part.masked or depth is not None:
                page = [rel for rel in page if _listed(part, rel, depth)]
            if page:
                yield page


def _listed(part: Slice, rel: str, max_depth: int | None) -> bool:
    return part.shows(rel) and (
        max_depth is None or depth_below(part.driver_base, rel) <= max_depth
    )


class Storage:
    """An async key-value store routing each key to the driver mounted at its longest
    matching base. Create one with :func:`create_storage`; close it with
    :meth:`dispose` or ``async with storage:``.

    Keys are normalized (see :mod:`kvstorage.keys`); values are serialized with the
    mount's serializer (``json`` unless given).
    """

    _shared: _Shared
    _base: str  # the prefix_storage base of this view ("" for the storage itself)
    _prefix: str  # _base + ":" or ""
    _located: dict[str, tuple[str, MountPoint, str]]  # _shared.mounts.located, one dict

    def __init__(
        self,
        driver: Driver | str | None = None,
        *,
        serializer: str | Serializer = "json",
        sweep_interval: float | None = None,
    ) -> None:
        """Create a storage with ``driver`` (a driver or URL; default memory) at the root.

        ``sweep_interval`` (seconds) runs :meth:`sweep` in the background while the storage
        is open as ``async with storage:``, for drivers that do not expire keys natively.
        """
        self._shared = _Shared(get_serializer(serializer), sweep_interval=sweep_interval)
        self._base = self._prefix = ""
        self._located = self._shared.mounts.located
        self.mount("", driver if driver is not None else MemoryDriver())

    def __repr__(self) -> str:
        mounts = ", ".join(f"{m.base or '/'}={m.driver!r}" for m in self._shared.mounts.routes)
        base = f" base={self._base!r}" if self._base else ""
        return f"<Storage{base} {mounts}>"

    # -- routing ------------------------------------------------------------------------

    def _full_base(self, base: str) -> str:
        """``base`` normalized and below this view's own base."""
        return join_keys(self._base, normalize_base(base))

    def _locate(self, key: str) -> tuple[str, MountPoint, str]:
        """(full key, mount, driver-relative key) of the item key ``key`` of this view."""
        if type(key) is str:  # the hot path: a key already normal, used recently
            located = self._located.get(self._prefix + key)
            if located is not None:
                return located
            if len(key) <= MAX_KEY_BYTES and is_normal(key):  # a new key, already normal
                return self._shared.mounts.locate_key(self._prefix + key)
        nk = normalize_base(key)  # not normalize_key: its cache would only add a miss
        if not nk:
            raise InvalidKeyError(f"empty key {key!r}")
        return self._shared.mounts.locate_key(self._prefix + nk)

    def _slices(self, base: str) -> list[Slice]:
        """What to scan for the keys under ``base`` (see :meth:`MountTable.slices`)."""
        return self._shared.mounts.slices(self._full_base(base))

    # -- single items -------------------------------------------------------------------

    async def has_item(self, key: str) -> bool:
        """True if ``key`` holds an unexpired value."""
        _, mount, rel = self._locate(key)
        return await self._get_stat(mount, rel) is not None

    async def get_item(self, key: str, default: Any = None) -> Any:
        """Return the value at ``key``, or ``default`` when it is missing or expired."""
        located = self._located.get(self._prefix + key) if type(key) is str else None
        _, mount, rel = self._locate(key) if located is None else located
        get_now = mount.get_now
        try:
            record = get_now(rel) if get_now is not None else await mount.driver.get(rel)
        except Exception as exc:
            _raise_driver_error(mount, exc)
        if record is None or (record.expires_at is not None and record.expires_at <= time.time()):
            return default
        try:
            return mount.loads(record.value)
        except DECODE_ERRORS as exc:
            raise _decode_failure(mount, exc) from None

    async def get_item_raw(self, key: str) -> bytes | None:
        """Return the stored bytes at ``key`` unchanged, or None."""
        _, mount, rel = self._locate(key)
        record = await self._get_record(mount, rel)
        return None if record is None else record.value

    async def set_item(
        self,
        key: str,
        value: Any,
        *,
        ttl: TTL | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> None:
        """Store ``value`` at ``key``.

        Args:
            ttl: seconds or ``timedelta`` until the item expires; without it, any previous
                expiry is removed.
            if_absent: write only if the key holds no value.
            if_match: write only if the stored etag equals this one.

        Raises:
            SerializationError: the value cannot be serialized (nothing is written).
            ConditionFailedError: a condition was false (nothing is written).
        """
        located = self._located.get(self._prefix + key) if type(key) is str else None
        full, mount, rel = self._locate(key) if located is None else located
        expires_at = None if ttl is None else _expires_at(ttl)
        set_now = mount.set_now
        if set_now is None or if_absent or if_match is not None:
            _check_conditions(if_absent, if_match)
            data = mount.serializer.dumps(value)
            await self._write(full, mount, rel, data, expires_at, if_absent, if_match)
            return
        # An unconditional write to a driver that never waits (memory): no coroutine.
        data = mount.serializer.dumps(value)
        try:
            set_now(rel, data, expires_at)
        except Exception as exc:
            _raise_driver_error(mount, exc)
        if self._shared.watchers and mount.emits:
            self._shared.emit("update", full)

    async def set_item_raw(
        self,
        key: str,
        data: bytes,
        *,
        ttl: TTL | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> None:
        """Store ``data`` unchanged at ``key`` (same options as :meth:`set_item`)."""
        full, mount, rel = self._locate(key)
        expires_at = _expires_at(ttl)
        _check_conditions(if_absent, if_match)
        await self._write(full, mount, rel, _as_bytes(data), expires_at, if_absent, if_match)

    async def remove_item(self, key: str) -> bool:
        """Delete ``key``; return True if it held a value."""
        full, mount, rel = self._locate(key)
        if mount.driver.read_only:
            _refuse_write(mount)
        try:
            removed = await mount.driver.remove(rel)
        except Exception as exc:
            _raise_driver_error(mount, exc)
        if removed and self._shared.watchers and mount.emits:
            self._shared.emit("remove", full)
        return removed

    async def get_meta(self, key: str) -> Meta | None:
        """Return size, etag, mtime and expiry of ``key``, or None if it is missing."""
        _, mount, rel = self._locate(key)
        stat = await self._get_stat(mount, rel)
        if stat is None:
            return None
        return _meta(stat.size, stat.etag, stat.mtime, stat.expires_at)

    async def get_entry(self, key: str) -> Entry | None:
        """Read value, etag and metadata of ``key`` together (one driver read), or None."""
        _, mount, rel = self._locate(key)
        record = await self._get_record(mount, rel)
        if record is None:
            return None
        return _entry(mount.serializer.loads(record.value), record)

    async def get_entry_raw(self, key: str) -> Entry | None:
        """Like :meth:`get_entry`, with the stored bytes unchanged as ``value`` (for callers
        that serialize themselves, such as ``sessions``)."""
        _, mount, rel = self._locate(key)
        record = await self._get_record(mount, rel)
        return None if record is None else _entry(record.value, record)

    async def update_item(
        self,
        key: str,
        fn: Callable[[Any], Any],
        *,
        ttl: TTL | None = None,
        retries: int = 100,
    ) -> Any:
        """Atomically replace the value at ``key`` with ``fn(old)`` and return it.

        ``fn`` receives the current value (None when missing) and may be a coroutine
        function. The write is conditional on the etag read, so a concurrent writer makes
        it re-read and call ``fn`` again, up to ``retries`` times (then
        :class:`ConditionFailedError`). Without ``ttl`` the item keeps its current expiry.
        """
        full, mount, rel = self._locate(key)
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if ttl is not None:
            _expires_at(ttl)  # a bad ttl fails before the first read
        for attempt in range(retries + 1):
            record = await self._get_record(mount, rel)
            old = None if record is None else mount.serializer.loads(record.value)
            new = fn(old)
            if inspect.isawaitable(new):
                new = await new
            data = mount.serializer.dumps(new)
            if ttl is not None:
                expires_at = _expires_at(ttl)
            else:
                expires_at = None if record is None else record.expires_at
            try:
                if record is None:
                    await self._write(full, mount, rel, data, expires_at, True, None)
                else:
                    await self._write(full, mount, rel, data, expires_at, False, record.etag)
            except ConditionFailedError:
                if attempt == retries:
                    raise
                await backoff(attempt)
                continue
            return new
        raise AssertionError("unreachable")  # pragma: no cover

    async def touch(self, key: str, *, ttl: TTL | None) -> bool:
        """Set a new expiry on ``key`` (``None`` removes it) without rewriting the value
        through the serializer; False if the key is missing."""
        _, mount, rel = self._locate(key)
        expires_at = _expires_at(ttl)
        self._check_writable(mount)
        try:
            return await mount.driver.touch(rel, expires_at=expires_at)
        except Exception as exc:
            _raise_driver_error(mount, exc)

    async def _get_stat(self, mount: MountPoint, rel: str) -> Stat | None:
        """The driver's ``head`` of ``rel``; None when missing or expired."""
        try:
            stat = await mount.driver.head(rel)
        except Exception as exc:
            _raise_driver_error(mount, exc)
        if stat is None or is_expired(stat.expires_at):
            return None
        return stat

    async def _get_record(self, mount: MountPoint, rel: str) -> Record | None:
        get_now = mount.get_now
        try:
            record = get_now(rel) if get_now is not None else await mount.driver.get(rel)
        except Exception as exc:
            _raise_driver_error(mount, exc)
        if record is None or is_expired(record.expires_at):
            return None
        return record

    def _check_writable(self, mount: MountPoint) -> None:
        if mount.driver.read_only:
            _refuse_write(mount)

    async def _write(
        self,
        full: str,
        mount: MountPoint,
        rel: str,
        data: bytes,
        expires_at: float | None,
        if_absent: bool,
        if_match: str | None,
    ) -> None:
        driver = mount.driver
        if driver.read_only:
            _refuse_write(mount)
        try:
            if (if_absent or if_match is not None) and not driver.capabilities.conditions:
                await self._emulated_conditional_set(
                    mount, rel, data, expires_at, if_absent=if_absent, if_match=if_match
                )
            else:
                await driver.set(
                    rel, data, expires_at=expires_at, if_absent=if_absent, if_match=if_match
                )
        except Exception as exc:
            _raise_driver_error(mount, exc)
        if self._shared.watchers and mount.emits:
            self._shared.emit("update", full)

    async def _emulated_conditional_set(
        self,
        mount: MountPoint,
        rel: str,
        data: bytes,
        expires_at: float | None,
        *,
        if_absent: bool,
        if_match: str | None,
    ) -> None:
        """Check-then-set under a per-mount lock: atomic within this process only."""
        if mount.lock is None:
            mount.lock = anyio.Lock()
        async with mount.lock:
            current = await self._get_record(mount, rel)
            stored = None if current is None else current.etag
            check_condition(rel, stored, if_absent=if_absent, if_match=if_match)
            await mount.driver.set(rel, data, expires_at=expires_at)

    # -- batches ------------------------------------------------------------------------

    async def get_items(self, keys: Iterable[str]) -> dict[str, Any]:
        """Return ``{normalized key: value or None}`` in input order, one driver batch per
        mount."""
        order = list(map(normalize_key, _key_list(keys)))
        batches = await self._read_per_mount(order, lambda driver: driver.get_values)
        # Several mounts fill the result out of order: it starts with every key in order.
        result: dict[str, Any] = dict.fromkeys(order) if len(batches) > 1 else {}
        for mount, nks, data in batches:
            loads = mount.loads
            try:
                values = [None if value is None else loads(value) for value in data]
            except DECODE_ERRORS as exc:
                raise _decode_failure(mount, exc) from None
            result.update(zip(nks, values, strict=True))
        return result

    async def get_entries_raw(self, keys: Iterable[str]) -> dict[str, Entry | None]:
        """Like :meth:`get_items`, with each item's stored bytes, etag and metadata:
        ``{normalized key: Entry(bytes, etag, meta) or None}`` in input order, one driver
        batch per mount. For tools that move items without deserializing them (copies,
        dumps, servers), keeping each remaining TTL."""
        order = [normalize_key(key) for key in _key_list(keys)]
        result: dict[str, Entry | None] = dict.fromkeys(order)
        for _, nks, records in await self._read_per_mount(order, lambda driver: driver.get_many):
            now = time.time()
            for nk, record in zip(nks, records, strict=True):
                if record is not None and not is_expired(record.expires_at, now):
                    result[nk] = _entry(record.value, record)
        return result

    async def _read_per_mount(
        self, order: list[str], read: Callable[[Driver], Callable[[list[str]], Awaitable[list[_T]]]]
    ) -> list[tuple[MountPoint, list[str], list[_T]]]:
        """One batch read per mount, ``read(driver)(driver keys)`` (its ``get_many`` or
        ``get_values``): (mount, normalized keys, what it returned)."""
        batches = []
        for mount, (nks, rels) in self._shared.mounts.group(order, self._prefix).items():
            try:
                found = await read(mount.driver)(rels)
            except Exception as exc:
                _raise_driver_error(mount, exc)
            batches.append((mount, nks, found))
        return batches

    async def set_items(
        self,
        items: Mapping[str, Any] | Iterable[tuple[str, Any]],
        *,
        ttl: TTL | None = None,
    ) -> None:
        """Store many values, one driver batch per mount. Every value is serialized (and
        every key checked) before anything is written."""
        await self._set_many(_pairs(items), ttl, raw=False)

    async def set_items_raw(
        self,
        items: Mapping[str, bytes] | Iterable[tuple[str, bytes]],
        *,
        ttl: TTL | None = None,
    ) -> None:
        """Store many ``bytes`` values unchanged, one driver batch per mount (the raw
        counterpart of :meth:`set_items`; every key and value is checked first)."""
        await self._set_many(_pairs(items), ttl, raw=True)

    async def _set_many(self, pairs: list[tuple[str, Any]], ttl: TTL | None, *, raw: bool) -> None:
        expires_at = _expires_at(ttl)
        groups: dict[MountPoint, list[tuple[str, str, bytes]]] = {}
        for key, value in pairs:
            full, mount, rel = self._locate(key)
            self._check_writable(mount)
            data = _as_bytes(value) if raw else mount.serializer.dumps(value)
            groups.setdefault(mount, []).append((full, rel, data))
        for mount, batch in groups.items():
            try:
                await mount.driver.set_many(
                    [(rel, data) for _, rel, data in batch], expires_at=expires_at
                )
            except Exception as exc:
                _raise_driver_error(mount, exc)
            if self._shared.watchers and mount.emits:
                for full, _, _ in batch:
                    self._shared.emit("update", full)

    async def remove_items(self, keys: Iterable[str]) -> int:
        """Delete many keys, one driver batch per mount; return how many existed."""
        removed = 0
        nks = [normalize_key(key) for key in _key_list(keys)]
        groups = self._shared.mounts.group(nks, self._prefix)
        for mount in groups:
            self._check_writable(mount)
        for mount, (nks, rels) in groups.items():
            try:
                if self._shared.watchers and mount.emits:
                    for nk, rel in zip(nks, rels, strict=True):  # one by one: exact events
                        if await mount.driver.remove(rel):
                            removed += 1
                            self._shared.emit("remove", self._prefix + nk)
                else:
                    removed += await mount.driver.remove_many(rels)
            except Exception as exc:
                _raise_driver_error(mount, exc)
        return removed

    # -- listing and clearing -----------------------------------------------------------

    async def iter_keys(
        self, base: str = "", *, max_depth: int | None = None
    ) -> AsyncIterator[str]:
        """Yield every key under ``base`` (full keys, relative to this view), streaming.

        ``max_depth`` limits how many separators a key may have below ``base``: ``0``
        yields only direct children.
        """
        async with aclosing(self._key_pages(base, max_depth)) as pages:
            async for page in pages:
                for key in page:
                    yield key

    async def get_keys(self, base: str = "", *, max_depth: int | None = None) -> list[str]:
        """Return the keys :meth:`iter_keys` yields, as a list."""
        keys: list[str] = []
        async with aclosing(self._key_pages(base, max_depth)) as pages:
            async for page in pages:
                keys += page
        return keys

    async def _key_pages(self, base: str, max_depth: int | None) -> AsyncGenerator[list[str], None]:
        """The keys :meth:`iter_keys` yields, a list at a time as the drivers page them."""
        _check_depth(max_depth)
        strip = len(self._prefix)
        for part in self._slices(base):
            depth = None if max_depth is None else max_depth - part.depth_offset
            if depth is not None and depth < 0:
                continue
            prefix = part.mount.prefix
            try:
                async with aclosing(_scan_visible(part, depth)) as pages:
                    async for page in pages:
                        if prefix or strip:
                            page = [(prefix + rel)[strip:] for rel in page]
                        yield page
            except Exception as exc:
                _raise_driver_error(part.mount, exc)

    async def clear(self, base: str = "") -> None:
        """Remove exactly the keys that :meth:`get_keys` lists under ``base``, on every
        mount involved (also below a base that is not a mount)."""
        parts = self._slices(base)
        for part in parts:
            self._check_writable(part.mount)
        for part in parts:
            mount = part.mount
            emit = bool(self._shared.watchers) and mount.emits
            try:
                if not part.masked and not emit:
                    await mount.driver.clear(part.driver_base)
                    continue
                # Listed in full before removing: a driver's scan need not survive removals.
                async with aclosing(_scan_visible(part, None)) as pages:
                    batch = [rel async for page in pages for rel in page]
                for start in range(0, len(batch), _BATCH):
                    chunk = batch[start : start + _BATCH]
                    await mount.driver.remove_many(chunk)
                    if emit:
                        for rel in chunk:
                            self._shared.emit("remove", mount.prefix + rel)
            except Exception as exc:
                _raise_driver_error(mount, exc)

    async def sweep(self, base: str = "") -> int:
        """Delete expired items under ``base`` on drivers that do not expire natively;
        return how many were deleted."""
        swept = 0
        for mount, driver_base, _, _ in self._slices(base):
            if mount.driver.capabilities.ttl or mount.driver.read_only:
                continue
            try:
                swept += await mount.driver.sweep(driver_base)
            except Exception as exc:
                _raise_driver_error(mount, exc)
        return swept

    # -- mounts -------------------------------------------------------------------------

    def mount(
        self, base: str, driver: Driver | str, *, serializer: str | Serializer | None = None
    ) -> Self:
        """Mount ``driver`` (or a driver URL) at ``base``; keys under ``base`` go to it.

        The longest matching mount wins and hides the parent's keys under it. A base that
        is already mounted raises ``ValueError``.
        """
        full = self._full_base(base)
        if full in self._shared.mounts:
            raise ValueError(f"a driver is already mounted at {full!r}; unmount it first")
        if isinstance(driver, str):
            driver = from_url(driver)
        if not isinstance(driver, Driver):
            raise TypeError(f"expected a Driver or a URL, got {type(driver).__name__}")
        chosen = self._shared.serializer if serializer is None else get_serializer(serializer)
        self._shared.mounts.add(MountPoint(full, full + ":" if full else "", driver, chosen))
        return self

    async def unmount(self, base: str, *, dispose: bool = True) -> None:
        """Remove the mount at ``base`` (disposing its driver unless ``dispose=False``)."""
        full = self._full_base(base)
        if not full:
            raise ValueError("the root mount cannot be unmounted")
        if full not in self._shared.mounts:
            raise ValueError(f"nothing is mounted at {full!r}")
        mount = self._shared.mounts.remove(full)
        if mount.stop_watch is not None:
            await mount.stop_watch()
            mount.stop_watch = None
        if dispose:
            await mount.driver.dispose()

    def get_mount(self, base: str = "") -> Mount:
        """The mount responsible for keys under ``base``."""
        return self._shared.mounts.mount_for_base(self._full_base(base)).public()

    def get_mounts(self, base: str = "", *, parents: bool = False) -> list[Mount]:
        """Mounts at or under ``base`` (and, with ``parents``, those above it), longest
        base first."""
        full = self._full_base(base)
        probe = full + ":"
        return [
            mount.public()
            for mount in self._shared.mounts.routes
            if mount.base == full
            or base_covers(full, mount.base)
            or (parents and probe.startswith(mount.prefix))
        ]

    # -- watching -----------------------------------------------------------------------

    async def watch(self, callback: WatchCallback) -> Callable[[], Awaitable[None]]:
        """Call ``callback(event, key)`` after every change under this storage (or view):
        ``"update"`` for writes, ``"remove"`` for deletes, clears and, where the driver
        reports it, expiry. Returns an async ``unwatch()``.

        The callback runs synchronously inside the writing call; schedule your own task
        for slow work. Drivers with native watching (``capabilities.watch``) report
        changes made by other processes too; drivers mounted after ``watch()`` report
        only changes made through this storage until the next ``watch()`` call.
        """
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        shared = self._shared
        entry = (callback, self._prefix)
        shared.watchers.append(entry)
        for mount in shared.mounts.routes:
            if mount.driver.capabilities.watch and mount.stop_watch is None:

                def forward(
                    event: Literal["update", "remove"], rel: str, m: MountPoint = mount
                ) -> None:
                    shared.emit(event, m.prefix + rel)

                mount.stop_watch = await mount.driver.watch(forward)

        async def unwatch() -> None:
            if entry in shared.watchers:
                shared.watchers.remove(entry)
            if not shared.watchers:
                await self._stop_watchers()

        return unwatch

    async def unwatch(self) -> None:
        """Remove every watch callback and stop the drivers' watchers."""
        self._shared.watchers.clear()
        await self._stop_watchers()

    async def _stop_watchers(self) -> None:
        for mount in self._shared.mounts.routes:
            if mount.stop_watch is not None:
                stop, mount.stop_watch = mount.stop_watch, None
                await stop()

    # -- lifecycle ----------------------------------------------------------------------

    async def dispose(self) -> None:
        """Stop watchers and the sweeper, and close every driver (views share them)."""
        await self.unwatch()
        seen: set[int] = set()
        for mount in self._shared.mounts.routes:
            if id(mount.driver) not in seen:
                seen.add(id(mount.driver))
                await mount.driver.dispose()

    async def __aenter__(self) -> Self:
        interval = self._shared.sweep_interval
        if interval is not None and self._shared.task_group is None:
            group = anyio.create_task_group()
            await group.__aenter__()
            group.start_soon(self._sweep_forever, interval)
            self._shared.task_group = group
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        group, self._shared.task_group = self._shared.task_group, None
        if group is not None:
            group.cancel_scope.cancel()
            await group.__aexit__(None, None, None)
        await self.dispose()

    async def _sweep_forever(self, interval: float) -> None:
        while True:
            await anyio.sleep(interval)
            try:
                swept = await self.sweep()
            except KVStorageError:
                logger.exception("background sweep failed")
            else:
                if swept:
                    logger.debug("swept %d expired items", swept)


def create_storage(
    driver: Driver | str | None = None,
    *,
    serializer: str | Serializer = "json",
    sweep_interval: float | None = None,
) -> Storage:
    """Create a :class:`Storage` with ``driver`` (a driver or a URL such as
    ``"sqlite:///app.db"``; default: memory) mounted at the root."""
    return Storage(driver, serializer=serializer, sweep_interval=sweep_interval)


def prefix_storage(storage: Storage, base: str) -> Storage:
    """Return a view of ``storage`` where every key is relative to ``base``.

    The view shares mounts, drivers and watchers with ``storage``: listing strips
    ``base``, ``clear()`` clears only under it, ``watch()`` sees only its keys. It is a
    convenience, not a security boundary.
    """
    full = storage._full_base(base)
    if full == storage._base:
        return storage
    view = object.__new__(Storage)
    view._shared = storage._shared
    view._base = full
    view._prefix = full + ":"
    view._located = storage._located
    return view
