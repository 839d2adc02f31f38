"""The driver interface: the one small abstract class every backend implements.

A driver stores *bytes* under *normalized, mount-relative keys* (``"users:42"``: segments
joined by ``:``, already validated by the core). It never sees Python values, never
normalizes keys, never emits events on behalf of the core. What it must do is what only
the backend can do well: read and write bytes, keep an expiry time and an etag with each
value, list keys under a base, and make conditional writes atomic.

Only :meth:`Driver.get`, :meth:`Driver.set`, :meth:`Driver.remove` and :meth:`Driver.scan`
are abstract. Every other method has a correct default built on those four; a driver
overrides one when its backend can do the same work in fewer round trips (``MGET``, one SQL
transaction, ...). A driver whose data is in this process (memory) may also offer
:meth:`Driver.synchronous_get` and :meth:`Driver.synchronous_set`, which the core then
calls on its hot paths instead of awaiting ``get`` and ``set``.

Contract, in short:

* **Expiry** -- ``expires_at`` is an absolute Unix time in seconds (``time.time()`` scale) or
  ``None``. A driver keeps it with the value. An entry whose ``expires_at <= time.time()`` is
  *absent*: :meth:`scan` must not list it, and a conditional write treats it as missing.
  (:meth:`get` may still return it; the core checks ``expires_at`` on every record.)
  Writing without ``expires_at`` removes any previous expiry.
* **Etags** -- an opaque string that changes on every write of a key (a version counter,
  a content hash plus a version, an S3 ETag, ...). :meth:`Driver.set` returns the etag it
  wrote when it knows it (None otherwise).
* **Conditions** -- ``set(..., if_absent=True)`` writes only if the key is absent;
  ``set(..., if_match=etag)`` only if the stored etag equals ``etag``. Otherwise raise
  :class:`~kvstorage.errors.ConditionFailedError` and write nothing. Drivers that declare
  ``capabilities.conditions`` do this atomically against every other writer (other
  processes included); for drivers that do not, the core serializes conditional writes
  with an in-process lock.
* **Errors** -- raise :class:`~kvstorage.errors.DriverUnavailableError` when the backend
  cannot be reached, :class:`~kvstorage.errors.ReadOnlyError` for writes to a read-only
  store. Any other exception is wrapped by the core in
  :class:`~kvstorage.errors.DriverError`.
* **Clients** -- a driver given a ready client (``client=``) must not close it in
  :meth:`dispose`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple, Self, TypeVar

import msgspec

from ..errors import ConditionFailedError, DriverError

__all__ = [
    "Capabilities",
    "Driver",
    "EmitEvent",
    "Record",
    "Stat",
    "check_condition",
    "check_table",
    "is_expired",
    "require_asyncio",
]

_K = TypeVar("_K")

#: Keys per list of the default :meth:`Driver.scan_pages`.
SCAN_PAGE = 256

#: The callback a watching driver reports changes to: ``emit("update" | "remove", key)``.
EmitEvent = Callable[[Literal["update", "remove"], str], None]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a driver does natively; the core emulates the rest.

    Attributes:
        ttl: the backend expires entries by itself (``sweep`` is then a no-op).
        watch: :meth:`Driver.watch` reports every change, including those made through
            this storage; the core then emits no events of its own for this driver.
        max_depth: :meth:`Driver.scan` honours ``max_depth`` (otherwise the core filters).
        conditions: ``if_absent`` / ``if_match`` are atomic against other processes.
        asyncio_only: the client library runs only on asyncio (not on trio); the
            conformance suite runs every other driver on both.
        exact_watch: on top of ``watch``, every successful :meth:`Driver.set` is reported
            by exactly one event, and events come in the order the backend applied the
            writes (Redis keyspace events, PostgreSQL ``NOTIFY``); false where events may
            be merged (fs reports a batch of changes per key). A cache in front of the
            driver relies on it to tell the events of its own writes from others'.
    """

    ttl: bool = False
    watch: bool = False
    max_depth: bool = False
    conditions: bool = False
    asyncio_only: bool = False
    exact_watch: bool = False


class Record(msgspec.Struct, frozen=True, gc=False):
    """A stored value with its etag and times, as a driver returns it:
    ``Record(value, etag, mtime, expires_at)``.

    An immutable struct (``msgspec.Struct``): a third of a named tuple's cost to create,
    and untracked by the garbage collector, which matters for drivers that keep millions
    of them (memory).
    """

    value: bytes
    etag: str
    mtime: float | None = None
    """Last write, Unix seconds, or None when the backend does not know."""
    expires_at: float | None = None
    """Absolute expiry, Unix seconds, or None."""


