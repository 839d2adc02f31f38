"""`SessionManager`: the configuration of an application's sessions, the session of each
request (:meth:`~SessionManager.open`) and its commit into ``Set-Cookie`` headers.

Where sessions are stored is :mod:`sessions.store`'s business; what a commit does to the
stored session is :class:`~sessions.session.Session`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from kvstorage import Driver, Storage

from .cookies import CookieOptions
from .session import Lifetime, Session
from .store import SessionStore, is_valid_id

__all__ = ["SessionManager"]


def _seconds(value: float | timedelta | None) -> float | None:
    if isinstance(value, timedelta):
        return value.total_seconds()
    return None if value is None else float(value)


class SessionManager:
    """Creates sessions from cookie values and commits them to a storage.

    Args:
        storage: a :class:`~kvstorage.Storage` (or ``prefix_storage`` view), a driver, or
            a driver URL. Default: the URL in ``$KVSTORAGE_URL`` if set, else an
            ``FSDriver`` at ``./.sessions``, created (mode 0700) on first use; a
            ``./.sessions`` that belongs to another user or that group or others may write
            to is refused with a ``PermissionError``.
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
        self.lifetime = Lifetime(_seconds(ttl), _seconds(idle_timeout), refresh_fraction)
        """The limits every session of this manager enforces."""
        self.cookie = cookie if cookie is not None else CookieOptions()
        """The session cookie's name and attributes."""
        self.store = SessionStore(storage, prefix=prefix)
        """Where the sessions are kept."""

    def __repr__(self) -> str:
        return f"<SessionManager {self.store!r}>"

    @property
    def prefix(self) -> str:
        """Sessions are stored at ``<prefix>:<id>``."""
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

    def open(self, cookie_value: str | Sequence[str] | None) -> Session:
        """The session for a request carrying ``cookie_value`` (None: no cookie). No I/O:
        the data is loaded when first read. A value that is not a well-formed ID is
        ignored, as if there were no cookie; of several values (a request may carry the
        cookie more than once), the first well-formed one is used."""
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
        saved = await session.save(headers_sent=headers_sent)
        if headers_sent:
            return []
        if saved.cookie_id is not None:
            return [self.cookie.set_header(saved.cookie_id)]
        return [self.cookie.expire_header()] if saved.ended else []
