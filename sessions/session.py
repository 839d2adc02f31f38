"""`Session`: one request's view of a server-side session, and the state machine that
commits its changes.

A session talks to the storage (through its :class:`~sessions.store.SessionStore`) only to
load its data the first time a value is read, and at commit. Writes (`set`, `delete`,
`clear`, `flash`, `regenerate`, `destroy`) are recorded as a small change log that
:meth:`Session.save` (called by :meth:`SessionManager.commit`) applies to the version
stored at the end of the request.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from msgspec import Raw

from kvstorage import ConditionFailedError
from kvstorage.retry import backoff

from .store import SessionStore, Stored, fingerprint

__all__ = ["Lifetime", "Saved", "Session"]

logger = logging.getLogger("sessions")

_DATA, _FLASH = "d", "f"
_RETRIES = 50
_TOO_LATE = (
    "a session that needs a new ID was changed after the response started; not saved "
    "(change the session before sending the response)"
)


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


@dataclass(frozen=True, slots=True)
class Lifetime:
    """How long sessions live; every session checks it on load and at commit.

    Args:
        ttl: absolute lifetime in seconds, counted from the session's creation; None for
            no limit.
        idle_timeout: a session not written for this many seconds expires; None for no
            limit.
        refresh_fraction: with ``idle_timeout``, a request that only reads refreshes the
            idle timer (one write, and the cookie is re-sent) once this fraction of the
            idle window has passed since the last write -- not on every request.

    Raises:
        ValueError: a limit that is not a positive finite number, or a
            ``refresh_fraction`` outside ``[0, 1)``.
    """

    ttl: float | None = None
    idle_timeout: float | None = None
    refresh_fraction: float = 0.25

    def __post_init__(self) -> None:
        for name, seconds in (("ttl", self.ttl), ("idle_timeout", self.idle_timeout)):
            if seconds is not None and (not seconds > 0 or not math.isfinite(seconds)):
                raise ValueError(f"{name} must be a positive number of seconds, got {seconds!r}")
        if not 0 <= self.refresh_fraction < 1:
            raise ValueError("refresh_fraction must be at least 0 and less than 1")

    def alive(self, stored: Stored, now: float) -> bool:
        """True when neither limit of ``stored`` has passed at ``now``."""
        if self.ttl is not None and now >= stored.created + self.ttl:
            return False
        return self.idle_timeout is None or now < stored.accessed + self.idle_timeout

    def refresh_due(self, stored: Stored, now: float) -> bool:
        """True when an unchanged ``stored`` should be written again to extend its idle
        timeout."""
        idle = self.idle_timeout
        return idle is not None and now - stored.accessed >= idle * self.refresh_fraction

    def item_ttl(self, created: float, now: float) -> float | None:
        """The storage TTL of a session created at ``created`` and written at ``now``:
        what is left of the absolute lifetime or the idle timeout, whichever ends first
        (zero or less: it is over; None: no limit)."""
        limits = [self.ttl + created - now] if self.ttl is not None else []
        if self.idle_timeout is not None:
            limits.append(self.idle_timeout)
        return min(limits) if limits else None


class Saved(NamedTuple):
    """What :meth:`Session.save` did, as far as the client is concerned."""

    cookie_id: str | None
    """The ID to send to the client now (a new, regenerated or refreshed session)."""
    ended: bool
    """The session was destroyed: the client's cookie should be expired."""


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
        "_lifetime",
        "_loaded",
        "_next_id",
        "_refresh_due",
        "_store",
    )

    def __init__(
        self, store: SessionStore, lifetime: Lifetime, cookie_id: str | None = None
    ) -> None:
        """Use :meth:`SessionManager.open` instead; ``cookie_id`` must be well-formed."""
        self._store = store
        self._lifetime = lifetime
        self._cookie_id = cookie_id  # from the cookie; not known to exist yet
        self._id: str | None = None  # the ID whose stored data is in _base
        self._next_id: str | None = None  # chosen by regenerate(), written by save()
        self._loaded = cookie_id is None  # nothing to load without a cookie
        self._base: Stored | None = None  # the stored version read at load time
        # (namespace, key) -> the value serialized, or DELETED
        self._changes: dict[tuple[str, str], Raw] = {}
        self._cleared = False
        self._doomed: list[str] = []  # IDs whose data save() removes
        self._destroyed = False  # save() reports the session ended
        self._refresh_due = False  # an idle-timeout refresh is due

    def __repr__(self) -> str:
        state = "loaded" if self._loaded else "not loaded"
        return f"<Session {state}, {len(self._changes)} pending changes>"

    @property
    def id(self) -> str | None:
        """The session ID, or None while the session has none (new, not loaded yet, or
        destroyed). After :meth:`regenerate` it is the new ID."""
        return self._next_id or self._id

    @property
    def modified(self) -> bool:
        """True when the request changed the session (commit has something to write)."""
        return bool(
            self._changes or self._cleared or self._next_id or self._doomed or self._destroyed
        )

    # -- reading ------------------------------------------------------------------------

    async def _read(self, session_id: str) -> Stored | None:
        """The live session stored under ``session_id``, or None (missing, expired or
        corrupt)."""
        stored = await self._store.read(session_id)
        if stored is None or not self._lifetime.alive(stored, time.time()):
            return None
        return stored

    async def _load(self) -> None:
        if self._loaded:
            return
        assert self._cookie_id is not None
        base = await self._read(self._cookie_id)
        if not self._loaded:  # a concurrent reader in this request may have won
            self._loaded = True
            if base is not None:
                self._id, self._base = self._cookie_id, base
                self._refresh_due = self._lifetime.refresh_due(base, time.time())

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
        return default if raw is DELETED else self._store.decode(raw, key, default)

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
        decode = self._store.decode
        return [(key, decode(raw, key, None)) for key, raw in self._merged(self._base)[0].items()]

    # -- writing ------------------------------------------------------------------------

    async def set(self, key: str, value: Any) -> None:
        """Store a copy of ``value`` at ``key``.

        Raises:
            SerializationError: the ``tagged`` serializer cannot store ``value`` (raised
                here, not at the end of the request).
        """
        _check_key(key)
        self._changes[_DATA, key] = self._store.encode(value)

    async def delete(self, key: str) -> None:
        """Remove ``key`` (no error when it is missing)."""
        _check_key(key)
        self._changes[_DATA, key] = DELETED

    async def clear(self) -> None:
        """Remove every key and flash value; the session keeps its ID."""
        self._changes.clear()
        self._cleared = True

    async def flash(self, key: str, value: Any) -> None:
        """Store ``value`` for one later read with :meth:`pop_flash` (a message shown
        after a redirect, typically). Same rules as :meth:`set`."""
        _check_key(key)
        self._changes[_FLASH, key] = self._store.encode(value)

    async def pop_flash(self, key: str, default: Any = None) -> Any:
        """Return the flash value at ``key`` and remove it, or ``default``."""
        _check_key(key)
        await self._load()
        raw = self._lookup(_FLASH, key)
        if raw is DELETED:
            return default
        self._changes[_FLASH, key] = DELETED
        return self._store.decode(raw, key, default)

    async def regenerate(self) -> None:
        """Give the session a new ID, keeping its data (call it on login and on every
        privilege change, against session fixation).

        At commit the data is written under the new ID first, then the old ID's data is
        removed, and the cookie is set to the new ID.
        """
        await self._load()
        if self._id is not None and self._id not in self._doomed:
            self._doomed.append(self._id)
        self._next_id = self._store.new_id()

    async def destroy(self) -> None:
        """End the session: at commit its stored data is removed and the cookie expired.

        Writes after ``destroy()`` start a new session with a new ID.
        """
        old = self._id if self._loaded else self._cookie_id
        if old is not None and old not in self._doomed:
            self._doomed.append(old)
        self._next_id = self._id = self._base = None
        self._loaded = self._destroyed = True
        self._changes.clear()
        self._cleared = self._refresh_due = False

    # -- commit -------------------------------------------------------------------------

    async def save(self, *, headers_sent: bool = False) -> Saved:
        """Persist the request's changes (:meth:`SessionManager.commit` calls this and
        turns the result into ``Set-Cookie`` headers).

        Changes are applied key by key to the version stored now, with a conditional
        write, re-read and re-applied if another request wrote in between: concurrent
        requests that change different keys all keep their changes. A session that was
        alive when this request loaded it and is gone now (destroyed or expired
        meanwhile) stays gone: the changes are dropped. An unchanged session whose idle
        refresh is due is written again as it was.

        With ``headers_sent=True`` (the client can no longer receive a cookie), changes
        that need a new ID (a new session, :meth:`regenerate`) are not written (a warning
        is logged) and are kept for a later save.

        Raises:
            ConditionFailedError: the session kept changing under this write for 50
                tries.
        """
        if headers_sent and self._next_id is not None:
            logger.warning(_TOO_LATE)
            return Saved(None, False)  # keep the old ID and its data
        cookie_id: str | None = None
        if self._changes or self._cleared or self._next_id is not None:
            cookie_id = await self._save_changes(headers_sent=headers_sent)
        elif self._refresh_due and self._base is not None and self._id is not None:
            cookie_id = await self._touch(self._id, self._base)
        for doomed in self._doomed:
            await self._store.remove(doomed)
            logger.debug("session %s removed", fingerprint(doomed))
        self._doomed.clear()
        ended, self._destroyed = self._destroyed, False
        return Saved(cookie_id, ended)

    async def _save_changes(self, *, headers_sent: bool) -> str | None:
        """Write the changes; return the ID to send in a cookie (new or refreshed)."""
        if self._next_id is not None:  # regenerate(): the data moves to a new ID
            data, flash = self._merged(self._base)
            created = self._base.created if self._base is not None else time.time()
            return await self._create(data, flash, created, self._next_id)
        await self._load()  # a write-only request has read nothing yet
        if self._base is None or self._id is None:  # a new session
            data, flash = self._merged(None)
            if not data and not flash:  # e.g. only deletes: nothing worth a session
                self._changes.clear()
                self._cleared = False
                return None
            if headers_sent:
                logger.warning(_TOO_LATE)
                return None
            return await self._create(data, flash, time.time(), self._store.new_id())
        return await self._update(self._id, self._base)

    async def _create(
        self, data: dict[str, Raw], flash: dict[str, Raw], created: float, session_id: str
    ) -> str | None:
        while True:
            try:
                stored = await self._put(session_id, data, flash, created, if_absent=True)
            except ConditionFailedError:  # 256 random bits collided: astronomically rare
                session_id = self._store.new_id()
                continue
            break
        self._settle(session_id, stored)
        if stored is None:
            return None
        logger.debug("session %s created", fingerprint(session_id))
        return session_id

    async def _update(self, session_id: str, base: Stored) -> str | None:
        refresh = self._lifetime.refresh_due(base, time.time())
        current: Stored | None = base
        for attempt in range(_RETRIES):
            if current is None or current.etag is None:
                current = await self._read(session_id)
                if current is None:  # destroyed or expired meanwhile: do not recreate
                    logger.info(
                        "session %s ended during the request; its changes were dropped",
                        fingerprint(session_id),
                    )
                    self._settle(None, None)
                    return None
            data, flash = self._merged(current)
            try:
                stored = await self._put(
                    session_id, data, flash, current.created, if_match=current.etag
                )
            except ConditionFailedError:
                current = None
                await backoff(attempt)
                continue
            self._settle(session_id if stored else None, stored)
            return session_id if stored is not None and refresh else None
        raise ConditionFailedError(
            f"session {fingerprint(session_id)} kept changing; gave up after {_RETRIES} tries"
        )

    async def _touch(self, session_id: str, base: Stored) -> str | None:
        """Extend the idle timeout of an unchanged session (one conditional write)."""
        self._refresh_due = False
        if base.etag is None:
            return None  # written by this very request already
        try:
            stored = await self._put(
                session_id, base.data, base.flash, base.created, if_match=base.etag
            )
        except ConditionFailedError:
            return None  # somebody else wrote (and so refreshed) it, or it is gone
        if stored is None:
            return None
        self._base = stored
        return session_id

    async def _put(
        self,
        session_id: str,
        data: dict[str, Raw],
        flash: dict[str, Raw],
        created: float,
        *,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> Stored | None:
        """Store this session as written now; None (nothing written) when its absolute
        lifetime is over."""
        now = time.time()
        ttl = self._lifetime.item_ttl(created, now)
        if ttl is not None and ttl <= 0:
            return None
        stored = Stored(data, flash, created, now, etag=None)
        await self._store.write(session_id, stored, ttl=ttl, if_absent=if_absent, if_match=if_match)
        return stored

    def _settle(self, session_id: str | None, stored: Stored | None) -> None:
        """Reflect what was just committed."""
        self._id, self._base = (session_id, stored) if stored else (None, None)
        self._next_id = None
        self._loaded = True
        self._changes.clear()
        self._cleared = self._refresh_due = False
