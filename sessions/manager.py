"""`SessionManager`: the configuration of an application's sessions, the session of each
request (:meth:`~SessionManager.open`), its commit into response headers, and what an app
does with the sessions of one user ("your devices", "log out everywhere").

Where sessions are stored is :mod:`sessions.store`'s business; what a commit does to the
stored session is :class:`~sessions.session.Session`'s.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import anyio

from kvstorage import Driver, Storage

from .cookies import CookieOptions
from .session import Lifetime, Session, seconds
from .store import SessionStore, Stored, handle_of, is_valid_handle, is_valid_id

__all__ = ["SessionInfo", "SessionManager"]

logger = logging.getLogger("sessions")

_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


_DEFAULT_COOKIE = CookieOptions()


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One session of a user, as :meth:`SessionManager.sessions_of` lists it."""

    handle: str
    """Names the session without being its ID (the SHA-256 of the ID): safe to show and
    to put in a form; pass it to :meth:`SessionManager.revoke`."""
    created: float
    """When it started (Unix seconds; a login with ``regenerate()`` starts a new one)."""
    last_active: float
    """When it was last written."""
    expires_at: float | None
    """When it ends unless used again (Unix seconds), or None."""
    meta: dict[str, Any] | None
    """What the app passed to ``set_user(..., meta=...)``."""


