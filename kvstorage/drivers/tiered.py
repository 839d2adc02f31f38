"""TieredDriver: a near cache in this process's memory in front of a far driver.

Reads are served from ``near`` when it holds the key; writes go to ``far`` first, then to
``near``. Whatever the reader sees -- value, etag, mtime, expiry -- is ``far``'s record,
kept as it is, so etags, conditions and TTL are ``far``'s.

How ``near`` stays right when other processes write
---------------------------------------------------
* ``far`` watches (Redis keyspace notifications, PostgreSQL ``NOTIFY``, fs inotify): one
  watch is started on first use, and every change it reports drops the key from
  ``near``, so a write elsewhere is invisible here for no longer than its event takes to
  arrive. When the events are exact (``capabilities.exact_watch``: one per write, in
  order), the events of this driver's own writes are recognized by counting and keep
  ``near`` as it is; otherwise they drop the key too (one more read from ``far``).
* ``far`` cannot watch (memory, SQLite, S3, a Redis cluster): a ``near`` entry is served
  for at most ``max_stale`` seconds after it was read from or written to ``far``.

Races between reads, writes and events are settled per key: a read or write fills
``near`` only when no event and no other write touched the key while it was on its way;
otherwise ``near`` is left without the key and the next read goes to ``far``. A failed
write, or a ``far`` that becomes unreachable (events may have been lost), leaves ``near``
without the key (respectively empty).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Literal, TypeVar

import anyio

from ..errors import DriverError, DriverUnavailableError
from ..keys import base_covers
from .base import Driver, EmitEvent, Record, Stat
from .memory import MemoryDriver

__all__ = ["TieredDriver"]

logger = logging.getLogger("kvstorage")
_T = TypeVar("_T")

#: Seconds within which the event of one of our own writes is expected (exact watch). A
#: later one counts as another writer's (which only costs a read from far).
ECHO_WAIT = 10.0


class _Flight:
    """The operations on one key that are on their way to ``far``."""

    __slots__ = ("changes", "ops", "writes")

    def __init__(self) -> None:
        self.ops = 0  # reads and writes in flight
        self.writes = 0  # writes in flight
        self.changes = 0  # bumped by every event, write start and write end


class TieredDriver(Driver):
    """A :class:`~kvstorage.drivers.MemoryDriver` (``near``) in front of another driver
    (``far``): reads of keys held in ``near`` cost no round trip.

    Args:
        near: the in-process cache; its ``max_entries`` bounds it (least recently used
            keys go first). Default ``MemoryDriver(max_entries=10_000)``.
        far: the driver that holds the data: its etags, conditions, TTL, listing and
            watching are what this driver reports.
        max_stale: when ``far`` cannot watch, the longest (seconds) a ``near`` entry is
            served without asking ``far`` again -- the most another process's write can
            stay unseen here. Unused when ``far`` watches.

    Runs wherever ``far`` runs (asyncio, trio). See the module docstring for how ``near``
    follows writes made elsewhere.
    """

    name = "tiered"

    def __init__(
        self,
        *,
        far: Driver,
        near: MemoryDriver | None = None,
        max_stale: float = 5.0,
    ) -> None:
        if not isinstance(far, Driver):
            raise TypeError(f"far must be a Driver, not {type(far).__name__}")
        if near is None:
            near = MemoryDriver(max_entries=10_000)
        if not isinstance(near, MemoryDriver):
            raise TypeError(f"near must be a MemoryDriver, not {type(near).__name__}")
        if near is far:
            raise ValueError("near and far must be different drivers")
        if (
            isinstance(max_stale, bool)
            or not isinstance(max_stale, int | float)
            or not math.isfinite(max_stale)
            or max_stale <= 0
        ):
            raise ValueError(f"max_stale must be a finite number of seconds > 0, got {max_stale!r}")
        #: The driver that holds the data.
        self.far = far
        self.capabilities = far.capabilities
        self.read_only = far.read_only
        #: The in-process cache in front of it.
        self.near = near
        self.max_stale = float(max_stale)
        self._peek = near.peek
        self._flights: dict[str, _Flight] = {}
        self._pending: dict[str, list[float]] = {}  # key -> [own events expected, until]
        self._subscribers: list[EmitEvent] = []
        self._stop_far: Callable[[], Awaitable[None]] | None = None
        self._start_lock = anyio.Lock()
        self._started = False
        self._exact = False
        # Without watching: key -> monotonic deadline of its near entry (insertion order
        # = order of reads from far; bounded like near).
        self._fresh: dict[str, float] | None = None if far.capabilities.watch else {}
        self._bind_get()

    def __repr__(self) -> str:
        return f"TieredDriver(near={self.near!r}, far={self.far!r}, max_stale={self.max_stale})"

    # -- watching far -----------------------------------------------------------------

    async def _start(self) -> None:
        """Start watching ``far`` (once, before anything enters ``near``)."""
        async with self._start_lock:
            if self._started:
                return
            if self._fresh is None:
                try:
                    self._stop_far = await self.far.watch(self._on_event)
                except DriverUnavailableError:
                    raise
                except (DriverError, NotImplementedError) as exc:
                    logger.warning(
                        "%r cannot watch its far driver (%s); near entries are served for at "
                        "most max_stale=%s s",
                        self,
                        exc,
                        self.max_stale,
                    )
                    self._fresh = {}
                    self.capabilities = replace(self.capabilities, watch=False, exact_watch=False)
                    self._bind_get()
                else:
                    self._exact = self.far.capabilities.exact_watch
            self._started = True

    def _on_event(self, event: Literal["update", "remove"], key: str) -> None:
        # Our own sets are reported as updates: a removal (or expiry) is never ours to skip.
        pending = self._pending.get(key) if event == "update" else None
        if pending is not None:  # only with an exact watch
            if time.monotonic() <= pending[1]:
                if pending[0] <= 1:
                    del self._pending[key]
                else:
                    pending[0] -= 1
            else:  # that echo is overdue: count it lost
                del self._pending[key]
                self._invalidate(key)
        else:
            self._invalidate(key)
        for emit in list(self._subscribers):
            emit(event, key)

    def _expect_echo(self, key: str) -> None:
        pending = self._pending.get(key)
        until = time.monotonic() + ECHO_WAIT
        if pending is None:
            if len(self._pending) >= 10_000:
                self._prune_pending()
            self._pending[key] = [1, until]
        else:
            pending[0] += 1
            pending[1] = until

    def _unexpect_echo(self, key: str) -> None:
        pending = self._pending.get(key)
        if pending is not None:
            if pending[0] <= 1:
                del self._pending[key]
            else:
                pending[0] -= 1

    def _prune_pending(self) -> None:
        now = time.monotonic()
        for key in [key for key, (_, until) in self._pending.items() if until < now]:
            del self._pending[key]

    # -- near bookkeeping -------------------------------------------------------------

    def _invalidate(self, key: str) -> None:
        self.near.discard(key)
        flight = self._flights.get(key)
        if flight is not None:
            flight.changes += 1

    def _begin(self, key: str, *, writing: bool = False) -> _Flight:
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight()
        flight.ops += 1
        if writing:
            flight.writes += 1
            flight.changes += 1
            self.near.discard(key)
        return flight

    def _end(self, key: str, flight: _Flight, *, writing: bool = False) -> None:
        flight.ops -= 1
        if writing:
            flight.writes -= 1
            flight.changes += 1
        if flight.ops == 0 and self._flights.get(key) is flight:
            del self._flights[key]

    def _keep(self, key: str, record: Record) -> None:
        self.near.put(key, record)
        fresh = self._fresh
        if fresh is not None:
            fresh.pop(key, None)
            fresh[key] = time.monotonic() + self.max_stale
            bound = self.near.max_entries
            if bound is not None and len(fresh) > bound:
                del fresh[next(iter(fresh))]

    def _hit(self, key: str) -> Record | None:
        record = self._peek(key)
        if record is None or self._fresh is None:
            return record
        deadline = self._fresh.get(key)
        return record if deadline is not None and deadline > time.monotonic() else None

    # -- reading ----------------------------------------------------------------------

    async def get(self, key: str) -> Record | None:
        record = self._peek(key)
        if record is not None:
            fresh = self._fresh
            if fresh is None or fresh.get(key, 0.0) > time.monotonic():
                return record
        return await self._load(key)

    def _bind_get(self) -> None:
        """While far watches, a hit is a dict lookup (plus an LRU move): ``get`` on this
        instance is then a closure over near's dict, one Python call less per read --
        the hot path of a cache. Entries with an expiry take the full path."""
        vars(self).pop("get", None)
        if self._fresh is not None:
            return
        records = self.near._data
        load = self._load
        lru = self.near._lru
        if lru is None:

            async def get(key: str) -> Record | None:
                record = records.get(key)
                if record is not None and record.expires_at is None:
                    return record
                return self._peek(key) or await load(key)

        else:
            used = lru.move_to_end

            async def get(key: str) -> Record | None:
                record = records.get(key)
                if record is not None and record.expires_at is None:
                    used(key)
                    return record
                return self._peek(key) or await load(key)

        vars(self)["get"] = get

    async def _load(self, key: str) -> Record | None:
        if not self._started:
            await self._start()
        flight = self._begin(key)
        seen = flight.changes
        try:
            record = await self.far.get(key)
        except DriverUnavailableError:
            self._end(key, flight)
            await self._lost_far()
            raise
        except BaseException:
            self._end(key, flight)
            raise
        if record is not None and flight.changes == seen:
            self._keep(key, record)
        self._end(key, flight)
        return record

    async def head(self, key: str) -> Stat | None:
        record = self._hit(key)
        if record is not None:
            return Stat(len(record.value), record.etag, record.mtime, record.expires_at)
        return await self.far.head(key)

    async def get_many(self, keys: Sequence[str]) -> list[Record | None]:
        records = [self._hit(key) for key in keys]
        missing = [index for index, record in enumerate(records) if record is None]
        if not missing:
            return records
        if not self._started:
            await self._start()
        asked = [keys[index] for index in missing]
        flights = [self._begin(key) for key in asked]
        seen = [flight.changes for flight in flights]
        try:
            loaded = await self.far.get_many(asked)
        except BaseException as exc:
            for key, flight in zip(asked, flights, strict=True):
                self._end(key, flight)
            if isinstance(exc, DriverUnavailableError):
                await self._lost_far()
            raise
        for index, key, flight, before, record in zip(
            missing, asked, flights, seen, loaded, strict=True
        ):
            records[index] = record
            if record is not None and flight.changes == before:
                self._keep(key, record)
            self._end(key, flight)
        return records

    def scan(self, base: str = "", *, max_depth: int | None = None) -> AsyncGenerator[str, None]:
        return self.far.scan(base, max_depth=max_depth)

    def scan_pages(
        self, base: str = "", *, max_depth: int | None = None
    ) -> AsyncGenerator[list[str], None]:
        return self.far.scan_pages(base, max_depth=max_depth)

    # -- writing ----------------------------------------------------------------------

    async def set(
        self,
        key: str,
        value: bytes,
        *,
        expires_at: float | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> str | None:
        if not self._started:
            await self._start()
        flight = self._begin(key, writing=True)
        seen = flight.changes
        alone = flight.writes == 1
        exact = self._exact
        if exact:
            self._expect_echo(key)
        mtime = time.time()
        try:
            etag = await self.far.set(
                key, value, expires_at=expires_at, if_absent=if_absent, if_match=if_match
            )
        except BaseException as exc:
            self._end(key, flight, writing=True)
            if exact:
                self._unexpect_echo(key)
            self._invalidate(key)
            if isinstance(exc, DriverUnavailableError):
                await self._lost_far()
            raise
        keep = etag is not None and alone and flight.changes == seen
        self._end(key, flight, writing=True)
        if keep:
            assert etag is not None
            self._keep(key, Record(value, etag, mtime, expires_at))
        if exact:
            pending = self._pending.get(key)
            if pending is not None:  # the echo is due within ECHO_WAIT of now
                pending[1] = time.monotonic() + ECHO_WAIT
        return etag

    async def set_many(
        self, items: Sequence[tuple[str, bytes]], *, expires_at: float | None = None
    ) -> None:
        # Not kept in near: the batch does not tell its etags. Their events (or, without
        # watching, nothing) follow; reads go to far until then.
        await self._writing(
            [key for key, _ in items], self.far.set_many(items, expires_at=expires_at)
        )

    async def remove(self, key: str) -> bool:
        return await self._writing([key], self.far.remove(key))

    async def remove_many(self, keys: Sequence[str]) -> int:
        return await self._writing(keys, self.far.remove_many(keys))

    async def touch(self, key: str, *, expires_at: float | None) -> bool:
        return await self._writing([key], self.far.touch(key, expires_at=expires_at))

    async def _writing(self, keys: Sequence[str], write: Awaitable[_T]) -> _T:
        """Run ``write`` (on far) with ``keys`` out of near until it is done."""
        flights = [(key, self._begin(key, writing=True)) for key in keys]
        try:
            return await write
        except DriverUnavailableError:
            await self._lost_far()
            raise
        finally:
            for key, flight in flights:
                self._end(key, flight, writing=True)
                self.near.discard(key)

    async def clear(self, base: str = "") -> None:
        for key, flight in self._flights.items():
            if base_covers(base, key):
                flight.changes += 1
        try:
            await self.far.clear(base)
        finally:
            for key, flight in self._flights.items():
                if base_covers(base, key):
                    flight.changes += 1
            await self.near.clear(base)

    async def sweep(self, base: str = "") -> int:
        await self.near.sweep(base)
        return await self.far.sweep(base)

    async def _lost_far(self) -> None:
        """Far was unreachable: events may have been lost meanwhile, so near starts over."""
        for flight in self._flights.values():
            flight.changes += 1
        await self.near.clear()
        if self._fresh is not None:
            self._fresh.clear()

    # -- watching and lifecycle ---------------------------------------------------------

    async def watch(self, emit: EmitEvent) -> Callable[[], Awaitable[None]]:
        """Report far's changes (after dropping them from near); only when far watches."""
        if not self._started:
            await self._start()
        if self._stop_far is None:
            raise DriverError(f"{self!r} cannot watch: its far driver does not", driver=self.name)
        self._subscribers.append(emit)

        async def stop() -> None:
            if emit in self._subscribers:
                self._subscribers.remove(emit)

        return stop

    async def dispose(self) -> None:
        stop, self._stop_far = self._stop_far, None
        self._subscribers.clear()
        self._started = False
        self._pending.clear()
        if stop is not None:
            await stop()
        await self.near.dispose()
        if self._fresh is not None:
            self._fresh.clear()
        await self.far.dispose()
