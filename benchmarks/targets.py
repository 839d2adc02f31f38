"""Benchmark targets: kvstorage itself, the raw client of each backend, and the peers.

Every target exposes the same five coroutines, so the one workload in
:mod:`benchmarks.workload` runs unchanged on all of them. A target that cannot do an
operation (a raw client without listing, say) leaves it as None and the row is skipped.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec

from kvstorage import Storage

Value = dict[str, Any]
_encode = msgspec.json.encode
_decode = msgspec.json.decode


@dataclass
class Target:
    """One thing to measure. ``kind`` is ``"ours"``, ``"raw"`` or ``"peer"``.

    ``fill``, ``iter_keys`` and ``clear`` (optional) take part in the listing scaling run:
    store many ``(key, value)`` pairs at once, stream the keys under a base, delete them.
    """

    name: str
    kind: str
    set: Callable[[str, Value], Awaitable[Any]]
    get: Callable[[str], Awaitable[Any]]
    remove: Callable[[str], Awaitable[Any]]
    get_many: Callable[[list[str]], Awaitable[Any]] | None = None
    keys: Callable[[str], Awaitable[list[str]]] | None = None
    close: Callable[[], Awaitable[None]] = field(default=lambda: _noop())
    fill: Callable[[list[tuple[str, Value]]], Awaitable[Any]] | None = None
    iter_keys: Callable[[str], AsyncIterator[str]] | None = None
    clear: Callable[[str], Awaitable[Any]] | None = None


async def _noop() -> None:
    return None


def ours(name: str, storage: Storage) -> Target:
    """kvstorage's public API on ``storage``."""

    async def get_many(keys: list[str]) -> Any:
        return await storage.get_items(keys)

    return Target(
        name,
        "ours",
        set=storage.set_item,
        get=storage.get_item,
        remove=storage.remove_item,
        get_many=get_many,
        keys=storage.get_keys,
        close=storage.dispose,
        fill=storage.set_items,
        iter_keys=storage.iter_keys,
        clear=storage.clear,
    )


# -- raw baselines: the backend's own client doing the same work, same serializer --------


def raw_memory() -> Target:
    """A dict in an async function, values serialized with msgspec (our JSON encoder)."""
    data: dict[str, bytes] = {}

    async def set_(key: str, value: Value) -> None:
        data[key] = _encode(value)

    async def get(key: str) -> Any:
        raw = data.get(key)
        return None if raw is None else _decode(raw)

    async def remove(key: str) -> None:
        data.pop(key, None)

    async def get_many(keys: list[str]) -> Any:
        return [None if (raw := data.get(k)) is None else _decode(raw) for k in keys]

    async def keys(base: str) -> list[str]:
        prefix = base + ":"
        return [k for k in data if k.startswith(prefix)]

    return Target("dict + msgspec", "raw", set_, get, remove, get_many, keys)


def raw_memory_stdlib() -> Target:
    """The prior-art baseline: a dict in an async function with stdlib ``json``."""
    data: dict[str, str] = {}

    async def set_(key: str, value: Value) -> None:
        data[key] = json.dumps(value)

    async def get(key: str) -> Any:
        raw = data.get(key)
        return None if raw is None else json.loads(raw)

    async def remove(key: str) -> None:
        data.pop(key, None)

    return Target("dict + stdlib json", "raw", set_, get, remove)


def raw_fs(base: Path) -> Target:
    """A plain synchronous file write/read of the same bytes in a worker thread."""

    def path(key: str) -> Path:
        return base / key.replace(":", "/")

    def write(key: str, data: bytes) -> None:
        p = path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    def read(key: str) -> bytes | None:
        try:
            return path(key).read_bytes()
        except FileNotFoundError:
            return None

    async def set_(key: str, value: Value) -> None:
        await anyio.to_thread.run_sync(write, key, _encode(value))

    async def get(key: str) -> Any:
        raw = await anyio.to_thread.run_sync(read, key)
        return None if raw is None else _decode(raw)

    async def remove(key: str) -> None:
        await anyio.to_thread.run_sync(lambda: path(key).unlink(missing_ok=True))

    return Target("file in a thread", "raw", set_, get, remove)


async def raw_sqlite(db_path: Path) -> Target:
    """aiosqlite at its best for this work: autocommit, WAL, one thread hop per call."""
    import aiosqlite

    db = await aiosqlite.connect(db_path, isolation_level=None)
    await db.execute("PRAGMA journal_mode=WAL")
    await db.execute("PRAGMA synchronous=NORMAL")
    await db.execute("CREATE TABLE IF NOT EXISTS raw (key TEXT PRIMARY KEY, value BLOB)")

    async def set_(key: str, value: Value) -> None:
        await db.execute("INSERT OR REPLACE INTO raw VALUES (?, ?)", (key, _encode(value)))

    async def get(key: str) -> Any:
        rows = await db.execute_fetchall("SELECT value FROM raw WHERE key = ?", (key,))
        return _decode(rows[0][0]) if rows else None

    async def remove(key: str) -> None:
        await db.execute("DELETE FROM raw WHERE key = ?", (key,))

    async def get_many(keys: list[str]) -> Any:
        marks = ",".join("?" * len(keys))
        sql = f"SELECT key, value FROM raw WHERE key IN ({marks})"
        found = {k: _decode(v) for k, v in await db.execute_fetchall(sql, keys)}
        return [found.get(k) for k in keys]

    async def keys(base: str) -> list[str]:
        sql = "SELECT key FROM raw WHERE key >= ? AND key < ?"
        return [row[0] for row in await db.execute_fetchall(sql, (base + ":", base + ";"))]

    return Target("raw aiosqlite", "raw", set_, get, remove, get_many, keys, db.close)


