"""Session middleware benchmark: requests/s of one Starlette app, in process through
``httpx.ASGITransport``, for

* a read-only request (``get`` one key) and a read-write request (``get`` + ``set``),
* with ``sessions.SessionMiddleware`` on memory (and on Redis when a URL is given),
* beside the same app with no session middleware (the floor: framework + client cost),
* beside starsessions (its in-memory store, and its ``RedisStore`` on the same Redis).

Every request carries the cookie of one existing session. Run alone with
``python -m benchmarks.sessions [--quick] [--redis redis://127.0.0.1:PORT/0]``.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

Handler = Callable[[Request], Awaitable[Response]]
App = Any  # an ASGI application


def _app(read: Handler, write: Handler) -> Starlette:
    return Starlette(routes=[Route("/read", read), Route("/write", write, methods=["POST"])])


def plain_app() -> App:
    """The same routes and responses without sessions."""

    async def read(request: Request) -> Response:
        return JSONResponse({"n": 0})

    async def write(request: Request) -> Response:
        return JSONResponse({"n": 1})

    return _app(read, write)


def kvstorage_app(storage_url: str) -> tuple[App, Callable[[], Awaitable[None]]]:
    """The app with our middleware on ``storage_url``; (app, close)."""
    from sessions import SessionManager, SessionMiddleware

    async def read(request: Request) -> Response:
        session = request.scope["session"]
        return JSONResponse({"n": await session.get("n", 0)})

    async def write(request: Request) -> Response:
        session = request.scope["session"]
        n = await session.get("n", 0) + 1
        await session.set("n", n)
        return JSONResponse({"n": n})

    manager = SessionManager(storage_url)
    app = _app(read, write)
    app.add_middleware(SessionMiddleware, manager=manager)
    return app, manager.dispose


def starsessions_app(redis_url: str | None) -> tuple[App, Callable[[], Awaitable[None]]]:
    """The app with starsessions (in-memory store, or RedisStore on ``redis_url``)."""
    from starsessions import InMemoryStore, SessionMiddleware, load_session

    async def read(request: Request) -> Response:
        await load_session(request)
        return JSONResponse({"n": request.session.get("n", 0)})

    async def write(request: Request) -> Response:
        await load_session(request)
        n = request.session.get("n", 0) + 1
        request.session["n"] = n
        return JSONResponse({"n": n})

    async def nothing() -> None:
        pass

    close = nothing
    if redis_url is None:
        store: Any = InMemoryStore()
    else:
        from redis.asyncio import Redis
        from starsessions.stores.redis import RedisStore

        client = Redis.from_url(redis_url)
        store = RedisStore(connection=client, prefix=f"bench-starsessions-{uuid.uuid4().hex}.")
        close = client.aclose
    app = _app(read, write)
    app.add_middleware(SessionMiddleware, store=store)
    return app, close


@asynccontextmanager
async def _client(app: App) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://bench") as client:
        yield client


async def _rate(client: httpx.AsyncClient, method: str, path: str, count: int) -> float:
    """Requests per second: best of three rounds of ``count`` sequential requests."""
    best = 0.0
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(count):
            response = await client.request(method, path)
            if response.status_code != 200:
                raise RuntimeError(f"{path} answered {response.status_code}")
        best = max(best, count / (time.perf_counter() - started))
    return best


async def _measure(app: App, count: int) -> dict[str, float]:
    async with _client(app) as client:
        await client.post("/write")  # create the session: later requests carry its cookie
        for _ in range(min(count, 100)):  # warm up
            await client.get("/read")
        return {
            "read-only request": await _rate(client, "GET", "/read", count),
            "read-write request": await _rate(client, "POST", "/write", count),
        }


def _with_base(url: str, base: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}base={base}"


async def run(*, quick: bool, redis_url: str | None) -> list[dict[str, object]]:
    """Measure every target; return rows ``{group, operation, target, ops}`` (ops in
    requests/s)."""
    count = 300 if quick else 3000
    rows: list[dict[str, object]] = []
    groups: list[tuple[str, list[tuple[str, Callable[[], Any]]]]] = [
        (
            "sessions (memory)",
            [
                ("kvstorage sessions (memory)", lambda: kvstorage_app("memory://")),
                ("no session middleware", lambda: (plain_app(), None)),
                ("starsessions (memory)", lambda: starsessions_app(None)),
            ],
        )
    ]
    if redis_url is not None:
        base = f"bench-sessions-{uuid.uuid4().hex}"
        groups.append(
            (
                "sessions (redis)",
                [
                    (
                        "kvstorage sessions (redis)",
                        lambda: kvstorage_app(_with_base(redis_url, base)),
                    ),
                    ("no session middleware", lambda: (plain_app(), None)),
                    ("starsessions (redis)", lambda: starsessions_app(redis_url)),
                ],
            )
        )
    for group, targets in groups:
        for target, build in targets:
            async with AsyncExitStack() as stack:
                app, close = build()
                if close is not None:
                    stack.push_async_callback(close)
                for operation, ops in (await _measure(app, count)).items():
                    rows.append(
                        {"group": group, "operation": operation, "target": target, "ops": ops}
                    )
    return rows


def main() -> None:
    """Print the rows as a table (``--quick`` for a short run, ``--redis URL`` to add
    Redis; never point it at a Redis whose data matters: it writes keys)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--redis", default=None, help="redis://host:port/db of a scratch Redis")
    args = parser.parse_args()
    rows = anyio.run(lambda: run(quick=args.quick, redis_url=args.redis))
    for group in dict.fromkeys(str(row["group"]) for row in rows):
        print(f"\n{group}")
        mine = [row for row in rows if row["group"] == group]
        for operation in dict.fromkeys(str(row["operation"]) for row in mine):
            cells = {str(r["target"]): float(r["ops"]) for r in mine if r["operation"] == operation}  # type: ignore[arg-type]
            ours = next(v for k, v in cells.items() if k.startswith("kvstorage"))
            line = ", ".join(
                f"{k}: {v:,.0f}/s" + ("" if k.startswith("kvstorage") else f" ({ours / v:.2f}x)")
                for k, v in cells.items()
            )
            print(f"  {operation}: {line}")


if __name__ == "__main__":
    main()
