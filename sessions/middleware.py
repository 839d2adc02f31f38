"""`SessionMiddleware`: plain ASGI, so it works under Starlette, FastAPI or any ASGI app."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from .manager import SessionManager

__all__ = ["SessionMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Header = tuple[bytes, bytes]


def _cookie_values(scope: Scope, name: str) -> list[str]:
    """Every value of the cookie ``name`` in the request, in the order sent."""
    values = []
    for header, value in scope["headers"]:
        if header == b"cookie":
            for pair in value.decode("latin-1").split(";"):
                key, sep, val = pair.partition("=")
                if sep and key.strip() == name:
                    values.append(val.strip())
    return values


def _with_cookies(headers: Iterable[Header], cookies: list[str]) -> list[Header]:
    """``headers`` with the ``Set-Cookie`` values and ``Cache-Control: no-store`` (in place
    of any other ``Cache-Control``: a response that sets the session cookie is private)."""
    kept = [(name, value) for name, value in headers if name != b"cache-control"]
    kept += [(b"set-cookie", cookie.encode("latin-1")) for cookie in cookies]
    kept.append((b"cache-control", b"no-store"))
    return kept


class SessionMiddleware:
    """Puts a :class:`Session` in ``scope["session"]`` (Starlette: ``request.session``)
    and commits it when the response starts.

    ``app.add_middleware(SessionMiddleware, manager=manager)`` under Starlette/FastAPI,
    or ``app = SessionMiddleware(app, manager)`` for any ASGI app.

    - The ``Set-Cookie`` header (and ``Cache-Control: no-store`` with it) is added to the
      ``http.response.start`` message, before the headers go out.
    - Changes made after that (in a streaming body, a background task, a WebSocket) are
      committed again when the app returns -- unless they need a new session ID (a new
      session or ``regenerate()``), which the client could no longer receive: those are
      dropped with a warning. Write the session before starting the response.
    - Nothing is committed for a 5xx response or an exception, unless
      ``persist_on_error=True``.
    - If the request carries several cookies of that name (cookie tossing from a
      subdomain, or stale paths), the first well-formed one wins; name the cookie
      ``__Host-session`` to make that impossible.
    """

    def __init__(
        self,
        app: ASGIApp,
        manager: SessionManager | None = None,
        *,
        persist_on_error: bool = False,
    ) -> None:
        self.app = app
        self.manager = manager if manager is not None else SessionManager()
        self.persist_on_error = persist_on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        manager = self.manager
        session = manager.open(_cookie_values(scope, manager.cookie.name))
        scope["session"] = session
        # Whether this request's session is saved at all: decided once, by the status of
        # the response (a WebSocket has none: always).
        persist = scope["type"] == "websocket"

        async def send_wrapper(message: Message) -> None:
            nonlocal persist
            if message["type"] == "http.response.start":
                persist = message["status"] < 500 or self.persist_on_error
                if persist and (cookies := await manager.commit(session)):
                    message["headers"] = _with_cookies(message.get("headers", ()), cookies)
            await send(message)

        await self.app(scope, receive, send_wrapper)
        if persist and session.modified:  # changed after the headers went out
            await manager.commit(session, headers_sent=True)