async def raw_postgres(url: str, max_size: int = 10) -> Target:
    """asyncpg at its best for this work, sending the statements PostgresDriver sends: a
    pool as large as the driver's (without the reset query after each call, as the
    driver's) with the same session settings, a table of the same layout, one statement
    per call, keyset pages of 1000 keys for listing, and no kvstorage code on the way."""
    import time
    import uuid

    import asyncpg

    async def no_reset(connection: Any) -> None:
        pass

    from kvstorage.drivers.postgres import SERVER_SETTINGS

    pool = await asyncpg.create_pool(
        url, min_size=1, max_size=max_size, reset=no_reset, server_settings=SERVER_SETTINGS
    )
    t = f'"raw_{uuid.uuid4().hex[:12]}"'
    await pool.execute(
        f'CREATE TABLE {t} (key text COLLATE "C" PRIMARY KEY, expires_at double precision, '
        "mtime double precision NOT NULL, version bigint NOT NULL, value bytea NOT NULL)"
    )
    await pool.execute(f"CREATE INDEX ON {t} (expires_at) WHERE expires_at IS NOT NULL")
    version = "(random() * 4611686018427387904)::int8"
    upsert = (
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = "
        "excluded.expires_at, mtime = excluded.mtime, version = excluded.version"
    )
    sql_set = (
        f"INSERT INTO {t} (key, value, expires_at, mtime, version) "
        f"VALUES ($1, $2, $3, $4, {version}) {upsert}"
    )
    sql_fill = (
        f"INSERT INTO {t} (key, value, expires_at, mtime, version) "
        f"SELECT key, value, $3, $4, {version} "
        f"FROM unnest($1::text[], $2::bytea[]) AS u(key, value) {upsert}"
    )
    sql_get = f"SELECT value, version, mtime, expires_at FROM {t} WHERE key = $1"
    sql_get_many = (
        "SELECT t.value, t.version, t.mtime, t.expires_at FROM unnest($1::text[]) "
        f"WITH ORDINALITY AS k(key, i) LEFT JOIN {t} AS t ON t.key = k.key ORDER BY k.i"
    )
    live = "(expires_at IS NULL OR expires_at > $2)"
    sql_remove = f"DELETE FROM {t} WHERE key = $1 AND {live}"
    sql_page = f"SELECT key FROM {t} WHERE key > $1 AND {live} AND key < $3 ORDER BY key LIMIT 1000"
    sql_clear = f"DELETE FROM {t} WHERE key >= $1 AND key < $2"

    async def set_(key: str, value: Value) -> None:
        await pool.execute(sql_set, key, _encode(value), None, time.time())

    async def get(key: str) -> Any:
        row = await pool.fetchrow(sql_get, key)
        return None if row is None else _decode(row[0])

    async def remove(key: str) -> None:
        await pool.execute(sql_remove, key, time.time())

    async def get_many(keys: list[str]) -> Any:
        rows = await pool.fetch(sql_get_many, keys)
        return [None if row[0] is None else _decode(row[0]) for row in rows]

    async def iter_keys(base: str) -> AsyncIterator[str]:
        after, end = base + ":", base + ";"
        while True:
            rows = await pool.fetch(sql_page, after, time.time(), end)
            for row in rows:
                yield row[0]
            if len(rows) < 1000:
                return
            after = rows[-1][0]

    async def keys(base: str) -> list[str]:
        return [key async for key in iter_keys(base)]

    async def fill(items: list[tuple[str, Value]]) -> None:
        keys = [key for key, _ in items]
        await pool.execute(sql_fill, keys, [_encode(v) for _, v in items], None, time.time())

    async def clear(base: str) -> None:
        await pool.execute(sql_clear, base + ":", base + ";")

    async def close() -> None:
        await pool.execute(f"DROP TABLE {t}")
        await pool.close()

    return Target(
        "raw asyncpg",
        "raw",
        set_,
        get,
        remove,
        get_many,
        keys,
        close,
        fill=fill,
        iter_keys=iter_keys,
        clear=clear,
    )


