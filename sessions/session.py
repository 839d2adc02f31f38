"""`Session`: one request's view of a server-side session, and the state machine that
commits its changes.

A session talks to the storage (through its :class:`~sessions.store.SessionStore`) only to
load its data the first time a value is read, and at commit. Writes (`set`, `delete`,
`clear`, `flash`, `regenerate`, `destroy`) are recorded as a small change log that
:meth:`Session.save` (called by :meth:`SessionManager.commit`) applies to the version
stored at the end of the request.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple

import msgspec
from msgspec import Raw

from kvstorage import ConditionFailedError
from kvstorage.retry import backoff
from kvstorage.storage import ttl_seconds

from .store import SessionStore, Stored, fingerprint, handle_of

__all__ = ["Lifetime", "Saved", "Session", "seconds"]

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


def seconds(value: float | timedelta | None, name: str) -> float | None:
    """A limit as seconds (a number or ``timedelta``; None stays None), checked by the
    core's TTL rule: ``TypeError`` or ``ValueError`` naming ``name``."""
    return None if value is None else ttl_seconds(value, name)


def _check_key(key: str) -> None:
    if not isinstance(key, str):
        raise TypeError(f"session keys are strings, not {type(key).__name__}")
    if not key:
        raise ValueError("session keys must not be empty")


@dataclass(frozen=True, slots=True)
class Lifetime:
    """How long sessions live; every session checks it on load and at commit.

    Args:
        ttl: absolute lifetime in seconds, counted from the session's creation (a login
            with :meth:`Session.regenerate` starts a new one); None for no limit.
        idle_timeout: a session not written for this many seconds expires; None for no
            limit.
        refresh_fraction: with ``idle_timeout``, a request that only reads refreshes the
            idle timer (one write, and the cookie is re-sent) once this fraction of the
            idle window has passed since the last write -- not on every request.

    Raises:
        TypeError: a limit that is neither a number nor a ``timedelta``.
        ValueError: a limit that is not a positive finite number, or a
            ``refresh_fraction`` outside ``[0, 1)``.
    """

    ttl: float | None = None
    idle_timeout: float | None = None
    refresh_fraction: float = 0.25

    def __post_init__(self) -> None:
        seconds(self.ttl, "ttl"), seconds(self.idle_timeout, "idle_timeout")  # the core's rule
        if not 0 <= self.refresh_fraction < 1:
            raise ValueError("refresh_fraction must be at least 0 and less than 1")

    def of(self, stored: Stored | None) -> Lifetime:
        """The limits of ``stored``: its own (``set_expiry``) or these."""
        if stored is None or stored.limits is None:
            return self
        return Lifetime(*stored.limits, self.refresh_fraction)

    def alive(self, stored: Stored, now: float) -> bool:
        """True when neither limit of ``stored`` has passed at ``now``."""
        limits = self.of(stored)
        if limits.ttl is not None and now >= stored.created + limits.ttl:
            return False
        return limits.idle_timeout is None or now < stored.accessed + limits.idle_timeout

    def refresh_due(self, stored: Stored, now: float) -> bool:
        """True when an unchanged ``stored`` should be written again to extend its idle
        timeout."""
        idle = self.of(stored).idle_timeout
        return idle is not None and now - stored.accessed >= idle * self.refresh_fraction

    def item_ttl(self, created: float, now: float) -> float | None:
        """The storage TTL of a session created at ``created`` and written at ``now``:
        what is left of the absolute lifetime or the idle timeout, whichever ends first
        (zero or less: it is over; None: no limit)."""
        left = None if self.ttl is None else self.ttl + created - now
        idle = self.idle_timeout
        return left if idle is None or (left is not None and left < idle) else idle

    def remaining(self, created: float, now: float) -> float | None:
        """What is left of the absolute lifetime (None: no limit)."""
        return None if self.ttl is None else self.ttl + created - now


class Saved(NamedTuple):
    """What :meth:`Session.save` did, as far as the client is concerned."""

    cookie_id: str | None
    """The ID to send to the client now (a new, regenerated or refreshed session)."""
    ended: bool
    """The session ended (destroyed, or gone during the request): the client's cookie
    should be expired."""
    max_age: float | None = None
    """With ``cookie_id``, for a persistent session: seconds the client should keep it."""


_UNCHANGED = Saved(None, False)