class Stat(NamedTuple):
    """What :meth:`Driver.head` returns: a :class:`Record` without the value."""

    size: int
    etag: str
    mtime: float | None = None
    expires_at: float | None = None


class Driver(ABC):
    """Base class of every storage driver (bytes in, bytes out). See the module docstring."""

    #: Short name used in error messages (``"memory"``, ``"redis"``, ...).
    name: ClassVar[str] = "driver"
    #: What this driver does natively. May be overridden per instance.
    capabilities: Capabilities = Capabilities()
    #: Writes raise :class:`~kvstorage.errors.ReadOnlyError` (checked by the core too).
    read_only: bool = False

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Build a driver from its URL form (see :func:`kvstorage.drivers.from_url`).
        Drivers that have a URL form override this."""
        raise NotImplementedError(f"{cls.__name__} has no URL form")

    # -- the four required operations ---------------------------------------------------

    @abstractmethod
    async def get(self, key: str) -> Record | None:
        """Return the record stored at ``key``, or None when there is none."""

    def synchronous_get(self) -> Callable[[str], Record | None] | None:
        """:meth:`get` as a plain function, for a driver whose reads never wait (its data
        is in this process), or None (the default). The core then calls it instead of
        awaiting :meth:`get`, one coroutine less per read; it must do exactly what
        :meth:`get` does."""
        return None

    def synchronous_set(self) -> Callable[[str, bytes, float | None], object] | None:
        """:meth:`set` without conditions as a plain function ``(key, value, expires_at)``,
        for a driver whose writes never wait (its data is in this process), or None (the
        default). The core may call it for an unconditional write instead of awaiting
        :meth:`set`; it must do exactly what :meth:`set` does."""
        return None

    @abstractmethod
    async def set(
        self,
        key: str,
        value: bytes,
        *,
        expires_at: float | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> str | None:
        """Store ``value`` at ``key`` (see the module docstring for expiry and conditions).

        Return the etag of the value written when the backend tells it without more work
        (a read after the write would not be that etag: another writer may come between),
        or None. A caching layer keeps what it wrote only when it knows that etag."""

    @abstractmethod
    async def remove(self, key: str) -> bool:
        """Delete ``key``; return True if a live (unexpired) entry existed."""

    @abstractmethod
    def scan(self, base: str = "", *, max_depth: int | None = None) -> AsyncGenerator[str, None]:
        """Yield every live key strictly under ``base`` (``""`` = all keys), streaming.

        ``base`` matches whole segments: base ``a`` covers ``a:b`` but neither ``a`` nor
        ``ab``. Keys are yielded relative to the driver root (not to ``base``), each once,
        in any order. ``max_depth`` counts the separators of the key *below* ``base``
        (``0`` = direct children only); drivers without ``capabilities.max_depth`` may
        ignore it.
        """

    # -- operations with defaults built on the four above -------------------------------

    async def scan_pages(
        self, base: str = "", *, max_depth: int | None = None
    ) -> AsyncGenerator[list[str], None]:
        """Yield the keys :meth:`scan` yields, a list at a time (never an empty list).

        The core lists through this method, so that a key costs one step of an async
        generator, not one per layer. The default groups :meth:`scan` by
        :data:`SCAN_PAGE` keys; drivers that read keys a page at a time from their backend
        (SQL, S3) yield those pages as they come.
        """
        async with contextlib.aclosing(pages_of(self.scan(base, max_depth=max_depth))) as pages:
            async for page in pages:
                yield page

    async def scan_by_pages(
        self, base: str = "", *, max_depth: int | None = None
    ) -> AsyncGenerator[str, None]:
        """:meth:`scan` for drivers whose backend lists a page at a time and that
        implement :meth:`scan_pages` themselves: ``scan = Driver.scan_by_pages``."""
        async with contextlib.aclosing(self.scan_pages(base, max_depth=max_depth)) as pages:
            async for page in pages:
                for key in page:
                    yield key

    async def head(self, key: str) -> Stat | None:
        """Return size, etag and times without the value (default: via :meth:`get`)."""
        record = await self.get(key)
        if record is None:
            return None
        return Stat(len(record.value), record.etag, record.mtime, record.expires_at)

    async def get_many(self, keys: Sequence[str]) -> list[Record | None]:
        """Return the records for ``keys``, in order (default: one :meth:`get` each)."""
        return [await self.get(key) for key in keys]

    async def get_values(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return the stored bytes of ``keys``, in order, None for a missing or expired
        key: :meth:`get_many` without etags and times, for reads that need only the values
        (``storage.get_items``). The default takes them from :meth:`get_many`; override it
        when the backend reads less for values alone."""
        now = time.time()
        return [
            None if record is None or is_expired(record.expires_at, now) else record.value
            for record in await self.get_many(keys)
        ]

    async def set_many(
        self, items: Sequence[tuple[str, bytes]], *, expires_at: float | None = None
    ) -> None:
        """Store every ``(key, value)`` pair with the same expiry (default: one :meth:`set`
        each). Drivers that can should make the batch atomic."""
        for key, value in items:
            await self.set(key, value, expires_at=expires_at)

    async def remove_many(self, keys: Sequence[str]) -> int:
        """Delete ``keys``; return how many existed (default: one :meth:`remove` each)."""
        removed = 0
        for key in keys:
            removed += await self.remove(key)
        return removed

    async def clear(self, base: str = "") -> None:
        """Delete every key that ``scan(base)`` lists (default: scan, then remove in chunks)."""
        chunk: list[str] = []
        async for key in self.scan(base):
            chunk.append(key)
            if len(chunk) >= 1000:
                await self.remove_many(chunk)
                chunk = []
        if chunk:
            await self.remove_many(chunk)

    async def touch(self, key: str, *, expires_at: float | None) -> bool:
        """Give ``key`` a new expiry without changing its value; False if it is absent.

        The default rewrites the value with ``if_match`` so it never resurrects a key
        deleted concurrently.
        """
        while True:
            record = await self.get(key)
            if record is None or is_expired(record.expires_at):
                return False
            try:
                await self.set(key, record.value, expires_at=expires_at, if_match=record.etag)
            except ConditionFailedError:
                continue
            return True

    async def sweep(self, base: str = "") -> int:
        """Delete expired entries under ``base``; return how many. Drivers that store the
        expiry themselves (``capabilities.ttl`` false) must implement it; the default does
        nothing, which is right for backends that expire natively."""
        return 0

    async def watch(self, emit: EmitEvent) -> Callable[[], Awaitable[None]]:
        """Start reporting changes to ``emit`` with driver-relative keys; return an async
        function that stops it. Only called when ``capabilities.watch`` is true."""
        raise NotImplementedError(f"{self.name} driver does not watch")

    async def dispose(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections, files and background tasks. Idempotent."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


def require_asyncio(driver_name: str) -> None:
    """Raise a clear :class:`DriverError` when called outside asyncio (for drivers whose
    client library runs only on asyncio). Call it where the driver first connects."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise DriverError(
            f"the {driver_name} driver runs only on asyncio, not on {_running_library()}",
            driver=driver_name,
        ) from None


def _running_library() -> str:
    trio = sys.modules.get("trio")  # never imported here: only asked if already in use
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass
        else:
            return "trio"
    return "no event loop"


async def pages_of(
    items: AsyncIterator[_K], size: int = SCAN_PAGE
) -> AsyncGenerator[list[_K], None]:
    """The items of ``items`` in lists of ``size`` (never an empty one). ``items`` is
    closed (if it has ``aclose``, as async generators do) when done or closed early."""
    page: list[_K] = []
    try:
        async for item in items:
            page.append(item)
            if len(page) >= size:
                yield page
                page = []
    finally:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()
    if page:
        yield page


def is_expired(expires_at: float | None, now: float | None = None) -> bool:
    """True when an entry with this ``expires_at`` is expired at ``now`` (default: now)."""
    return expires_at is not None and expires_at <= (time.time() if now is None else now)


def check_condition(key: str, etag: str | None, *, if_absent: bool, if_match: str | None) -> None:
    """Raise :class:`~kvstorage.errors.ConditionFailedError` unless a write with
    ``if_absent`` / ``if_match`` may go ahead over the live entry whose etag is ``etag``
    (None: absent or expired). For drivers that check conditions in Python under a lock."""
    if if_absent and etag is not None:
        raise ConditionFailedError(f"key {key!r} already exists")
    if if_match is not None and etag != if_match:
        raise ConditionFailedError(f"etag of {key!r} does not match")


def check_table(
    driver: str, table: str, where: str, *, version: int | None, supported: int, exists: bool
) -> bool:
    """For SQL drivers that record each table's layout version in ``kvstorage_schema``:
    given the ``version`` recorded for ``table`` (None: no record) and whether a table of
    that name ``exists``, return True when it is ours and ready, False when it is to be
    created. Raise :class:`~kvstorage.errors.DriverError` for a newer layout than
    ``supported`` or a table kvstorage did not create. ``where`` names the database."""
    if version is not None:
        if version > supported:
            raise DriverError(
                f"table {table!r} in {where} has schema version {version}; this kvstorage "
                f"reads up to version {supported} (upgrade kvstorage)",
                driver=driver,
            )
        return True  # migrations from older versions go here
    if exists:
        raise DriverError(
            f"{where} already has a table or index named {table!r} that kvstorage did not "
            "create; choose another table name",
            driver=driver,
        )
    return False
