"""Mount routing: which driver holds a key, and which drivers hold the keys under a base.

Pure and synchronous (no I/O, no event loop), so the rules are unit-tested without a
driver. Keys and bases here are *full* keys: normalized, with any ``prefix_storage`` base
already joined on. The rules:

* the mount with the longest base that covers a key holds it (the root mount, base ``""``,
  covers every key);
* a listing under a base asks the mount holding the base, plus every mount nested under
  the base; each of those hides (*masks*) the keys of the mounts nested inside it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import anyio

from .drivers.base import Driver, Record
from .keys import MAX_KEY_BYTES, base_covers, depth_below
from .serializers import Serializer, fast_loads

__all__ = ["LOCATED_CACHE_SIZE", "Group", "Mount", "MountPoint", "MountTable", "Slice"]

LOCATED_CACHE_SIZE = 16384


@dataclass(frozen=True, slots=True)
class Mount:
    """A driver mounted at ``base`` (``""`` is the root), as :meth:`Storage.get_mount`
    reports it."""

    base: str
    driver: Driver
    serializer: Serializer


@dataclass(eq=False, slots=True)
class MountPoint:
    """A mount with the state the storage keeps for it (its public face is :class:`Mount`)."""

    base: str
    prefix: str  # base + ":" ("" for the root): what full keys of this mount start with
    driver: Driver
    serializer: Serializer
    stop_watch: Callable[[], Awaitable[None]] | None = None
    lock: anyio.Lock | None = None  # for conditions on drivers that cannot do them
    loads: Callable[[bytes], Any] = field(init=False)
    """:func:`~kvstorage.serializers.fast_loads` of the serializer."""
    get_now: Callable[[str], Record | None] | None = field(init=False)
    """The driver's :meth:`~kvstorage.drivers.Driver.synchronous_get`."""
    set_now: Callable[[str, bytes, float | None], object] | None = field(init=False)
    """The driver's :meth:`~kvstorage.drivers.Driver.synchronous_set` (None when the driver
    is read-only)."""

    def __post_init__(self) -> None:
        self.loads = fast_loads(self.serializer)
        self.get_now = self.driver.synchronous_get()
        self.set_now = None if self.driver.read_only else self.driver.synchronous_set()

    @property
    def emits(self) -> bool:
        """True when the core must report this mount's writes (no native watch running)."""
        return self.stop_watch is None

    def public(self) -> Mount:
        """This mount as :class:`Mount`."""
        return Mount(self.base, self.driver, self.serializer)


class Slice(NamedTuple):
    """The part of a listing under some base that one mount answers for."""

    mount: MountPoint
    driver_base: str
    """The base to scan, relative to the driver."""
    masked: tuple[str, ...]
    """Driver-relative key prefixes hidden by mounts nested inside this one."""
    depth_offset: int
    """Separators between the listed base and this mount's keys (0 unless the mount is
    nested below the base)."""

    def shows(self, rel: str) -> bool:
        """True unless the driver key ``rel`` is hidden by a nested mount."""
        return not (self.masked and rel.startswith(self.masked))


class Group(NamedTuple):
    """The keys of one batch that go to one mount, in input order."""

    keys: list[str]
    """As the caller gave them (normalized, relative to the view)."""
    driver_keys: list[str]
    """The same keys relative to the mount's driver."""