class Session:
    """The session of one request: ``session = request.scope["session"]``.

    Reading (:meth:`get`, :meth:`has`, :meth:`keys`, :meth:`items`, :meth:`pop_flash`,
    :meth:`csrf_token`, :meth:`verify_csrf`) loads the stored data on first use -- never
    before, and never when the request carried no session ID. Writing only records the
    change; the middleware (or :meth:`SessionManager.commit`) applies the changes at the
    end of the request, key by key, to the version stored at that time.

    Values are anything the ``tagged`` serializer round-trips (JSON values plus
    ``datetime``, ``date``, ``Decimal``, ``UUID``, ``bytes``, ``set``, ``tuple``, ...).
    Values are copied in and out: :meth:`set` serializes at once, and every read
    returns a new object, so to change a value, read it, change it and ``set`` it again.
    """

    __slots__ = (
        "_base",
        "_bind",
        "_changes",
        "_cleared",
        "_cookie_id",
        "_destroyed",
        "_fields",
        "_id",
        "_lifetime",
        "_loaded",
        "_lost",
        "_next_id",
        "_refresh_due",
        "_store",
        "used",
        "user_id",
    )

    def __init__(
        self, store: SessionStore, lifetime: Lifetime, cookie_id: str | None = None
    ) -> None:
        """Use :meth:`SessionManager.open` instead; ``cookie_id`` must be well-formed."""
        self._store = store
        self._lifetime = lifetime
        self._cookie_id = cookie_id  # from the request; not known to exist yet
        self._id: str | None = None  # the ID whose stored data is in _base
        self._next_id: str | None = None  # chosen by regenerate(), written by save()
        self._loaded = cookie_id is None  # nothing to load without an ID
        self._base: Stored | None = None  # the stored version read at load time
        # (namespace, key) -> the value serialized, or DELETED
        self._changes: dict[tuple[str, str], Raw] = {}
        self._fields: dict[str, Any] = {}  # session-wide fields set by this request
        self._cleared = False
        self._bind = False  # the user binding (or its lifetime) must be written
        self._destroyed: str | None = None  # the ID whose session save() ends
        self._refresh_due = False  # an idle-timeout refresh is due
        self._lost = False  # the session ended while this request ran
        self.used = False
        """True once the request read or changed the session (its response then depends
        on the session cookie)."""
        self.user_id: str | None = None
        """The user this session is bound to (:meth:`set_user`), once loaded."""

    def __repr__(self) -> str:
        state = "loaded" if self._loaded else "not loaded"
        return f"<Session {state}, {len(self._changes)} pending changes>"

    @property
    def id(self) -> str | None:
        """The session ID, or None while the session has none (new, not loaded yet, or
        destroyed). After :meth:`regenerate` it is the new ID."""
        return self._next_id or self._id

    @property
    def handle(self) -> str | None:
        """The session's handle (a hash of :attr:`id`, as
        :meth:`SessionManager.sessions_of` lists it), or None while it has no ID."""
        session_id = self.id
        return None if session_id is None else handle_of(session_id)

    @property
    def modified(self) -> bool:
        """True when the request changed the session (commit has something to write)."""
        return bool(
            self._changes
            or self._fields
            or self._cleared
            or self._next_id
            or self._destroyed is not None
        )

    # -- reading ------------------------------------------------------------------------

    async def _read(self, session_id: str) -> Stored | None:
        """The live session stored under ``session_id``, or None (missing, ended, moved,
        expired or corrupt)."""
        stored = await self._store.read(handle_of(session_id))
        if stored is None or not stored.live or not self._lifetime.alive(stored, time.time()):
            return None
        return stored

    async def _load(self) -> None:
        self.used = True
        if self._loaded:
            return
        assert self._cookie_id is not None
        base = await self._read(self._cookie_id)
        if not self._loaded:  # a concurrent reader in this request may have won
            self._loaded = True
            if base is not None:
                self._id, self._base = self._cookie_id, base
                self.user_id = self._fields.get("user", base.user)
                self._refresh_due = self._lifetime.refresh_due(base, time.time())

    def _lookup(self, namespace: str, key: str) -> Any:
        if (namespace, key) in self._changes:
            return self._changes[namespace, key]
        if self._cleared or self._base is None:
            return DELETED
        stored = self._base.data if namespace == _DATA else self._base.flash
        return stored.get(key, DELETED)

    def _field(self, name: str) -> Any:
        if name in self._fields:
            return self._fields[name]
        return None if self._base is None else getattr(self._base, name)

    def _merged(self, base: Stored | None, created: float, now: float) -> Stored:
        """``base`` with this request's changes applied, as written at ``now``."""
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
        if base is None:
            merged = Stored(data, flash, created, now, None)
        else:
            merged = Stored(
                data, flash, created, now, None, base.user, base.user_meta, base.csrf,
                base.limits, base.persistent,
            )  # fmt: skip
        return msgspec.structs.replace(merged, **self._fields) if self._fields else merged

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
        return list(self._merged(self._base, 0.0, 0.0).data)

    async def items(self) -> list[tuple[str, Any]]:
        """Every ``(key, value)`` pair of the session."""
        await self._load()
        decode = self._store.decode
        data = self._merged(self._base, 0.0, 0.0).data
        return [(key, decode(raw, key, None)) for key, raw in data.items()]

    # -- writing ------------------------------------------------------------------------

    async def set(self, key: str, value: Any) -> None:
        """Store a copy of ``value`` at ``key``.

        Raises:
            SerializationError: the ``tagged`` serializer cannot store ``value`` (raised
                here, not at the end of the request).
        """
        _check_key(key)
        self.used = True
        self._changes[_DATA, key] = self._store.encode(value)

    async def delete(self, key: str) -> None:
        """Remove ``key`` (no error when it is missing)."""
        _check_key(key)
        self.used = True
        self._changes[_DATA, key] = DELETED

    async def clear(self) -> None:
        """Remove every key and flash value; the session keeps its ID, its user and its
        limits."""
        self.used = True
        self._changes.clear()
        self._cleared = True

    async def flash(self, key: str, value: Any) -> None:
        """Store ``value`` for one later read with :meth:`pop_flash` (a message shown
        after a redirect, typically). Same rules as :meth:`set`."""
        _check_key(key)
        self.used = True
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

    async def set_user(self, user_id: str, *, meta: dict[str, Any] | None = None) -> None:
        """Bind this session to ``user_id`` (call :meth:`regenerate` first on login).

        The binding is recorded at commit in the user's index (before the session itself),
        so :meth:`SessionManager.sessions_of` lists the session and
        :meth:`SessionManager.revoke_user` ends it. ``meta`` is kept with it and shown in
        :class:`~sessions.manager.SessionInfo` (a device name, an IP address, ...); it must
        be JSON.

        Raises:
            TypeError: ``user_id`` is not a non-empty string, or ``meta`` is not JSON.
        """
        if not isinstance(user_id, str) or not user_id:
            raise TypeError("user_id must be a non-empty string")
        if meta is not None:
            try:
                msgspec.json.encode(meta)
            except (TypeError, msgspec.EncodeError) as exc:
                raise TypeError(f"meta must be JSON: {exc}") from None
        await self._load()
        self._fields["user"], self._fields["user_meta"] = user_id, meta
        self.user_id = user_id
        self._bind = True

    async def set_expiry(
        self,
        *,
        ttl: float | timedelta | None = None,
        idle_timeout: float | timedelta | None = None,
        persistent: bool = False,
    ) -> None:
        """Give this session its own limits ("remember me"), in place of the manager's.

        Args:
            ttl: absolute lifetime in seconds or as a ``timedelta`` (None: no limit).
            idle_timeout: seconds without a write after which it expires (None: none).
            persistent: send the cookie with ``Max-Age`` so it survives a browser restart
                (for as long as the session may live).

        Raises:
            ValueError: a limit that is not a positive finite number, or
                ``persistent=True`` without any limit.
        """
        limits = Lifetime(
            seconds(ttl, "ttl"),
            seconds(idle_timeout, "idle_timeout"),
            self._lifetime.refresh_fraction,
        )
        if persistent and limits.ttl is None and limits.idle_timeout is None:
            raise ValueError("a persistent session needs a ttl or an idle_timeout")
        await self._load()
        self._fields["limits"] = (limits.ttl, limits.idle_timeout)
        self._fields["persistent"] = persistent
        self._bind = True  # the index entry must live as long as the session

    async def csrf_token(self) -> str:
        """This session's CSRF token: put it in every form (or a header) and check it with
        :meth:`verify_csrf`. Created on first use (which starts a session), rotated by
        :meth:`regenerate`."""
        await self._load()
        token = self._field("csrf")
        if token is None:
            token = self._fields["csrf"] = secrets.token_urlsafe(32)
        return str(token)

    async def verify_csrf(self, token: str | None) -> bool:
        """True when ``token`` is this session's CSRF token (compared in constant time);
        False when it is missing or wrong, or the session has none."""
        await self._load()
        expected = self._field("csrf")
        if not isinstance(token, str) or not isinstance(expected, str):
            return False
        return hmac.compare_digest(token.encode(), expected.encode())

    async def regenerate(self) -> None:
        """Give the session a new ID, keeping its data (call it on login and on every
        privilege change, against session fixation). It starts a new absolute lifetime
        and a new CSRF token.

        At commit the data is written under the new ID, the old ID can no longer be used
        (a request still running with it cannot bring it back), and the cookie is set to
        the new ID.
        """
        await self._load()
        self._next_id = self._store.new_id()
        self._fields["csrf"] = None

    async def destroy(self) -> None:
        """End the session: at commit its stored data is removed and the cookie expired;
        a request running with the same session at the same time cannot bring it back.

        Writes after ``destroy()`` start a new session with a new ID.
        """
        self.used = True
        old = self._id if self._loaded else self._cookie_id
        if old is not None:
            self._destroyed = old
        self._next_id = self._id = self._base = self.user_id = None
        self._loaded = True
        self._changes.clear()
        self._fields.clear()
        self._cleared = self._refresh_due = self._bind = False

    # -- commit -------------------------------------------------------------------------

    async def save(self, *, headers_sent: bool = False) -> Saved:
        """Persist the request's changes (:meth:`SessionManager.commit` calls this and
        turns the result into response headers).

        Changes are applied key by key to the version stored now, with a conditional
        write, re-read and re-applied if another request wrote in between: concurrent
        requests that change different keys all keep their changes. A session that was
        alive when this request loaded it and is gone now (destroyed, revoked, regenerated
        by another request or expired meanwhile) stays gone: the changes are dropped. An
        unchanged session whose idle refresh is due is written again as it was.

        With ``headers_sent=True`` (the client can no longer receive an ID), changes that
        need a new ID (a new session, :meth:`regenerate`) are not written (a warning is
        logged) and are kept for a later save.

        Raises:
            ConditionFailedError: the session kept changing under this write for 50
                tries.
        """
        if not self.modified and not self._refresh_due:
            return _UNCHANGED
        if headers_sent and self._next_id is not None:
            logger.warning(_TOO_LATE)
            return Saved(None, False)  # keep the old ID and its data
        ended = False
        if self._destroyed is not None:
            await self._store.kill(handle_of(self._destroyed))
            logger.debug("session %s ended", fingerprint(self._destroyed))
            self._destroyed, ended = None, True
        cookie_id: str | None = None
        if self._changes or self._fields or self._cleared or self._next_id is not None:
            cookie_id = await self._save_changes(headers_sent=headers_sent)
            ended = (ended or self._lost) and cookie_id is None
            self._lost = False
        elif self._refresh_due and self._base is not None and self._id is not None:
            cookie_id = await self._touch(self._id, self._base)
        max_age = None
        if cookie_id is not None and self._base is not None and self._base.persistent:
            max_age = self._lifetime.of(self._base).item_ttl(self._base.created, time.time())
        return Saved(cookie_id, ended, max_age)

    async def _save_changes(self, *, headers_sent: bool) -> str | None:
        """Write the changes; return the ID to send to the client (new or refreshed)."""
        if self._next_id is not None:  # regenerate(): the data moves to a new ID
            return await self._regenerate(self._next_id)
        await self._load()  # a write-only request has read nothing yet
        if self._base is None or self._id is None:
            return await self._create_new(headers_sent=headers_sent)
        return await self._update(self._id, self._base)

    async def _create_new(self, *, headers_sent: bool) -> str | None:
        """Store this request's changes as a new session -- unless they hold nothing worth
        a session (only deletes, say) or the client can no longer receive its ID."""
        now = time.time()
        stored = self._merged(None, now, now)
        if not (stored.data or stored.flash or stored.user or stored.csrf or stored.limits):
            self._settle(None, None)
            return None
        if headers_sent:
            logger.warning(_TOO_LATE)
            return None
        return await self._create(stored)

    async def _bind_user(self, handle: str, stored: Stored) -> None:
        """Write the user index entry of ``stored`` (before the session itself)."""
        if stored.user is not None:
            limits = self._lifetime.of(stored)
            await self._store.bind(
                stored.user, handle, ttl=limits.remaining(stored.created, time.time())
            )

    async def _create(self, stored: Stored) -> str | None:
        """Store a new session under a fresh ID; the ID, or None when it is over already."""
        while True:
            session_id = self._store.new_id()
            handle = handle_of(session_id)
            await self._bind_user(handle, stored)
            try:
                written = await self._put(handle, stored, if_absent=True)
            except ConditionFailedError:  # 256 random bits collided: astronomically rare
                continue
            break
        self._settle(session_id if written else None, written)
        if written is None:
            return None
        logger.debug("session %s created", fingerprint(session_id))
        return session_id

    async def _regenerate(self, new_id: str) -> str | None:
        """Move the session to ``new_id``: the data is written under the new ID first,
        then the old version is replaced by a marker pointing at the new one -- only if it
        is still the version read (so a session ended meanwhile is not revived: the new
        one is ended too)."""
        if self._base is None or self._id is None:  # nothing stored yet: a new session
            return await self._create_new(headers_sent=False)
        old_id, old, new = self._id, handle_of(self._id), handle_of(new_id)
        created = time.time()  # a login starts a new absolute lifetime
        current: Stored | None = self._base
        for attempt in range(_RETRIES):
            if current is None or current.etag is None:
                current = await self._read(old_id)
                if current is None:  # ended meanwhile: so is the new one
                    await self._store.kill(new)
                    return await self._gone(old_id)
            stored = self._merged(current, created, time.time())
            if attempt == 0:
                await self._bind_user(new, stored)
                await self._put(new, stored, if_absent=True)
            else:  # rewrite ours, unless it was ended meanwhile
                mine = await self._store.read(new)
                if mine is None or not mine.live:
                    await self._store.kill(old)
                    return await self._gone(old_id)
                try:
                    await self._put(new, stored, if_match=mine.etag)
                except ConditionFailedError:
                    current = None
                    continue
            assert current.etag is not None
            try:
                await self._store.move(old, new, if_match=current.etag)
            except ConditionFailedError:  # written, ended or moved meanwhile: look again
                current = None
                await backoff(attempt)
                continue
            if current.user is not None:
                await self._store.unbind(current.user, old)
            self._settle(new_id, stored)
            return new_id
        raise ConditionFailedError(f"session {fingerprint(old_id)} kept changing")

    async def _gone(self, session_id: str) -> str | None:
        """The session ended (destroyed, revoked, expired) or moved (regenerated by
        another request) while this request ran: drop the changes. An ended session's
        cookie is expired; a moved one's is left alone (the client may hold the new ID
        already)."""
        logger.info(
            "session %s ended during the request; its changes were dropped",
            fingerprint(session_id),
        )
        marker = await self._store.read(handle_of(session_id))
        self._settle(None, None)
        self._lost = marker is None or marker.moved_to is None
        return None

    async def _update(self, session_id: str, base: Stored) -> str | None:
        handle = handle_of(session_id)
        refresh = self._lifetime.refresh_due(base, time.time()) or "persistent" in self._fields
        current: Stored | None = base
        bound = False
        for attempt in range(_RETRIES):
            if current is None or current.etag is None:
                current = await self._read(session_id)
                if current is None:  # ended, moved or expired meanwhile: do not recreate
                    return await self._gone(session_id)
            stored = self._merged(current, current.created, time.time())
            if self._bind and not bound:
                await self._bind_user(handle, stored)
                bound = True
            try:
                written = await self._put(handle, stored, if_match=current.etag)
            except ConditionFailedError:
                current = None
                await backoff(attempt)
                continue
            self._settle(session_id if written else None, written)
            return session_id if written is not None and refresh else None
        raise ConditionFailedError(
            f"session {fingerprint(session_id)} kept changing; gave up after {_RETRIES} tries"
        )

    async def _touch(self, session_id: str, base: Stored) -> str | None:
        """Extend the idle timeout of an unchanged session (one conditional write)."""
        self._refresh_due = False
        if base.etag is None:
            return None  # written by this very request already
        stored = self._merged(base, base.created, time.time())
        try:
            written = await self._put(handle_of(session_id), stored, if_match=base.etag)
        except ConditionFailedError:
            return None  # somebody else wrote (and so refreshed) it, or it is gone
        if written is None:
            return None
        self._base = written
        return session_id

    async def _put(
        self, handle: str, stored: Stored, *, if_absent: bool = False, if_match: str | None = None
    ) -> Stored | None:
        """Store ``stored`` under ``handle``; None (nothing written) when its absolute
        lifetime is over."""
        lifetime = self._lifetime if stored.limits is None else self._lifetime.of(stored)
        ttl = lifetime.item_ttl(stored.created, stored.accessed)
        if ttl is not None and ttl <= 0:
            return None
        await self._store.write(handle, stored, ttl=ttl, if_absent=if_absent, if_match=if_match)
        return stored

    def _settle(self, session_id: str | None, stored: Stored | None) -> None:
        """Reflect what was just committed."""
        self._id, self._base = (session_id, stored) if stored else (None, None)
        self.user_id = stored.user if stored else None
        self._next_id = None
        self._loaded = True
        self._changes.clear()
        self._fields.clear()
        self._cleared = self._refresh_due = self._bind = False
