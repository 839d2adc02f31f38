"""Shared pieces of the session tests: a counting driver, a Starlette test app, and a real
uvicorn server on a free loopback port."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Sequence
from typing import Any
from urllib.parse import parse_qs

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kvstorage import Driver, Record, Stat
from sessions import Session, SessionManager, SessionMiddleware

from .helpers import eventually


class CountingDriver(Driver):
    """A real driver (any of the matrix) wrapped to log every call: ``ops`` holds
    ``(operation, key)`` in call order."""

    def __init__(self, inner: Driver) -> None:
        self.inner = inner
        self.capabilities = inner.capabilities
        self.name = inner.name  # type: ignore[misc]
        self.ops: list[tuple[str, str]] = []

    def count(self, *names: str) -> int:
        return sum(1 for op, _ in self.ops if not names or op in names)

    @property
    def writes(self) -> int:
        return self.count("set", "set_many", "remove", "remove_many", "touch", "clear")

    async def get(self, key: str) -> Record | None:
        self.ops.append(("get", key))
        return await self.inner.get(key)

    async def head(self, key: str) -> Stat | None:
        self.ops.append(("head", key))
        return await self.inner.head(key)

    async def set(self, key: str, value: bytes, **options: Any) -> None:
        self.ops.append(("set", key))
        await self.inner.set(key, value, **options)

    async def remove(self, key: str) -> bool:
        self.ops.append(("remove", key))
        return await self.inner.remove(key)

    async def scan(self, base: str = "", *, max_depth: int | None = None) -> AsyncGenerator[str]:
        self.ops.append(("scan", base))
        async with contextlib.aclosing(self.inner.scan(base, max_depth=max_depth)) as keys:
            async for key in keys:
                yield key

    async def get_many(self, keys: Sequence[str]) -> list[Record | None]:
        self.ops.append(("get_many", ",".join(keys)))
        return await self.inner.get_many(keys)

    async def touch(self, key: str, *, expires_at: float | None) -> bool:
        self.ops.append(("touch", key))
        return await self.inner.touch(key, expires_at=expires_at)

    async def sweep(self, base: str = "") -> int:
        return await self.inner.sweep(base)

    async def dispose(self) -> None:
        await self.inner.dispose()


def session_of(request: Request) -> Session:
    session = request.scope["session"]
    assert isinstance(session, Session)
    assert request.session is session  # Starlette's accessor sees the same object
    return session


class Gate:
    """Events a handler waits on, so tests can force two requests to overlap."""

    def __init__(self) -> None:
        self.events: dict[str, anyio.Event] = {}

    def __getitem__(self, name: str) -> anyio.Event:
        return self.events.setdefault(name, anyio.Event())


def make_app(
    manager: SessionManager, *, gate: Gate | None = None, persist_on_error: bool = False
) -> Starlette:
    """A small app exposing the session API over HTTP (values are JSON in query strings)."""
    gate = gate or Gate()

    async def get(request: Request) -> Response:
        session = session_of(request)
        key = request.query_params.get("key")
        if key is None:
            return JSONResponse({"items": dict(await session.items()), "id": session.id})
        return JSONResponse({"value": await session.get(key)})

    async def set_(request: Request) -> Response:
        session = session_of(request)
        for key, value in request.query_params.items():
            await session.set(key, value)
        return JSONResponse({"ok": True})

    async def nothing(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def regenerate(request: Request) -> Response:
        await session_of(request).regenerate()
        return JSONResponse({"ok": True})

    async def destroy(request: Request) -> Response:
        await session_of(request).destroy()
        return JSONResponse({"ok": True})

    async def flash(request: Request) -> Response:
        await session_of(request).flash("msg", request.query_params["msg"])
        return JSONResponse({"ok": True})

    async def pop_flash(request: Request) -> Response:
        return JSONResponse({"msg": await session_of(request).pop_flash("msg")})

    async def fail(request: Request) -> Response:
        await session_of(request).set("failed", "yes")
        return JSONResponse({"error": True}, status_code=500)

    async def stream(request: Request) -> Response:
        session = session_of(request)

        async def body() -> AsyncIterator[bytes]:
            yield b"first chunk\n"
            await session.set("streamed", "yes")
            yield b"second chunk\n"

        return StreamingResponse(body())

    async def overlap(request: Request) -> Response:
        """Load, then wait for the other request named in ``wait`` before writing."""
        session = session_of(request)
        me, other = request.query_params["me"], request.query_params["wait"]
        await session.get("anything")
        gate[f"{me}-loaded"].set()
        await gate[f"{other}-{request.query_params.get('after', 'loaded')}"].wait()
        if request.query_params.get("action") == "regenerate":
            await session.regenerate()
        await session.set(me, "written")
        return JSONResponse({"ok": True})

    async def login(request: Request) -> Response:
        """Log in as ``user`` (a new ID, bound to the user); ``remember=1``: 30 days."""
        session = session_of(request)
        await session.regenerate()
        params = request.query_params
        await session.set_user(params["user"], meta={"device": params.get("device", "?")})
        if params.get("remember") == "1":
            await session.set_expiry(ttl=30 * 86400, persistent=True)
        return JSONResponse({"ok": True})

    async def me(request: Request) -> Response:
        session = session_of(request)
        await session.has("anything")  # loads the session: user_id is known after
        return JSONResponse({"user": session.user_id})

    async def devices(request: Request) -> Response:
        session = session_of(request)
        await session.has("anything")
        if session.user_id is None:
            return JSONResponse({"error": "not logged in"}, status_code=401)
        infos = await manager.sessions_of(session.user_id)
        return JSONResponse([{"handle": i.handle, "meta": i.meta} for i in infos])

    async def revoke(request: Request) -> Response:
        return JSONResponse({"ended": await manager.revoke(request.query_params["handle"])})

    async def logout_everywhere(request: Request) -> Response:
        session = session_of(request)
        await session.has("anything")
        assert session.user_id is not None
        return JSONResponse({"ended": await manager.revoke_user(session.user_id, keep=session)})

    async def csrf(request: Request) -> Response:
        return JSONResponse({"token": await session_of(request).csrf_token()})

    async def form(request: Request) -> Response:
        session = session_of(request)
        fields = parse_qs((await request.body()).decode())
        token = fields.get("csrf", [None])[-1]
        if not await session.verify_csrf(token):
            return JSONResponse({"error": "bad CSRF token"}, status_code=403)
        await session.set("posted", "yes")
        return JSONResponse({"ok": True})

    routes = [
        Route("/login", login, methods=["POST"]),
        Route("/me", me),
        Route("/devices", devices),
        Route("/revoke", revoke, methods=["POST"]),
        Route("/logout_everywhere", logout_everywhere, methods=["POST"]),
        Route("/csrf", csrf),
        Route("/form", form, methods=["POST"]),
        Route("/get", get),
        Route("/set", set_, methods=["POST"]),
        Route("/nothing", nothing),
        Route("/regenerate", regenerate, methods=["POST"]),
        Route("/destroy", destroy, methods=["POST"]),
        Route("/flash", flash, methods=["POST"]),
        Route("/pop_flash", pop_flash, methods=["POST"]),
        Route("/fail", fail, methods=["POST"]),
        Route("/stream", stream, methods=["POST"]),
        Route("/overlap", overlap, methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(SessionMiddleware, manager=manager, persist_on_error=persist_on_error)
    return app


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None]:
        yield  # leave the test runner's signal handlers alone


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Run ``app`` under a real uvicorn server on a free loopback port (asyncio only);
    yield its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = _Server(config)
    async with anyio.create_task_group() as group:
        group.start_soon(server.serve)

        async def started() -> bool:
            return server.started

        await eventually(started, within=10)
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True


async def live_keys(manager: SessionManager) -> list[str]:
    """The storage keys of the live sessions (not the markers ended or regenerated
    sessions leave for a while), sorted."""
    keys = []
    for key in await manager.storage.get_keys(manager.prefix):
        stored = await manager.store.read(key.rsplit(":", 1)[1])
        if stored is not None and stored.live:
            keys.append(key)
    return sorted(keys)
