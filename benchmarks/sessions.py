"""Session middleware benchmark: requests/s of one Starlette app, called in process the
way an ASGI server calls it (no HTTP client, see ``_Caller``), for

* a read-only request (``get`` one key) and a read-write request (``get`` + ``set``),
* with ``sessions.SessionMiddleware`` on memory (and on Redis and PostgreSQL when their
  URLs are given),
* beside the same app with no session middleware (the floor: framework + client cost),
* beside starsessions (its in-memory store, and its ``RedisStore`` on the same Redis),
* and, on Redis, beside the same app doing by hand the round trips any server-side session
  needs (``GET`` to read; ``GET`` then ``SET`` to read and write) with a bare redis-py
  client: the floor no session store on that Redis can beat; on PostgreSQL the same
  with a bare asyncpg pool (``SELECT``; ``SELECT`` then ``INSERT ... ON CONFLICT``).

Every request carries the cookie of one existing session. Run alone with
``python -m benchmarks.sessions [--quick] [--redis redis://127.0.0.1:PORT/0]
[--postgres postgresql://user:password@127.0.0.1:PORT/db] [--loop uvloop]``.
"""

from __future__ import annotations

import argparse
import gc
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .loops import LOOPS, run_on
from .report import pivot, ratio
from .workload import Row, best_rounds

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


def raw_redis_app(redis_url: str) -> tuple[App, Callable[[], Awaitable[None]]]:
    """The app with no session layer but the session's round trips made with a bare
    redis-py client: one ``GET`` to read, ``GET`` + ``SET`` to read and write."""
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    key = f"bench-raw-session-{uuid.uuid4().hex}"

    async def read(request: Request) -> Response:
        stored = await client.get(key)
        return JSONResponse({"n": int(stored or 0)})

    async def write(request: Request) -> Response:
        n = int(await client.get(key) or 0) + 1
        await client.set(key, n, ex=3600)
        return JSONResponse({"n": n})

    return _app(read, write), client.aclose


def raw_postgres_app(url: str) -> tuple[App, Callable[[], Awaitable[None]]]:
    """The app with no session layer but the session's round trips made with a bare
    asyncpg pool: one ``SELECT`` to read, ``SELECT`` + ``INSERT ... ON CONFLICT`` to read
    and write (the pool and its table are made on the first request)."""
    import asyncpg

    table = f'"bench_raw_session_{uuid.uuid4().hex[:12]}"'
    key = "session:raw"
    pools: list[Any] = []

    async def no_reset(connection: Any) -> None:
        pass

    async def pool() -> Any:
        if not pools:
            made = await asyncpg.create_pool(url, min_size=1, max_size=10, reset=no_reset)
            await made.execute(
                f'CREATE TABLE {table} (key text COLLATE "C" PRIMARY KEY, '
                "expires_at double precision, value bytea NOT NULL)"
            )
            pools.append(made)
        return pools[0]

    async def read(request: Request) -> Response:
        stored = await (await pool()).fetchval(f"SELECT value FROM {table} WHERE key = $1", key)
        return JSONResponse({"n": int(stored or 0)})

    async def write(request: Request) -> Response:
        db = await pool()
        n = int(await db.fetchval(f"SELECT value FROM {table} WHERE key = $1", key) or 0) + 1
        await db.execute(
            f"INSERT INTO {table} (key, expires_at, value) VALUES ($1, $2, $3) "
            "ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at, "
            "value = excluded.value",
            key,
            time.time() + 3600,
            str(n).encode(),
        )
        return JSONResponse({"n": n})

    async def close() -> None:
        for made in pools:
            await made.execute(f"DROP TABLE {table}")
            await made.close()

    return _app(read, write), close


class _Caller:
    """Calls an ASGI app directly, the way a server would, and carries the session
    cookie by hand.

    No HTTP client: httpx's cookie jar alone costs more per request than a session
    middleware, which would hide the differences this benchmark is about. Like a browser,
    it sends the cookie the app last set.
    """

    def __init__(self, app: App) -> None:
        self.app = app
        self.cookie: bytes | None = None

    async def request(self, method: str, path: str) -> int:
        """Send one request with an empty body; return the response status."""
        headers = [(b"host", b"bench")]
        if self.cookie is not None:
            headers.append((b"cookie", self.cookie))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "https",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "server": ("bench", 443),
            "client": ("127.0.0.1", 50000),
        }
        status = 0

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", []):
                    if name == b"set-cookie":
                        self.cookie = value.split(b";", 1)[0]

        await self.app(scope, receive, send)
        return status


OPERATIONS = {"read-only request": ("GET", "/read"), "read-write request": ("POST", "/write")}


async def _rate(caller: _Caller, method: str, path: str, count: int) -> float:
    """Requests per second over ``count`` sequential requests."""
    started = time.perf_counter()
    for _ in range(count):
        status = await caller.request(method, path)
        if status != 200:
            raise RuntimeError(f"{path} answered {status}")
    return count / (time.perf_counter() - started)


