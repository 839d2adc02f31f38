"""Caching on top of a storage: :func:`cached`, a read-through decorator that computes a
missing value once however many callers and processes miss it together, and
:class:`TieredDriver`, a memory cache in this process in front of any driver.

>>> from kvstorage import create_storage
>>> from kvstorage.cache import cached
>>> storage = create_storage()
>>> @cached(storage, ttl=60)
... async def load_profile(user_id: int) -> dict: ...

How ``cached`` keeps to one call
--------------------------------
* In one process, concurrent callers of a missing key wait for the first one's call
  (single flight) and each gets its own copy of the result.
* Across processes, that first caller writes a lock item next to the value
  (``<key>:~lock``) with ``if_absent`` and ``lock_ttl``: the storage's conditional write
  is the lock, atomic on every driver, across processes on every driver that is shared
  (Redis, PostgreSQL, SQLite, fs, S3). The others poll for the value (every few
  milliseconds, up to 50 ms apart) until it is there, or the lock is gone (its holder
  failed: one of them takes it) or has expired (``lock_ttl``: its holder died).
* With ``stale_ttl``, a value that is past ``ttl`` is still served, at once, for
  ``stale_ttl`` more seconds, while one caller (one per process, and one across
  processes through the lock) computes the new one in the background.

Exceptions are never cached: they reach the callers waiting on that call, and the next
call tries again.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import json
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from datetime import date, datetime, timedelta
from datetime import time as time_of_day
from decimal import Decimal
from enum import Enum
from typing import Any, Generic, ParamSpec, TypeVar

import anyio

from .drivers.tiered import TieredDriver
from .errors import ConditionFailedError
from .keys import normalize_key
from .serializers import Serializer
from .storage import TTL, Storage, ttl_seconds

__all__ = ["Cached", "TieredDriver", "cached"]

logger = logging.getLogger("kvstorage")

P = ParamSpec("P")
R = TypeVar("R")

#: Key parts longer than this are replaced by their SHA-256 (keys stay far below the
#: 1024-byte limit).
MAX_ARGUMENTS = 200
LOCK_SUFFIX = ":~lock"
_POLL_FIRST, _POLL_MAX = 0.002, 0.05
_ESCAPES = str.maketrans({"%": "%25", ":": "%3A", "/": "%2F", "\\": "%5C"})
_background: set[asyncio.Task[None]] = set()


def _canonical(value: Any) -> str:
    """One text per distinct argument value, whatever its nesting: JSON for JSON scalars
    (so ``1``, ``1.0``, ``True`` and ``"1"`` differ), brackets that tell lists from
    tuples, sorted dicts and sets (equal ones give one text), and a tag for the types the
    ``tagged`` serializer knows. Other types raise ``TypeError``."""
    if isinstance(value, Enum):
        enum = type(value)
        return f"enum({enum.__module__}.{enum.__qualname__}.{value.name})"
    if value is None or isinstance(value, bool | str):
        return json.dumps(value)
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, list | tuple):
        inner = ",".join(map(_canonical, value))
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, dict):
        pairs = sorted(f"{_canonical(k)}:{_canonical(v)}" for k, v in value.items())
        return "{" + ",".join(pairs) + "}"
    if isinstance(value, set | frozenset):
        name = "set" if isinstance(value, set) else "frozenset"
        return name + "{" + ",".join(sorted(map(_canonical, value))) + "}"
    if isinstance(value, bytes | bytearray):
        return f"bytes({bytes(value).hex()})"
    if isinstance(value, datetime | date | time_of_day):  # a datetime is a date too
        return f"{type(value).__name__}({value.isoformat()})"
    if isinstance(value, timedelta):
        return f"timedelta({value.days},{value.seconds},{value.microseconds})"
    if isinstance(value, Decimal):
        return f"decimal({value})"
    if isinstance(value, uuid.UUID):
        return f"uuid({value.hex})"
    raise TypeError(
        f"cannot make a cache key from a {type(value).__name__} argument; "
        "pass key= to cached() to build the key yourself"
    )


def _spawn(job: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``job`` in the background of the running event loop (asyncio or trio)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: anyio's other backend
        import trio

        trio.lowlevel.spawn_system_task(job)
        return
    task = loop.create_task(job())
    _background.add(task)
    task.add_done_callback(_background.discard)


class _Flight:
    """A call of the function on its way in this process, and what it produced."""

    __slots__ = ("data", "done", "error", "invalidated")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.data: bytes | None = None  # the stored envelope
        self.error: Exception | None = None
        self.invalidated = False


class Cached(Generic[P, R]):
    """A coroutine function whose results are kept in a storage (made by :func:`cached`).

    Call it as the function it wraps. Results come back as the storage's serializer reads
    them (JSON by default: a tuple comes back as a list, on the first call too).
    """

    def __init__(
        self,
        fn: Callable[P, Awaitable[R]],
        storage: Storage,
        *,
        ttl: TTL | None,
        key: str | Callable[..., str] | None,
        stale_ttl: TTL | None,
        lock_ttl: TTL,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"cached() decorates a coroutine function, not {fn!r:.60}")
        if not isinstance(storage, Storage):
            raise TypeError(f"storage must be a Storage, not {type(storage).__name__}")
        self._fn = fn
        self._storage = storage
        self._ttl = None if ttl is None else ttl_seconds(ttl)
        self._stale = None if stale_ttl is None else ttl_seconds(stale_ttl, "stale_ttl")
        if self._stale is not None and self._ttl is None:
            raise ValueError("stale_ttl needs a ttl (a value without ttl never goes stale)")
        self._lock_ttl = ttl_seconds(lock_ttl, "lock_ttl")
        self._stored_ttl = None if self._ttl is None else self._ttl + (self._stale or 0.0)
        if key is None:
            key = f"cached:{fn.__module__}.{getattr(fn, '__qualname__', repr(fn))}"
        if isinstance(key, str):
            self._prefix: str | None = normalize_key(key)
            self._key_function: Callable[..., str] | None = None
        elif callable(key):
            self._prefix, self._key_function = None, key
        else:
            raise TypeError(f"key must be a string, a function or None, not {type(key).__name__}")
        self._signature = inspect.signature(fn)
        parameters = self._signature.parameters.values()
        plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self._positional = (
            len(self._signature.parameters)
            if all(parameter.kind in plain for parameter in parameters)
            else -1
        )
        self._flights: dict[str, _Flight] = {}
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<cached {getattr(self._fn, '__qualname__', self._fn)!r} in {self._storage!r}>"

    # -- keys ---------------------------------------------------------------------------

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The storage key of the result for these arguments (normalized).

        By default ``cached:<module>.<function>`` (or the ``key`` string given) followed
        by one segment per parameter, in the function's order after binding the arguments
        (so ``f(1)``, ``f(x=1)`` and ``f(1, y=<default>)`` share a key); each segment is a
        canonical text of the value with ``%``, ``:``, ``/`` and ``\\`` escaped, so two
        different argument lists never share a key. Argument parts longer than
        :data:`MAX_ARGUMENTS` characters become ``#<sha256>``.
        """
        if self._key_function is not None:
            made = self._key_function(*args, **kwargs)
            if not isinstance(made, str):
                raise TypeError(f"the key function returned {type(made).__name__}, not str")
            return normalize_key(made)
        if not kwargs and len(args) == self._positional:
            values: Any = args
        else:
            bound = self._signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = bound.arguments.values()
        parts = ":".join(_canonical(value).translate(_ESCAPES) for value in values)
        if len(parts) > MAX_ARGUMENTS:
            parts = "#" + hashlib.sha256(parts.encode()).hexdigest()
        assert self._prefix is not None
        return f"{self._prefix}:{parts}" if parts else self._prefix

    # -- stored values ------------------------------------------------------------------

    def _serializer(self, key: str) -> Serializer:
        return self._storage.get_mount(key.rpartition(":")[0]).serializer

    def _decode(self, key: str, data: bytes | None) -> tuple[float | None, Any] | None:
        """(fresh until, value) from a stored envelope; None when missing or not ours."""
        if data is None:
            return None
        try:
            envelope = self._serializer(key).loads(data)
        except Exception:
            return None
        if not (isinstance(envelope, list) and len(envelope) == 2):
            return None
        fresh_until = envelope[0]
        if fresh_until is not None and not isinstance(fresh_until, int | float):
            return None
        return fresh_until, envelope[1]

    def _fresh(self, key: str, data: bytes | None) -> bool:
        entry = self._decode(key, data)
        return entry is not None and (entry[0] is None or time.time() < entry[0])

    # -- calling ------------------------------------------------------------------------

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        key = self.cache_key(*args, **kwargs)
        while True:
            entry = self._decode(key, await self._storage.get_item_raw(key))
            if entry is not None:
                fresh_until, value = entry
                now = time.time()
                if fresh_until is None or now < fresh_until:
                    return value  # type: ignore[no-any-return]
                if self._stale is not None and now < fresh_until + self._stale:
                    if key not in self._flights:
                        flight = self._flights[key] = _Flight()
                        _spawn(functools.partial(self._refresh, key, args, kwargs, flight))
                    return value  # type: ignore[no-any-return]
            current = self._flights.get(key)
            if current is None:
                current = self._flights[key] = _Flight()
                data = await self._fly(key, args, kwargs, current, wait=True)
                assert data is not None
                return self._value(key, data)
            await current.done.wait()
            if current.data is not None:
                return self._value(key, current.data)
            if current.error is not None:
                raise current.error
            # its caller was cancelled, or a background refresh left it to another
            # process: look again

    def _value(self, key: str, data: bytes) -> R:
        entry = self._decode(key, data)
        assert entry is not None
        return entry[1]  # type: ignore[no-any-return]

    async def _refresh(self, key: str, args: Any, kwargs: Any, flight: _Flight) -> None:
        try:
            await self._fly(key, args, kwargs, flight, wait=False)
        except Exception:  # the stale value stays until stale_ttl; the next call retries
            logger.exception("refreshing a cached value of %s failed", self._name())

    def _name(self) -> str:
        return str(getattr(self._fn, "__qualname__", "a function"))

    async def _fly(
        self, key: str, args: Any, kwargs: Any, flight: _Flight, *, wait: bool
    ) -> bytes | None:
        """Run ``flight``: compute (or wait for) the value of ``key``; tell the callers
        waiting on it in this process."""
        try:
            data = await self._compute(key, args, kwargs, flight, wait=wait)
        except Exception as exc:
            flight.error = exc
            raise
        else:
            flight.data = data
            return data
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()

    async def _compute(
        self, key: str, args: Any, kwargs: Any, flight: _Flight, *, wait: bool
    ) -> bytes | None:
        """Take the lock and call the function, or wait for the process that holds it.
        Without ``wait`` (a background refresh), give up when another process holds it."""
        storage = self._storage
        lock, token = key + LOCK_SUFFIX, secrets.token_hex(16)
        delay = _POLL_FIRST
        while True:
            try:
                await storage.set_item(lock, token, ttl=self._lock_ttl, if_absent=True)
            except ConditionFailedError:
                if not wait:
                    return None
                await anyio.sleep(delay)
                delay = min(delay * 2, _POLL_MAX)
                data = await storage.get_item_raw(key)
                if self._fresh(key, data):
                    return data
                continue
            taken = time.monotonic()
            try:
                data = await storage.get_item_raw(key)
                if self._fresh(key, data):  # the previous holder stored it meanwhile
                    return data
                value = await self._fn(*args, **kwargs)
                fresh_until = None if self._ttl is None else time.time() + self._ttl
                data = self._serializer(key).dumps([fresh_until, value])
                if not flight.invalidated:
                    await storage.set_item_raw(key, data, ttl=self._stored_ttl)
                return data
            finally:
                with anyio.CancelScope(shield=True):
                    await self._release(lock, token, taken)

    async def _release(self, lock: str, token: str, taken: float) -> None:
        """Remove our lock. Well within ``lock_ttl`` it is certainly still ours; later it
        may have expired and been taken by another process, so it is checked first."""
        try:
            if (
                time.monotonic() - taken < self._lock_ttl / 2
                or await self._storage.get_item(lock) == token
            ):
                await self._storage.remove_item(lock)
        except Exception:  # it expires by itself after lock_ttl
            logger.warning("could not release the cache lock of %s", self._name(), exc_info=True)

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Remove the cached result for these arguments; True if there was one. A call
        already computing it in this process then does not store its result."""
        key = self.cache_key(*args, **kwargs)
        flight = self._flights.get(key)
        if flight is not None:
            flight.invalidated = True
        return await self._storage.remove_item(key)


def cached(
    storage: Storage,
    *,
    ttl: TTL | None,
    key: str | Callable[..., str] | None = None,
    stale_ttl: TTL | None = None,
    lock_ttl: TTL = 30,
) -> Callable[[Callable[P, Awaitable[R]]], Cached[P, R]]:
    """Keep the results of a coroutine function in ``storage``, computing each missing
    one once (see the module docstring).

    Args:
        storage: where results live (any storage or ``prefix_storage`` view; a
            ``TieredDriver`` mount makes hits local to the process).
        ttl: seconds (or ``timedelta``) a result is fresh; None keeps it until
            :meth:`Cached.invalidate`.
        key: a function of the arguments returning the storage key, or a string prefix
            for the default key (see :meth:`Cached.cache_key`); default
            ``cached:<module>.<qualified name>``.
        stale_ttl: serve a result for this much longer past ``ttl`` while one caller
            computes the new one in the background.
        lock_ttl: how long the cross-process lock lasts: a call that takes longer may run
            again elsewhere. Keep it above the function's run time.

    >>> @cached(storage, ttl=60, key=lambda user_id: f"profile:{user_id}")  # doctest: +SKIP
    ... async def load_profile(user_id): ...
    >>> await load_profile.invalidate(42)  # doctest: +SKIP
    """

    def decorate(fn: Callable[P, Awaitable[R]]) -> Cached[P, R]:
        return Cached(fn, storage, ttl=ttl, key=key, stale_ttl=stale_ttl, lock_ttl=lock_ttl)

    return decorate
