"""Server-side web sessions on top of kvstorage: a random ID in a cookie, the data in a
storage, loaded lazily and committed without lost updates.

>>> from sessions import SessionManager, SessionMiddleware, CookieOptions
>>> manager = SessionManager(ttl=8 * 3600, idle_timeout=1800)  # doctest: +SKIP
>>> app = SessionMiddleware(app, manager)                        # doctest: +SKIP

``sessions`` imports neither Starlette nor FastAPI; ``get_session`` and ``SessionDep``
(FastAPI dependencies) are imported from :mod:`sessions.dependency` on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cookies import CookieOptions
from .manager import SessionInfo, SessionManager
from .middleware import SessionMiddleware
from .session import Session

if TYPE_CHECKING:
    from .dependency import SessionDep, get_session

__all__ = [
    "CookieOptions",
    "Session",
    "SessionInfo",
    "SessionDep",
    "SessionManager",
    "SessionMiddleware",
    "get_session",
]


def __getattr__(name: str) -> Any:
    if name in ("get_session", "SessionDep"):
        from . import dependency

        return getattr(dependency, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
