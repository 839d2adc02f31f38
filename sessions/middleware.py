"""`SessionMiddleware`: plain ASGI, so it works under Starlette, FastAPI or any ASGI app."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .manager import SessionManager

__all__ = ["SessionMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


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
        status: int | None = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if status < 500 or self.persist_on_error:
                    cookies = await manager.commit(session)
                    if cookies:
                        headers = [
                            (k, v) for k, v in message.get("headers", ()) if k != b"cache-control"
                        ]
                        headers += [(b"set-cookie", c.encode("latin-1")) for c in cookies]
                        headers.append((b"cache-control", b"no-store"))
                        message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_wrapper)
        # Changes made after the headers went out (streaming body, background task, WebSocket).
        responded = status is not None and (status < 500 or self.persist_on_error)
        if session.modified and (responded or scope["type"] == "websocket"):
            await manager.commit(session, headers_sent=True)