class SessionManager:
    """Creates sessions from request IDs and commits them to a storage.

    Args:
        storage: a :class:`~kvstorage.Storage` (or ``prefix_storage`` view), a driver, or
            a driver URL. Default: the URL in ``$KVSTORAGE_URL`` if set, else an
            ``FSDriver`` at ``./.sessions``, created (mode 0700) on first use; a
            ``./.sessions`` that belongs to another user or that group or others may write
            to is refused with a ``PermissionError``.
        prefix: sessions are stored at ``<prefix>:<handle>`` (the handle is a hash of the
            ID: IDs are never stored) and the user index under ``<prefix>-user``.
        ttl: absolute lifetime of a session (seconds or ``timedelta``; default 14 days),
            counted from its creation or its last ``regenerate()``; None for no limit.
        idle_timeout: a session not written for this long expires; None for no limit.
        refresh_fraction: with ``idle_timeout``, a request that only reads refreshes the
            idle timer (one write, and the ID is re-sent) once this fraction of the idle
            window has passed since the last write -- not on every request.
        cookie: the cookie's name and attributes; None: no cookie at all (then give
            ``header``).
        header: also take the session ID from this request header (the cookie wins when
            both hold a valid ID) and send a new or regenerated ID back in it -- for APIs
            and mobile apps. An ended session is answered with the header empty.
        encryption_keys: encrypt session data at rest (AES-256-GCM, bound to the storage
            key) with the first of these keys, newest first; every key decrypts, so a new
            key put first rotates them (sessions move to it as they are written). Keys are
            32 bytes or their URL-safe base64 (``kvstorage.wrappers.EncryptedDriver
            .generate_key()``). Needs ``pip install 'kvstorage[encryption]'``.
        sweep_interval: seconds between two opportunistic sweeps of expired sessions run
            after a commit (at most one at a time per manager), for backends that do not
            expire items themselves; None: never (run ``kvstorage sweep`` from cron).

    Both limits are checked when a session is loaded and are given to the storage as the
    item's TTL, so expired sessions disappear from every backend.

    Raises:
        ValueError: a bad limit, no way to carry the ID (``cookie=None`` without
            ``header``), or an invalid header name.
    """

    def __init__(
        self,
        storage: Storage | Driver | str | None = None,
        *,
        prefix: str = "session",
        ttl: float | timedelta | None = timedelta(days=14),
        idle_timeout: float | timedelta | None = None,
        refresh_fraction: float = 0.25,
        cookie: CookieOptions | None = _DEFAULT_COOKIE,
        header: str | None = None,
        encryption_keys: Sequence[bytes | str] | None = None,
        sweep_interval: float | None = 600.0,
    ) -> None:
        self.lifetime = Lifetime(
            seconds(ttl, "ttl"), seconds(idle_timeout, "idle_timeout"), refresh_fraction
        )
        """The limits every session of this manager enforces (unless it has its own)."""
        if cookie is None and header is None:
            raise ValueError("with cookie=None, give a header to carry the session ID")
        if header is not None and not _HEADER_NAME.fullmatch(header):
            raise ValueError(f"invalid header name {header!r}")
        self.cookie = cookie
        """The session cookie's name and attributes (None: no cookie)."""
        self.header = header.lower() if header is not None else None
        """The request/response header carrying the session ID, lower-case, or None."""
        if sweep_interval is not None and not sweep_interval > 0:
            raise ValueError("sweep_interval must be a positive number of seconds or None")
        self.sweep_interval = sweep_interval
        self.store = SessionStore(storage, prefix=prefix, encryption_keys=encryption_keys)
        """Where the sessions are kept."""
        self._next_sweep = time.monotonic() + (sweep_interval or 0.0)
        self._sweeping = False

    def __repr__(self) -> str:
        return f"<SessionManager {self.store!r}>"

    @property
    def prefix(self) -> str:
        """Sessions are stored at ``<prefix>:<handle>``."""
        return self.store.prefix

    @property
    def ttl(self) -> float | None:
        """The absolute lifetime of a session in seconds, or None."""
        return self.lifetime.ttl

    @property
    def idle_timeout(self) -> float | None:
        """Seconds without a write after which a session expires, or None."""
        return self.lifetime.idle_timeout

    @property
    def refresh_fraction(self) -> float:
        """The part of the idle window after which a read refreshes the idle timer."""
        return self.lifetime.refresh_fraction

    @property
    def storage(self) -> Storage:
        """The storage holding the sessions (the default one is created on first use)."""
        return self.store.storage

    async def dispose(self) -> None:
        """Close the storage if this manager created it (not one it was given)."""
        await self.store.dispose()

    @staticmethod
    def is_valid_id(value: str) -> bool:
        """True when ``value`` has the form of a session ID (says nothing about whether
        such a session exists)."""
        return is_valid_id(value)

    # -- one request --------------------------------------------------------------------

    def open(self, cookie_value: str | Sequence[str] | None) -> Session:
        """The session for a request carrying ``cookie_value`` (None: no ID; a header
        value works the same). No I/O: the data is loaded when first read. A value that is
        not a well-formed ID is ignored, as if there were none; of several values (a
        request may carry the cookie more than once), the first well-formed one is used."""
        if isinstance(cookie_value, str):
            cookie_value = [cookie_value]
        for value in cookie_value or ():
            if is_valid_id(value):
                return Session(self.store, self.lifetime, value)
        return Session(self.store, self.lifetime, None)

    async def commit(self, session: Session, *, headers_sent: bool = False) -> list[str]:
        """Persist the request's changes to ``session`` (see :meth:`Session.save`); return
        the ``Set-Cookie`` header values to send (often none).

        Pass ``headers_sent=True`` when the response headers are already out: changes to
        an existing session are still saved, but a session that would need a new ID (a
        new session, :meth:`Session.regenerate`) cannot reach the client and is not
        written (a warning is logged). The session can be committed again later.
        """
        headers = await self.commit_headers(session, headers_sent=headers_sent)
        return [value for name, value in headers if name == "set-cookie"]

    async def commit_headers(
        self, session: Session, *, headers_sent: bool = False
    ) -> list[tuple[str, str]]:
        """Like :meth:`commit`, but return every response header to add as ``(name,
        value)`` pairs: ``set-cookie`` and, with ``header=``, that header."""
        saved = await session.save(headers_sent=headers_sent)
        if headers_sent or (saved.cookie_id is None and not saved.ended):
            return []
        headers: list[tuple[str, str]] = []
        if self.cookie is not None:
            if saved.cookie_id is not None:
                value = self.cookie.set_header(saved.cookie_id, max_age=saved.max_age)
            else:
                value = self.cookie.expire_header()
            headers.append(("set-cookie", value))
        if self.header is not None:
            headers.append((self.header, saved.cookie_id or ""))
        return headers

    # -- the sessions of a user ---------------------------------------------------------

    def _info(self, handle: str, stored: Stored | None, now: float) -> SessionInfo | None:
        if stored is None or not stored.live or not self.lifetime.alive(stored, now):
            return None
        limits = self.lifetime.of(stored)
        ends = [stored.created + limits.ttl] if limits.ttl is not None else []
        if limits.idle_timeout is not None:
            ends.append(stored.accessed + limits.idle_timeout)
        expires = min(ends) if ends else None
        return SessionInfo(handle, stored.created, stored.accessed, expires, stored.user_meta)

    async def sessions_of(self, user_id: str) -> list[SessionInfo]:
        """Every live session bound to ``user_id`` (:meth:`Session.set_user`), oldest
        first: one listing of that user's index (never a scan of all sessions) and one
        read per session. Entries of sessions that ended are dropped from the index."""
        handles = await self.store.handles_of(user_id)
        found: dict[str, Stored | None] = {}

        async def read(handle: str) -> None:
            found[handle] = await self.store.read(handle)

        async with anyio.create_task_group() as group:
            for handle in handles:
                group.start_soon(read, handle)
        now = time.time()
        infos, stale = [], []
        for handle in handles:
            stored = found[handle]
            info = self._info(handle, stored, now)
            if info is not None and stored is not None and stored.user == user_id:
                infos.append(info)
            else:
                stale.append(handle)
        if stale:
            await self.store.unbind(user_id, *stale)
        return sorted(infos, key=lambda info: info.created)

    async def revoke(self, handle: str) -> bool:
        """End the session ``handle`` (from :meth:`sessions_of`: "sign out that device"),
        even while requests are using it; True if it was live.

        Raises:
            ValueError: ``handle`` does not have the form of a handle.
        """
        if not isinstance(handle, str) or not is_valid_handle(handle):
            raise ValueError("not a session handle")
        ended = await self.store.kill(handle)
        return ended is not None and self.lifetime.alive(ended, time.time())

    async def revoke_user(self, user_id: str, *, keep: Session | None = None) -> int:
        """End every session bound to ``user_id`` ("log out everywhere"), except ``keep``
        (typically the current request's session); return how many were live. A session
        bound before this call is ended even if a request is regenerating it meanwhile."""
        kept = handle_of(keep.id) if keep is not None and keep.id is not None else None
        count = 0
        for handle in await self.store.handles_of(user_id):
            if handle != kept:
                count += await self.revoke(handle)
        return count

    # -- cleanup ------------------------------------------------------------------------

    async def sweep(self) -> int:
        """Delete expired sessions and the index entries of sessions that are gone; return
        how many items were deleted. For backends that do not expire items by themselves
        (memory, fs, sqlite, s3); run it from cron with ``kvstorage sweep``, or let
        ``sweep_interval`` do it."""
        storage = self.storage
        removed = await storage.sweep(self.prefix) + await storage.sweep(self.store.index_prefix)
        now = time.time()
        for key, handles in await self.store.index_entries():
            dead = [h for h in handles if self._info(h, await self.store.read(h), now) is None]
            if dead:
                await self.store.prune_index(key, dead)
                removed += len(dead)
        return removed

    @property
    def sweep_due(self) -> bool:
        """True when ``sweep_interval`` has passed since the last sweep (and none runs)."""
        return (
            self.sweep_interval is not None
            and not self._sweeping
            and time.monotonic() >= self._next_sweep
        )

    async def sweep_if_due(self) -> None:
        """Run :meth:`sweep` if ``sweep_interval`` has passed since the last one (the
        middleware calls this after each response); errors are logged, not raised."""
        if not self.sweep_due or self.sweep_interval is None:
            return
        self._sweeping = True
        try:
            removed = await self.sweep()
            logger.debug("swept %d expired session items", removed)
        except Exception:
            logger.exception("sweeping expired sessions failed")
        finally:
            self._next_sweep = time.monotonic() + self.sweep_interval
            self._sweeping = False
