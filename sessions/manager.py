"""`SessionManager`: IDs, the stored form of a session, expiry, and the commit that applies
one request's changes to the stored version without losing anybody else's.

Stored form: one item per session at ``<prefix>:<id>``, the JSON object
``{"d": data, "f": flash values, "c": created, "a": last write}`` (times in Unix seconds)
in which every value is serialized with the ``tagged`` serializer, and with a storage TTL
equal to what is left of the absolute lifetime or the idle timeout, whichever ends first.

Values stay serialized (``msgspec.Raw``) while a session is in memory: a request
decodes only the values it reads and re-encodes only those it sets.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import msgspec
from msgspec import Raw

from kvstorage import (
    ConditionFailedError,
    Driver,
    SerializationError,
    Storage,
    TaggedSerializer,
    create_storage,
    normalize_key,
)

from .cookies import CookieOptions
from .session import Session

__all__ = ["SessionManager"]

logger = logging.getLogger("sessions")

#: ``secrets.token_urlsafe(32)``: 256 random bits as 43 URL-safe characters.
_ID = re.compile(r"[A-Za-z0-9_-]{43}")
_SALT = secrets.token_bytes(16)
_RETRIES = 50
_serializer = TaggedSerializer()
_TOO_LATE = (
    "a session that needs a new ID was changed after the response started; not saved "
    "(change the session before sending the response)"
)


def fingerprint(session_id: str) -> str:
    """A short salted hash of ``session_id`` for logs (the salt changes per process), so
    log lines about one session can be matched without the ID ever being written."""
    return hashlib.blake2s(session_id.encode(), key=_SALT, digest_size=4).hexdigest()


def _seconds(value: float | timedelta | None, name: str) -> float | None:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return seconds


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class _Document(msgspec.Struct):
    d: dict[str, Raw]
    f: dict[str, Raw]
    c: float
    a: float


_encode_document = msgspec.json.Encoder().encode
_decode_document = msgspec.json.Decoder(_Document).decode


@dataclass(frozen=True, slots=True)
class Stored:
    """A session as read from the storage (values still serialized)."""

    data: dict[str, Raw]
    flash: dict[str, Raw]
    created: float
    accessed: float
    etag: str | None  # None after our own write (the storage does not return the new etag)


class SessionManager:
    """Creates sessions from cookie values and commits them to a storage.

    Args:
        storage: a :class:`~kvstorage.Storage` (or ``prefix_storage`` view), a driver, or
            a driver URL. Default: the URL in ``$KVSTORAGE_URL`` if set, else an
            ``FSDriver`` at ``./.sessions`` (created on first use).
        prefix: sessions are stored at ``<prefix>:<id>``.
        ttl: absolute lifetime of a session (seconds or ``timedelta``), counted from its
            creation; None for no limit.
        idle_timeout: a session not written for this long expires; None for no limit.
        refresh_fraction: with ``idle_timeout``, a request that only reads refreshes the
            idle timer (one write, and the cookie is re-sent) once this fraction of the
            idle window has passed since the last write -- not on every request.
        cookie: the cookie's name and attributes.

    Both limits are checked when a session is loaded and are given to the storage as the
    item's TTL, so expired sessions disappear from every backend without a cleanup job.
    """

    def __init__(
        self,
        storage: Storage | Driver | str | None = None,
        *,
        prefix: str = "session",
        ttl: float | timedelta | None = None,
        idle_timeout: float | timedelta | None = None,
        refresh_fraction: float = 0.25,
        cookie: CookieOptions | None = None,
    ) -> None:
        self.prefix = normalize_key(prefix)
        self.ttl = _seconds(ttl, "ttl")
        self.idle_timeout = _seconds(idle_timeout, "idle_timeout")
        if not 0 <= refresh_fraction < 1:
            raise ValueError("refresh_fraction must be at least 0 and less than 1")
        self.refresh_fraction = refresh_fraction
        self.cookie = cookie if cookie is not None else CookieOptions()
        self._owns_storage = not isinstance(storage, Storage)
        self._corrupt_reported: dict[str, None] = {}
        if storage is None or isinstance(storage, Storage):
            self._storage = storage
        else:
            self._storage = create_storage(storage, serializer="tagged")

    def __repr__(self) -> str:
        return f"<SessionManager prefix={self.prefix!r} storage={self._storage!r}>"

    @property
    def storage(self) -> Storage:
        """The storage holding the sessions (the default one is created on first use)."""
        if self._storage is None:
            url = os.environ.get("KVSTORAGE_URL") or "file://./.sessions"
            self._storage = create_storage(url, serializer="tagged")
            logger.info("sessions are stored in %s", _redact(url))
        return self._storage

    async def dispose(self) -> None:
        """Close the storage if this manager created it (not one it was given)."""
        if self._owns_storage and self._storage is not None:
            await self._storage.dispose()

    # -- IDs ----------------------------------------------------------------------------

    @staticmethod
    def is_valid_id(value: str) -> bool:
        """True when ``value`` has the form of a session ID (says nothing about whether
        such a session exists)."""
        return _ID.fullmatch(value) is not None

    def _new_id(self) -> str:
        return secrets.token_urlsafe(32)

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}:{session_id}"

    def open(self, cookie_value: str | Sequence[str] | None) -> Session:
        """The session for a request carrying ``cookie_value`` (None: no cookie). No I/O:
        the data is loaded when first read. A value that is not a well-formed ID is
        ignored, as if there were no cookie; of several values (a request may carry the
        cookie more than once), the first well-formed one is used."""
        if isinstance(cookie_value, str):
            cookie_value = [cookie_value]
        for value in cookie_value or ():
            if _ID.fullmatch(value) is not None:
                return Session(self, value)
        return Session(self, None)

    # -- the stored form ----------------------------------------------------------------

    def _encode(self, value: Any) -> Raw:
        return Raw(_serializer.dumps(value))

    def _decode(self, raw: Raw, key: str, default: Any) -> Any:
        try:
            return _serializer.loads(bytes(raw))
        except SerializationError as exc:
            logger.warning("session value %r is corrupt (%s); ignored", key, exc)
            return default

    def _report_once(self, session_id: str, exc: Exception) -> None:
        """Log corrupt data once per session (of the last 1024), not on every request."""
        reported = self._corrupt_reported
        if session_id in reported:
            return
        reported[session_id] = None
        if len(reported) > 1024:
            del reported[next(iter(reported))]
        logger.warning(
            "session %s: stored data is corrupt (%s); starting a new session",
            fingerprint(session_id),
            exc,
        )

    def _refresh_due(self, stored: Stored) -> bool:
        idle = self.idle_timeout
        return idle is not None and time.time() - stored.accessed >= idle * self.refresh_fraction

    async def _read(self, session_id: str) -> Stored | None:
        """The live session stored under ``session_id``, or None (missing, expired or
        corrupt -- corrupt data is logged and treated as missing)."""
        entry = await self.storage.get_entry_raw(self._key(session_id))
        if entry is None:
            return None
        try:
            document = _decode_document(entry.value)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._report_once(session_id, exc)
            return None
        stored = Stored(document.d, document.f, document.c, document.a, entry.etag)
        now = time.time()
        if self.ttl is not None and now >= stored.created + self.ttl:
            return None
        if self.idle_timeout is not None and now >= stored.accessed + self.idle_timeout:
            return None
        return stored

    async def _write(
        self,
        session_id: str,
        data: dict[str, Raw],
        flash: dict[str, Raw],
        created: float,
        *,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> Stored | None:
        """Store a session; None (nothing written) when its absolute lifetime is over."""
        now = time.time()
        limits = [self.ttl + created - now] if self.ttl is not None else []
        if self.idle_timeout is not None:
            limits.append(self.idle_timeout)
        ttl = min(limits) if limits else None
        if ttl is not None and ttl <= 0:
            return None
        raw = _encode_document(_Document(data, flash, created, now))
        await self.storage.set_item_raw(
            self._key(session_id), raw, ttl=ttl, if_absent=if_absent, if_match=if_match
        )
        return Stored(data, flash, created, now, etag=None)

    # -- commit -------------------------------------------------------------------------

    async def commit(self, session: Session, *, headers_sent: bool = False) -> list[str]:
        """Persist the request's changes to ``session``; return the ``Set-Cookie`` header
        values to send (often none).

        Changes are applied key by key to the version stored now, with a conditional
        write, re-read and re-applied if another request wrote in between: concurrent
        requests that change different keys all keep their changes. A session that was
        alive when this request loaded it and is gone now (destroyed or expired
        meanwhile) stays gone: the changes are dropped.

        Pass ``headers_sent=True`` when the response headers are already out: changes to
        an existing session are still saved, but a session that would need a new ID (a
        new session, :meth:`Session.regenerate`) cannot reach the client and is not
        written (a warning is logged). The session can be committed again later.
        """
        if headers_sent and session._new_id is not None:
            logger.warning(_TOO_LATE)
            return []  # keep the old ID and its data: the new one cannot reach the client
        cookie_id: str | None = None
        if session._changes or session._cleared or session._new_id is not None:
            cookie_id = await self._save(session, headers_sent=headers_sent)
        elif session._refresh and session._base is not None and session._id is not None:
            cookie_id = await self._refresh(session)
        storage = self.storage
        for doomed in session._doomed:
            await storage.remove_item(self._key(doomed))
            logger.debug("session %s removed", fingerprint(doomed))
        session._doomed.clear()
        destroyed, session._destroyed = session._destroyed, False
        if headers_sent:
            return []
        if cookie_id is not None:
            return [self.cookie.set_header(cookie_id)]
        return [self.cookie.expire_header()] if destroyed else []

    async def _save(self, session: Session, *, headers_sent: bool) -> str | None:
        """Write the changes; return the ID to send in a cookie (new or refreshed)."""
        if session._new_id is not None:  # regenerate(): the data moves to a new ID
            data, flash = session._merged(session._base)
            created = session._base.created if session._base is not None else time.time()
            return await self._create(session, data, flash, created, session._new_id)
        await session._load()  # a write-only request has read nothing yet
        if session._base is None or session._id is None:  # a new session
            data, flash = session._merged(None)
            if not data and not flash:  # e.g. only deletes: nothing worth a session
                session._changes.clear()
                session._cleared = False
                return None
            if headers_sent:
                logger.warning(_TOO_LATE)
                return None
            return await self._create(session, data, flash, time.time(), self._new_id())
        return await self._update(session, session._id, session._base)

    async def _create(
        self,
        session: Session,
        data: dict[str, Raw],
        flash: dict[str, Raw],
        created: float,
        session_id: str,
    ) -> str | None:
        while True:
            try:
                stored = await self._write(session_id, data, flash, created, if_absent=True)
            except ConditionFailedError:  # 256 random bits collided: astronomically rare
                session_id = self._new_id()
                continue
            break
        self._settle(session, session_id, stored)
        if stored is None:
            return None
        logger.debug("session %s created", fingerprint(session_id))
        return session_id

    async def _update(self, session: Session, session_id: str, base: Stored) -> str | None:
        refresh = self._refresh_due(base)
        current: Stored | None = base
        for attempt in range(_RETRIES):
            if current is None or current.etag is None:
                current = await self._read(session_id)
                if current is None:  # destroyed or expired meanwhile: do not recreate
                    logger.info(
                        "session %s ended during the request; its changes were dropped",
                        fingerprint(session_id),
                    )
                    self._settle(session, None, None)
                    return None
            data, flash = session._merged(current)
            try:
                stored = await self._write(
                    session_id, data, flash, current.created, if_match=current.etag
                )
            except ConditionFailedError:
                current = None
                await anyio.sleep(random.random() * min(0.0005 * 2**attempt, 0.02))
                continue
            self._settle(session, session_id if stored else None, stored)
            return session_id if stored is not None and refresh else None
        raise ConditionFailedError(
            f"session {fingerprint(session_id)} kept changing; gave up after {_RETRIES} tries"
        )

    async def _refresh(self, session: Session) -> str | None:
        """Extend the idle timeout of an unchanged session (one conditional write)."""
        base, session_id = session._base, session._id
        assert base is not None and session_id is not None
        session._refresh = False
        if base.etag is None:
            return None  # written by this very request already
        try:
            stored = await self._write(
                session_id, base.data, base.flash, base.created, if_match=base.etag
            )
        except ConditionFailedError:
            return None  # somebody else wrote (and so refreshed) it, or it is gone
        if stored is None:
            return None
        session._base = stored
        return session_id

    @staticmethod
    def _settle(session: Session, session_id: str | None, stored: Stored | None) -> None:
        """Make ``session`` reflect what was just committed."""
        session._id, session._base = (session_id, stored) if stored else (None, None)
        session._new_id = None
        session._loaded = True
        session._changes.clear()
        session._cleared = session._refresh = False
