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
Close = Callable[[], Awaitable[None]]
Builder = Callable[[], tuple[App, Close | None]]


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


OPERATIONS = {"read-only request": ("GET", "/read"), "read-write request": ("POST", "/write")}


async def _rate(client: httpx.AsyncClient, method: str, path: str, count: int) -> float:
    """Requests per second over ``count`` sequential requests."""
    started = time.perf_counter()
    for _ in range(count):
        response = await client.request(method, path)
        if response.status_code != 200:
            raise RuntimeError(f"{path} answered {response.status_code}")
    return count / (time.perf_counter() - started)


async def _measure(targets: dict[str, Builder], count: int, rounds: int) -> dict[str, float]:
    """Best rate per (target, operation); the targets take turns in every round, so a
    busy machine slows them alike."""
    best: dict[tuple[str, str], float] = {}
    async with AsyncExitStack() as stack:
        clients = {}
        for target, build in targets.items():
            app, close = build()
            if close is not None:
                stack.push_async_callback(close)
            client = await stack.enter_async_context(_client(app))
            await client.post("/write")  # create the session: later requests carry its cookie
            await _rate(client, "GET", "/read", min(count, 100))  # warm up
            clients[target] = client
        for _ in range(rounds):
            for target, client in clients.items():
                for operation, (method, path) in OPERATIONS.items():
                    rate = await _rate(client, method, path, count)
                    best[target, operation] = max(best.get((target, operation), 0.0), rate)
    return {f"{target}|{operation}": rate for (target, operation), rate in best.items()}


def _with_base(url: str, base: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}base={base}"


async def run(*, quick: bool, redis_url: str | None) -> list[dict[str, object]]:
    """Measure every target; return rows ``{group, operation, target, ops}`` (ops in
    requests/s)."""
    count, rounds = (200, 3) if quick else (500, 10)
    groups = {
        "sessions (memory)": {
            "kvstorage sessions (memory)": lambda: kvstorage_app("memory://"),
            "no session middleware": lambda: (plain_app(), None),
            "starsessions (memory)": lambda: starsessions_app(None),
        }
    }
    if redis_url is not None:
        base = f"bench-sessions-{uuid.uuid4().hex}"
        groups["sessions (redis)"] = {
            "kvstorage sessions (redis)": lambda: kvstorage_app(_with_base(redis_url, base)),
            "no session middleware": lambda: (plain_app(), None),
            "starsessions (redis)": lambda: starsessions_app(redis_url),
        }
    rows: list[dict[str, object]] = []
    for group, targets in groups.items():
        for name, ops in (await _measure(targets, count, rounds)).items():
            target, operation = name.split("|")
            rows.append({"group": group, "operation": operation, "target": target, "ops": ops})
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
