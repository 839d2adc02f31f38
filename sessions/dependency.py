"""FastAPI/Starlette helpers, imported only when used (``sessions`` itself needs neither)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from .session import Session

__all__ = ["SessionDep", "get_session"]


def get_session(connection: HTTPConnection) -> Session:
    """FastAPI dependency returning the request's session:
    ``async def view(session: Session = Depends(get_session))``.

    Raises:
        RuntimeError: :class:`~sessions.SessionMiddleware` is not installed.
    """
    session = connection.scope.get("session")
    if not isinstance(session, Session):
        raise RuntimeError("no session: add SessionMiddleware to the application")
    return session


#: ``async def view(session: SessionDep)`` -- the same as ``Depends(get_session)``.
SessionDep = Annotated[Session, Depends(get_session)]
