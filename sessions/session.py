"""`Session`: one request's view of a server-side session, with its pending changes.

A session never talks to the storage by itself except to load its data the first time a
value is read. Writes (`set`, `delete`, `clear`, `flash`, `regenerate`, `destroy`) are
recorded as a small change log that :meth:`SessionManager.commit` applies to the stored
version at the end of the request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from msgspec import Raw

if TYPE_CHECKING:
    from .manager import SessionManager, Stored

__all__ = ["Session"]

_DATA, _FLASH = "d", "f"


class _Deleted:
    def __repr__(self) -> str:
        return "<deleted>"


#: Marks a key deleted in the change log (and a missing key in lookups).
DELETED: Any = _Deleted()


def _check_key(key: str) -> None:
    if not isinstance(key, str):
        raise TypeError(f"session keys are strings, not {type(key).__name__}")
    if not key:
        raise ValueError("session keys must not be empty")


class Session:
    """The session of one request: ``session = request.scope["session"]``.

    Reading (:meth:`get`, :meth:`has`, :meth:`keys`, :meth:`items`, :meth:`pop_flash`)
    loads the stored data on first use -- never before, and never when the request
    carried no session cookie. Writing only records the change; the middleware (or
    :meth:`SessionManager.commit`) applies the changes at the end of the request, key by
    key, to the version stored at that time.

    Values are anything the ``tagged`` serializer round-trips (JSON values plus
    ``datetime``, ``date``, ``Decimal``, ``UUID``, ``bytes``, ``set``, ``tuple``, ...).
    Values are copied in and out: :meth:`set` serializes at once, and every read
    returns a new object, so to change a value, read it, change it and ``set`` it again.
    """

    __slots__ = (
        "_base",
        "_changes",
        "_cleared",
        "_cookie_id",
        "_destroyed",
        "_doomed",
        "_id",
        "_loaded",
        "_manager",
        "_new_id",
        "_refresh",
    )

    def __init__(self, manager: SessionManager, cookie_id: str | None = None) -> None:
        """Use :meth:`SessionManager.open` instead; ``cookie_id`` must be well-formed."""
        self._manager = manager
        self._cookie_id = cookie_id  # from the cookie; not known to exist yet
        self._id: str | None = None  # the ID whose stored data is in _base
        self._new_id: str | None = None  # chosen by regenerate(), written by commit
        self._loaded = cookie_id is None  # nothing to load without a cookie
        self._base: Stored | None = None  # the stored version read at load time
        # (namespace, key) -> the value serialized, or DELETED
        self._changes: dict[tuple[str, str], Raw] = {}
        self._cleared = False
        self._doomed: list[str] = []  # IDs whose data commit removes
        self._destroyed = False  # commit expires the cookie
        self._refresh = False  # an idle-timeout refresh is due

    def __repr__(self) -> str:
        state = "loaded" if self._loaded else "not loaded"
        return f"<Session {state}, {len(self._changes)} pending changes>"

    @property
    def id(self) -> str | None:
        """The session ID, or None while the session has none (new, not loaded yet, or
        destroyed). After :meth:`regenerate` it is the new ID."""
        return self._new_id or self._id

    @property
    def modified(self) -> bool:
        """True when the request changed the session (commit has something to write)."""
        return bool(
            self._changes or self._cleared or self._new_id or self._doomed or self._destroyed
        )

    # -- reading ------------------------------------------------------------------------

    async def _load(self) -> None:
        if self._loaded:
            return
        assert self._cookie_id is not None
        base = await self._manager._read(self._cookie_id)
        if not self._loaded:  # a concurrent reader in this request may have won
            self._loaded = True
            if base is not None:
                self._id, self._base = self._cookie_id, base
                self._refresh = self._manager._refresh_due(base)

    def _lookup(self, namespace: str, key: str) -> Any:
        if (namespace, key) in self._changes:
            return self._changes[namespace, key]
        if self._cleared or self._base is None:
            return DELETED
        stored = self._base.data if namespace == _DATA else self._base.flash
        return stored.get(key, DELETED)

    def _merged(self, base: Stored | None) -> tuple[dict[str, Raw], dict[str, Raw]]:
        """``base`` with this request's changes applied: (data, flash), serialized."""
        if self._cleared or base is None:
            data: dict[str, Raw] = {}
            flash: dict[str, Raw] = {}
        else:
            data, flash = dict(base.data), dict(base.flash)
        for (namespace, key), value in self._changes.items():
            target = data if namespace == _DATA else flash
            if value is DELETED:
                target.pop(key, None)
            else:
                target[key] = value
        return data, flash

    async def get(self, key: str, default: Any = None) -> Any:
        """The value stored at ``key`` (a new copy on every call), or ``default``."""
        await self._load()
        raw = self._lookup(_DATA, key)
        return default if raw is DELETED else self._manager._decode(raw, key, default)

    async def has(self, key: str) -> bool:
        """True when ``key`` holds a value."""
        await self._load()
        return self._lookup(_DATA, key) is not DELETED

    async def keys(self) -> list[str]:
        """Every key of the session."""
        await self._load()
        return list(self._merged(self._base)[0])

    async def items(self) -> list[tuple[str, Any]]:
        """Every ``(key, value)`` pair of the session."""
        await self._load()
        decode = self._manager._decode
        return [(key, decode(raw, key, None)) for key, raw in self._merged(self._base)[0].items()]

    # -- writing ------------------------------------------------------------------------

    async def set(self, key: str, value: Any) -> None:
        """Store a copy of ``value`` at ``key``.

        Raises:
            SerializationError: the ``tagged`` serializer cannot store ``value`` (raised
                here, not at the end of the request).
        """
        _check_key(key)
        self._changes[_DATA, key] = self._manager._encode(value)

    async def delete(self, key: str) -> None:
        """Remove ``key`` (no error when it is missing)."""
        _check_key(key)
        self._changes[_DATA, key] = DELETED

    async def clear(self) -> None:
        """Remove every key and flash value; the session keeps its ID."""
        self._changes.clear()
        self._cleared = True

    def flash(self, key: str, value: Any) -> None:
        """Store ``value`` for one later read with :meth:`pop_flash` (a message shown
        after a redirect, typically). Same rules as :meth:`set`."""
        _check_key(key)
        self._changes[_FLASH, key] = self._manager._encode(value)

    async def pop_flash(self, key: str, default: Any = None) -> Any:
        """Return the flash value at ``key`` and remove it, or ``default``."""
        _check_key(key)
        await self._load()
        raw = self._lookup(_FLASH, key)
        if raw is DELETED:
            return default
        self._changes[_FLASH, key] = DELETED
        return self._manager._decode(raw, key, default)

    async def regenerate(self) -> None:
        """Give the session a new ID, keeping its data (call it on login and on every
        privilege change, against session fixation).

        At commit the data is written under the new ID first, then the old ID's data is
        removed, and the cookie is set to the new ID.
        """
        await self._load()
        if self._id is not None and self._id not in self._doomed:
            self._doomed.append(self._id)
        self._new_id = self._manager._new_id()

    async def destroy(self) -> None:
        """End the session: at commit its stored data is removed and the cookie expired.

        Writes after ``destroy()`` start a new session with a new ID.
        """
        old = self._id if self._loaded else self._cookie_id
        if old is not None and old not in self._doomed:
            self._doomed.append(old)
        self._new_id = self._id = self._base = None
        self._loaded = self._destroyed = True
        self._changes.clear()
        self._cleared = self._refresh = False
