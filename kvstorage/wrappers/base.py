"""The two base classes of the wrappers: :class:`WrapperDriver` forwards every operation to
the driver inside it; :class:`TransformingDriver` also changes the stored bytes on the way
in and out (encryption, compression).

A wrapper is a driver, so it mounts anywhere and stacks. It keeps what the inner driver
guarantees because it never re-implements it: expiry, etags, conditions, batches, listing,
sweeping and watching are the inner driver's own, and so are its ``capabilities`` and
``read_only``. Keys reach the inner driver unchanged.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence

from ..drivers.base import Driver, EmitEvent, Record, Stat

__all__ = ["FORWARDED", "TransformingDriver", "WrapperDriver"]

#: Every operation of the driver interface, which :class:`WrapperDriver` forwards.
FORWARDED = (
    "get", "set", "remove", "scan", "head", "get_many", "set_many", "remove_many", "clear",
    "touch", "sweep", "watch", "dispose",
)  # fmt: skip


class WrapperDriver(Driver):
    """A driver around ``inner`` that forwards every operation to it unchanged.

    Subclasses override the operations they change. The others cost nothing: on each
    instance they are the inner driver's own bound methods (so ``inner`` must not be
    replaced after construction).
    """

    name = "wrapper"

    def __init__(self, inner: Driver) -> None:
        if not isinstance(inner, Driver):
            raise TypeError(f"inner must be a Driver, not {type(inner).__name__}")
        #: The wrapped driver.
        self.inner = inner
        self.capabilities = inner.capabilities
        self.read_only = inner.read_only
        self.forward(name for name in FORWARDED if _not_overridden(type(self), name))
        if _not_overridden(type(self), "scan") and _not_overridden(type(self), "scan_pages"):
            # Listing is then the inner driver's own, a page at a time (the core lists
            # through scan_pages; the default would page the forwarded scan key by key).
            self.forward(["scan_pages"])

    def forward(self, names: Iterable[str]) -> None:
        """Make the operations ``names`` on this instance the inner driver's own bound
        methods, skipping this wrapper entirely."""
        for name in names:
            vars(self)[name] = getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    async def get(self, key: str) -> Record | None:
        return await self.inner.get(key)

    async def set(
        self,
        key: str,
        value: bytes,
        *,
        expires_at: float | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> str | None:
        return await self.inner.set(
            key, value, expires_at=expires_at, if_absent=if_absent, if_match=if_match
        )

    async def remove(self, key: str) -> bool:
        return await self.inner.remove(key)

    def scan(self, base: str = "", *, max_depth: int | None = None) -> AsyncGenerator[str, None]:
        return self.inner.scan(base, max_depth=max_depth)

    async def head(self, key: str) -> Stat | None:
        return await self.inner.head(key)

    async def get_many(self, keys: Sequence[str]) -> list[Record | None]:
        return await self.inner.get_many(keys)

    async def set_many(
        self, items: Sequence[tuple[str, bytes]], *, expires_at: float | None = None
    ) -> None:
        await self.inner.set_many(items, expires_at=expires_at)

    async def remove_many(self, keys: Sequence[str]) -> int:
        return await self.inner.remove_many(keys)

    async def clear(self, base: str = "") -> None:
        await self.inner.clear(base)

    async def touch(self, key: str, *, expires_at: float | None) -> bool:
        return await self.inner.touch(key, expires_at=expires_at)

    async def sweep(self, base: str = "") -> int:
        return await self.inner.sweep(base)

    async def watch(self, emit: EmitEvent) -> Callable[[], Awaitable[None]]:
        return await self.inner.watch(emit)

    async def dispose(self) -> None:
        await self.inner.dispose()


def _not_overridden(cls: type[WrapperDriver], name: str) -> bool:
    return getattr(cls, name) is getattr(WrapperDriver, name)


class TransformingDriver(WrapperDriver):
    """A wrapper that stores ``encode(key, value)`` and reads back ``decode(key, stored)``.

    Everything else (etags, expiry, conditions, listing, ``touch``) is the inner driver's,
    applied to the stored bytes. Sizes reported by :meth:`head` are those of the decoded
    value, so by default it reads the value; subclasses that can tell the size from the
    stored size override it.
    """

    @abstractmethod
    def encode(self, key: str, value: bytes) -> bytes:
        """The bytes to store at ``key`` for ``value``."""

    @abstractmethod
    def decode(self, key: str, stored: bytes) -> bytes:
        """The value that ``stored``, read at ``key``, holds. Raises
        :class:`~kvstorage.errors.DriverError` when ``stored`` cannot be decoded."""

    async def get(self, key: str) -> Record | None:
        record = await self.inner.get(key)
        if record is None:
            return None
        return self._decoded(key, record)

    async def get_many(self, keys: Sequence[str]) -> list[Record | None]:
        records = await self.inner.get_many(keys)
        decoded = self._decoded
        return [None if r is None else decoded(k, r) for k, r in zip(keys, records, strict=True)]

    def _decoded(self, key: str, record: Record) -> Record:
        value = self.decode(key, record.value)
        if value is record.value:  # stored as it is
            return record
        return Record(value, record.etag, record.mtime, record.expires_at)

    async def set(
        self,
        key: str,
        value: bytes,
        *,
        expires_at: float | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> str | None:
        return await self.inner.set(
            key,
            self.encode(key, value),
            expires_at=expires_at,
            if_absent=if_absent,
            if_match=if_match,
        )

    async def set_many(
        self, items: Sequence[tuple[str, bytes]], *, expires_at: float | None = None
    ) -> None:
        encode = self.encode
        await self.inner.set_many([(k, encode(k, v)) for k, v in items], expires_at=expires_at)

    head = Driver.head  # the decoded size needs the value
