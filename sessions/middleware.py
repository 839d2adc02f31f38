"""`SessionMiddleware`: plain ASGI, so it works under Starlette, FastAPI or any ASGI app."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from .manager import SessionManager

__all__ = ["SessionMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Header = tuple[bytes, bytes]

_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class _Request:
    """What the middleware needs from the request headers, read in one pass."""

    __slots__ = ("fetch_site", "host", "ids", "origin")

    def __init__(self, scope: Scope, cookie: str | None, header: bytes | None) -> None:
        self.ids: list[str] = []
        self.origin = self.host = self.fetch_site = b""
        from_header = None
        for name, value in scope["headers"]:
            if name == b"cookie" and cookie is not None:
                for pair in value.decode("latin-1").split(";"):
                    key, sep, val = pair.partition("=")
                    if sep and key.strip() == cookie:
                        self.ids.append(val.strip())
            elif name == header:
                from_header = value.decode("latin-1")
            elif name == b"origin":
                self.origin = value
            elif name == b"host":
                self.host = value
            elif name == b"sec-fetch-site":
                self.fetch_site = value
        if from_header is not None:  # the cookie wins when both hold a valid ID
            self.ids.append(from_header)

    def cross_site(self) -> bool:
        """True when a browser says the request comes from another origin: its
        ``Origin`` differs from the request's own, or (without ``Origin``)
        ``Sec-Fetch-Site`` is ``cross-site`` or ``same-site`` (a sibling subdomain)."""
        if self.origin:
            origin = self.origin.decode("latin-1")
            netloc = urlsplit(origin).netloc.lower()
            return (
                origin == "null" or not self.host or netloc != self.host.decode("latin-1").lower()
            )
        return self.fetch_site in (b"cross-site", b"same-site")


def _with_headers(headers: Iterable[Header], added: list[tuple[str, str]]) -> list[Header]:
    """``headers`` with ``added`` and ``Cache-Control: no-store`` (in place of any other
    ``Cache-Control``: a response that sets a session ID is private)."""
    kept = [(name, value) for name, value in headers if name != b"cache-control"]
    kept += [(name.encode("latin-1"), value.encode("latin-1")) for name, value in added]
    kept.append((b"cache-control", b"no-store"))
    return kept


def _with_vary(headers: Iterable[Header], varies: bytes) -> list[Header]:
    """``headers`` with ``varies`` added to ``Vary`` (a page built from the session must
    not be served from a shared cache to another user)."""
    kept = headers if isinstance(headers, list) else list(headers)
    for index, (name, value) in enumerate(kept):
        if name == b"vary":
            if varies.lower() not in value.lower():
                kept[index] = (name, value + b", " + varies)
            return kept
    kept.append((b"vary", varies))
    return kept


class SessionMiddleware:
    """Puts a :class:`Session` in ``scope["session"]`` (Starlette: ``request.session``)
    and commits it when the response starts.

    ``app.add_middleware(SessionMiddleware, manager=manager)`` under Starlette/FastAPI,
    or ``app = SessionMiddleware(app, manager)`` for any ASGI app.

    - The ``Set-Cookie`` header (or the manager's ID header), with ``Cache-Control:
      no-store``, is added to the ``http.response.start`` message, before the headers go
      out. A response of a request that used the session carries ``Vary: Cookie``.
    - With ``check_origin`` (the default), a POST, PUT, PATCH or DELETE that a browser
      marks as coming from another site (its ``Origin``, or without one its
      ``Sec-Fetch-Site``) is answered 403 before the app runs: a cross-site form cannot
      act with the user's session. Requests without those headers (not from a browser)
      pass; use :meth:`Session.verify_csrf` in forms as well.
    - Changes made after the response started (in a streaming body, a background task, a
      WebSocket) are committed again when the app returns -- unless they need a new
      session ID (a new session or ``regenerate()``), which the client could no longer
      receive: those are dropped with a warning. Write the session before starting the
      response.
    - Nothing is committed for a 5xx response or an exception, unless
      ``persist_on_error=True``.
    - After the response, expired sessions are swept when the manager's
      ``sweep_interval`` has passed.
    - If the request carries several cookies of that name (cookie tossing from a
      subdomain, or stale paths), the first well-formed one wins; the default name
      ``__Host-session`` makes that impossible.
    """

    def __init__(
        self,
        app: ASGIApp,
        manager: SessionManager | None = None,
        *,
        check_origin: bool = True,
        persist_on_error: bool = False,
    ) -> None:
        self.app = app
        self.manager = manager if manager is not None else SessionManager()
        self.check_origin = check_origin
        self.persist_on_error = persist_on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        manager = self.manager
        cookie = manager.cookie.name if manager.cookie is not None else None
        header = manager.header.encode("latin-1") if manager.header is not None else None
        request = _Request(scope, cookie, header)
        if self.check_origin and scope.get("method") in _UNSAFE and request.cross_site():
            await send({"type": "http.response.start", "status": 403, "headers": []})
            await send({"type": "http.response.body", "body": b"cross-site request refused"})
            return
        session = manager.open(request.ids)
        scope["session"] = session
        varies = b"Cookie" if manager.cookie is not None else str(manager.header).encode()
        # Whether this request's session is saved at all: decided once, by the status of
        # the response (a WebSocket has none: always).
        persist = scope["type"] == "websocket"

        async def send_wrapper(message: Message) -> None:
            nonlocal persist
            if message["type"] == "http.response.start":
                persist = message["status"] < 500 or self.persist_on_error
                headers = message.get("headers", ())
                if persist and (added := await manager.commit_headers(session)):
                    headers = _with_headers(headers, added)
                if session.used:
                    headers = _with_vary(headers, varies)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_wrapper)
        if persist and session.modified:  # changed after the headers went out
            await manager.commit(session, headers_sent=True)
        if persist and manager.sweep_due:
            await manager.sweep_if_due()