def raw_redis(url: str) -> Target:
    """redis.asyncio GET/SET/MGET/DEL/SCAN on a default connection pool."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)

    async def set_(key: str, value: Value) -> None:
        await client.set(key, _encode(value))

    async def get(key: str) -> Any:
        raw = await client.get(key)
        return None if raw is None else _decode(raw)

    async def remove(key: str) -> None:
        await client.delete(key)

    async def get_many(keys: list[str]) -> Any:
        return [None if raw is None else _decode(raw) for raw in await client.mget(keys)]

    async def keys(base: str) -> list[str]:
        return [k.decode() async for k in client.scan_iter(match=base + ":*", count=1000)]

    return Target("raw redis.asyncio", "raw", set_, get, remove, get_many, keys, client.aclose)


async def raw_s3(endpoint_url: str, bucket: str) -> Target:
    """aiobotocore put_object/get_object/delete_object on the same server."""
    from contextlib import AsyncExitStack

    from aiobotocore.session import get_session

    stack = AsyncExitStack()
    client = await stack.enter_async_context(
        get_session().create_client(
            "s3",
            endpoint_url=endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )
    )
    await client.create_bucket(Bucket=bucket)

    async def set_(key: str, value: Value) -> None:
        await client.put_object(Bucket=bucket, Key=key.replace(":", "/"), Body=_encode(value))

    async def get(key: str) -> Any:
        response = await client.get_object(Bucket=bucket, Key=key.replace(":", "/"))
        async with response["Body"] as body:
            return _decode(await body.read())

    async def remove(key: str) -> None:
        await client.delete_object(Bucket=bucket, Key=key.replace(":", "/"))

    return Target("raw aiobotocore", "raw", set_, get, remove, close=stack.aclose)


def raw_http(url: str) -> Target:
    """httpx requests to a kvstorage server, the protocol used directly: PUT, GET, DELETE,
    one batch POST per get_many, one listing GET (one connection pool)."""
    import httpx

    client = httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_keepalive_connections=100))

    def path(key: str) -> str:
        return "/" + key.replace(":", "/")

    async def set_(key: str, value: Value) -> None:
        (await client.put(path(key), content=_encode(value))).raise_for_status()

    async def get(key: str) -> Any:
        response = await client.get(path(key))
        return None if response.status_code == 404 else _decode(response.content)

    async def remove(key: str) -> None:
        (await client.delete(path(key))).raise_for_status()

    async def get_many(keys: list[str]) -> Any:
        response = await client.post("/", content=_encode({"keys": keys}))
        return [None if item is None else item["value"] for item in _decode(response.content)]

    async def keys(base: str) -> list[str]:
        response = await client.get(path(base) + "/")
        return [key.replace("/", ":") for key in _decode(response.content)]

    return Target("raw httpx", "raw", set_, get, remove, get_many, keys, client.aclose)


# -- peers (installed with the `bench` extra) ---------------------------------------------


def peer_aiocache_memory() -> Target | None:
    """aiocache SimpleMemoryCache with JSON and its fastest setting (timeout=None)."""
    try:
        from aiocache import SimpleMemoryCache
        from aiocache.serializers import JsonSerializer
    except ImportError:
        return None
    cache = SimpleMemoryCache(serializer=JsonSerializer(), timeout=None)
    return Target("aiocache", "peer", cache.set, cache.get, cache.delete, close=cache.close)


def peer_aiocache_redis(url: str) -> Target | None:
    """aiocache RedisCache (JSON, timeout=None) on the same server."""
    try:
        from aiocache import RedisCache
        from aiocache.serializers import JsonSerializer
    except ImportError:
        return None
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    cache = RedisCache(
        serializer=JsonSerializer(),
        endpoint=parts.hostname or "127.0.0.1",
        port=parts.port or 6379,
        namespace="peer-aiocache",
        timeout=None,
    )

    async def get_many(keys: list[str]) -> Any:
        return await cache.multi_get(keys)

    return Target(
        "aiocache", "peer", cache.set, cache.get, cache.delete, get_many, close=cache.close
    )


def _pkv_target(store: Any) -> Target:
    async def set_(key: str, value: Value) -> None:
        await store.put(key, value)

    async def get(key: str) -> Any:
        return await store.get(key)

    async def remove(key: str) -> None:
        await store.delete(key)

    async def get_many(keys: list[str]) -> Any:
        return await store.get_many(keys)

    return Target("py-key-value", "peer", set_, get, remove, get_many)


def peer_pkv_memory() -> Target | None:
    """py-key-value-aio MemoryStore (default settings)."""
    try:
        from key_value.aio.stores.memory import MemoryStore
    except ImportError:
        return None
    return _pkv_target(MemoryStore())


def peer_pkv_redis(url: str) -> Target | None:
    """py-key-value-aio RedisStore on the same server."""
    try:
        from key_value.aio.stores.redis import RedisStore
    except ImportError:
        return None
    return _pkv_target(RedisStore(url=url))


def peer_pkv_disk(directory: Path) -> Target | None:
    """py-key-value-aio DiskStore (diskcache) in a fresh directory."""
    try:
        from key_value.aio.stores.disk import DiskStore
    except ImportError:
        return None
    return _pkv_target(DiskStore(directory=str(directory)))
