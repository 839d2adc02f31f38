"""The load-test app: every request increments a counter kept in the client's session.

Run under several uvicorn workers sharing one store named by ``KVSTORAGE_URL``:
``KVSTORAGE_URL=sqlite:///load.db uvicorn tests.support.load.app:app --workers 4``.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from sessions import CookieOptions, SessionManager, SessionMiddleware


async def increment(request: Request) -> PlainTextResponse:
    """Add one to this session's counter and return the new value."""
    session = request.scope["session"]
    count = await session.get("count", default=0) + 1
    await session.set("count", count)
    return PlainTextResponse(str(count))


async def read(request: Request) -> PlainTextResponse:
    """Return this session's counter without changing anything."""
    return PlainTextResponse(str(await request.scope["session"].get("count", default=0)))


manager = SessionManager(cookie=CookieOptions(secure=False), idle_timeout=3600)
app = SessionMiddleware(
    Starlette(routes=[Route("/incr", increment), Route("/count", read)]), manager
)