class MountTable:
    """The mounts of one storage, routed by longest base."""

    __slots__ = ("_by_base", "located", "routes")

    def __init__(self) -> None:
        self._by_base: dict[str, MountPoint] = {}
        self.routes: list[MountPoint] = []
        """Every mount, longest base first (the root last)."""
        self.located: dict[str, tuple[str, MountPoint, str]] = {}
        """Recent :meth:`locate_key` results by full key, so that a hot key costs one dict
        lookup (emptied whenever the mounts change, and when it holds
        :data:`LOCATED_CACHE_SIZE` keys)."""

    def __contains__(self, base: str) -> bool:
        return base in self._by_base

    def get(self, base: str) -> MountPoint | None:
        """The mount at exactly ``base``, or None."""
        return self._by_base.get(base)

    def add(self, mount: MountPoint) -> None:
        """Add ``mount``; its base must not be mounted yet."""
        self.located.clear()
        self._by_base[mount.base] = mount
        self.routes = sorted(self._by_base.values(), key=lambda m: len(m.base), reverse=True)

    def remove(self, base: str) -> MountPoint:
        """Take out and return the mount at ``base`` (KeyError if there is none)."""
        mount = self._by_base.pop(base)
        self.located.clear()
        self.routes = [m for m in self.routes if m is not mount]
        return mount

    def route(self, path: str) -> MountPoint:
        """The mount whose prefix ``path`` starts with, longest first (the root matches
        everything)."""
        for mount in self.routes:
            if path.startswith(mount.prefix):
                return mount
        raise AssertionError("the root mount always matches")  # pragma: no cover

    def locate(self, key: str) -> tuple[MountPoint, str]:
        """The mount holding the full key ``key`` and the key relative to its driver."""
        routes = self.routes
        if len(routes) == 1:  # no mounts: the root takes every key as it is
            return routes[0], key
        mount = self.route(key)
        return mount, key[len(mount.prefix) :]

    def locate_key(self, key: str) -> tuple[str, MountPoint, str]:
        """``(key, mount, driver key)`` for the full key ``key``, remembered in
        :attr:`located`. Entries are normal keys, so a lookup there by the key as a caller
        wrote it hits only when that was normal already."""
        routes = self.routes
        mount = routes[0] if len(routes) == 1 else self.route(key)
        located = (key, mount, key[len(mount.prefix) :])
        # A view checks only its own part of a key: a full key over the limit is never
        # remembered, or the storage itself would find it here unchecked.
        if len(key) <= MAX_KEY_BYTES // 4 or len(key.encode()) <= MAX_KEY_BYTES:
            cache = self.located
            if len(cache) >= LOCATED_CACHE_SIZE:
                cache.clear()
            cache[key] = located
        return located

    def mount_for_base(self, base: str) -> MountPoint:
        """The mount responsible for the keys under ``base``."""
        return self.route(base + ":")

    def slices(self, base: str) -> list[Slice]:
        """What to scan for the keys under the full base ``base``: the mount holding the
        base first, then every mount nested under it (shortest base first)."""
        first = self.mount_for_base(base)
        parts = [(first, base[len(first.prefix) :], 0)]
        for mount in reversed(self.routes):
            if mount.base and mount is not first and base_covers(base, mount.base):
                parts.append((mount, "", depth_below(base, mount.base) + 1))
        return [
            Slice(mount, driver_base, self._masked(mount, driver_base), offset)
            for mount, driver_base, offset in parts
        ]

    def _masked(self, mount: MountPoint, driver_base: str) -> tuple[str, ...]:
        return tuple(
            other.prefix[len(mount.prefix) :]
            for other in self.routes
            if other is not mount
            and base_covers(mount.base, other.base)
            and base_covers(driver_base, other.base[len(mount.prefix) :])
        )

    def group(self, keys: Iterable[str], view_prefix: str) -> dict[MountPoint, Group]:
        """Route every key of a batch once: ``{mount: Group}``, in input order within each
        mount. ``keys`` are normalized and relative to the view whose prefix is given."""
        routes = self.routes
        if len(routes) == 1:  # no mounts: one group, no routing
            keys = list(keys)
            driver_keys = [view_prefix + key for key in keys] if view_prefix else keys
            return {routes[0]: Group(keys, driver_keys)}
        groups: dict[MountPoint, Group] = {}
        for key in keys:
            mount, rel = self.locate(view_prefix + key)
            group = groups.get(mount)
            if group is None:
                group = groups[mount] = Group([], [])
            group.keys.append(key)
            group.driver_keys.append(rel)
        return groups