async def _measure(group: str, targets: dict[str, Builder], count: int, rounds: int) -> list[Row]:
    """Every target's rate per operation, ``rounds`` times with the targets taking turns
    (so a busy machine slows them alike); the best round of each is kept."""
    rows: list[Row] = []
    async with AsyncExitStack() as stack:
        clients = {}
        for target, build in targets.items():
            app, close = build()
            if close is not None:
                stack.push_async_callback(close)
            client = _Caller(app)
            await client.request("POST", "/write")  # create the session and its cookie
            await _rate(client, "GET", "/read", min(count, 100))  # warm up
            clients[target] = client
        for _ in range(rounds):
            for target, client in clients.items():
                kind = "ours" if target.startswith("kvstorage") else "peer"
                for operation, (method, path) in OPERATIONS.items():
                    started = time.perf_counter()
                    rate = await _rate(client, method, path, count)
                    seconds = time.perf_counter() - started
                    rows.append(Row(group, operation, target, kind, rate, seconds, count))
    return best_rounds(rows)


async def _sessions_of(redis_url: str, totals: list[int], rounds: int) -> list[Row]:
    """``sessions_of`` for a user with 20 sessions among ``total`` stored sessions on
    Redis: the time must not grow with the total (it lists one user's index entries and
    reads those sessions, never scans all sessions)."""
    from kvstorage import create_storage
    from sessions import SessionManager

    storage = create_storage(_with_base(redis_url, f"bench-users-{uuid.uuid4().hex}"))
    manager = SessionManager(storage)
    rows: list[Row] = []
    stored = 0
    try:
        for _ in range(20):
            session = manager.open(None)
            await session.set_user("ann", meta={"device": "bench"})
            await manager.commit(session)
        document = {"d": {"n": 1}, "f": {}, "c": time.time(), "a": time.time()}
        for total in totals:
            while stored < total:  # other users' sessions (handles need not be real)
                batch = min(1000, total - stored)
                await storage.set_items(
                    {
                        f"session:{uuid.uuid4().hex}{stored + i:011d}": document
                        for i in range(batch)
                    },
                    ttl=3600,
                )
                stored += batch
            gc.collect()  # not the filling's garbage during the measurement
            best = 0.0
            for _ in range(rounds):
                count, started = 50, time.perf_counter()
                for _ in range(count):
                    assert len(await manager.sessions_of("ann")) == 20
                seconds = time.perf_counter() - started
                best = max(best, count / seconds)
            operation = f"sessions_of (20 of {total:,} sessions)"
            rows.append(Row("sessions (redis)", operation, "kvstorage sessions (redis)", "ours",
                            best, count / best, count))  # fmt: skip
    finally:
        await storage.clear()
        await storage.dispose()
    return rows


def _with_base(url: str, base: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}base={base}"


async def run(*, quick: bool, redis_url: str | None, postgres_url: str | None = None) -> list[Row]:
    """Measure every target; one row per (group, operation, target), ops in requests/s."""
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
            "bare GET/SET, no sessions": lambda: raw_redis_app(redis_url),
        }
    if postgres_url is not None:
        table = f"bench_sessions_{uuid.uuid4().hex[:12]}"
        pg_sessions = f"{postgres_url}{'&' if '?' in postgres_url else '?'}table={table}"
        groups["sessions (postgres)"] = {
            "kvstorage sessions (postgres)": lambda: kvstorage_app(pg_sessions),
            "no session middleware": lambda: (plain_app(), None),
            "bare SELECT/INSERT, no sessions": lambda: raw_postgres_app(postgres_url),
        }
    rows: list[Row] = []
    for group, targets in groups.items():
        rows += await _measure(group, targets, count, rounds)
    if redis_url is not None:
        totals = [1_000, 10_000] if quick else [1_000, 100_000]
        rows += await _sessions_of(redis_url, totals, 3)
    return rows


def main() -> None:
    """Print the rows as a table (``--quick`` for a short run, ``--redis URL`` to add
    Redis; never point it at a Redis whose data matters: it writes keys)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--redis", default=None, help="redis://host:port/db of a scratch Redis")
    parser.add_argument(
        "--postgres", default=None, help="postgresql://... of a scratch PostgreSQL database"
    )
    parser.add_argument("--loop", choices=LOOPS, default="asyncio", help="event loop")
    args = parser.parse_args()
    rows = run_on(
        args.loop, run(quick=args.quick, redis_url=args.redis, postgres_url=args.postgres)
    )
    lines = pivot(rows)
    for group in dict.fromkeys(line.driver for line in lines):
        print(f"\n{group}")
        for line in (line for line in lines if line.driver == group):
            figures = [f"{line.ours.target}: {line.ours.ops:,.0f}/s"] + [
                f"{name}: {row.ops:,.0f}/s ({ratio(line.ours, row)})"
                for name, row in line.others.items()
            ]
            print(f"  {line.operation}: {', '.join(figures)}")


if __name__ == "__main__":
    main()
