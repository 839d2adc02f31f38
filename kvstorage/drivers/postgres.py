"""PostgresDriver: one table in a PostgreSQL database, through asyncpg. Runs on asyncio only
(asyncpg is asyncio-only); using it under trio raises a clear
:class:`~kvstorage.errors.DriverError`.

Layout
------
One table per driver (``kv`` by default)::

    key        text COLLATE "C" PRIMARY KEY   -- byte order: ranges, never LIKE
    expires_at double precision                -- Unix seconds, NULL = no expiry
    mtime      double precision NOT NULL       -- Unix seconds of the last write
    version    bigint NOT NULL                 -- random on every write: the etag
    value      bytea NOT NULL

plus a partial index on ``expires_at`` for ``sweep()``, and a row in ``kvstorage_schema``
recording the layout version. Every operation is one statement: a read is one ``SELECT``, a
write one ``INSERT ... ON CONFLICT DO UPDATE`` (``if_absent``: ``... WHERE`` the old row
expired; ``if_match``: an ``UPDATE ... WHERE version = $etag``), a batch one statement over
``unnest`` / ``= ANY`` arrays, a listing page one index range scan, ``clear`` and ``sweep``
one ``DELETE``. Conditions are therefore atomic against every other writer (PostgreSQL
re-checks the ``WHERE`` on the row it locks).

Watching
--------
``watch`` installs (once per table, kept afterwards) three statement-level triggers that
``pg_notify`` each written or deleted key on the channel ``kvstorage_<table oid>``, and
``LISTEN``\\ s on one pooled connection. So writes by every process are reported, and so
are deletions by ``sweep()``; a ``touch`` (expiry only) is not, as on the other drivers.

Errors
------
A server that is down or unreachable, a connection killed under a call
(``pg_terminate_backend``, a restart) or refused (authentication, too many clients)
raises ``DriverUnavailableError`` naming ``host:port`` and the URL with its password
redacted. No call is ever resent: a conditional write that failed with the connection may
or may not have been applied, and is never applied twice. Broken connections are replaced
by the next call, so the same driver recovers when the server is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from ..errors import ConditionFailedError, DriverUnavailableError
from ..keys import key_range
from ..urls import redact_url
from .base import (
    Capabilities,
    Driver,
    EmitEvent,
    Record,
    Stat,
    check_table,
    require_asyncio,
)

__all__ = ["PostgresDriver"]

logger = logging.getLogger("kvstorage")

#: The table layout this version writes; recorded per table in ``kvstorage_schema``.
SCHEMA_VERSION = 1
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_PAGE = 1000  # keys per listing query
_BATCH = 10_000  # rows per batch statement (larger batches: several, in one transaction)
_LIVE = "(expires_at IS NULL OR expires_at > $%d)"
#: A new random etag, drawn by the server for every row written.
_NEW_VERSION = "(random() * 4611686018427387904)::int8"
#: Serializes schema changes (table, triggers) between every client of a database.
_SCHEMA_LOCK = 0x6B7673746F7265  # "kvstore"
_URL_OPTIONS = {"table", "min_size", "max_size", "timeout"}
#: Session settings of the driver's own connections (``server_settings`` adds to them).
#: Without bitmap scans a listing page is an ordered walk of the key index even before
#: the table's first ANALYZE: with them, the planner's guess for a freshly filled table
#: is a bitmap scan of the whole rest of the range plus a sort, for every page -- 20x
#: slower at 100,000 keys, and quadratic.
SERVER_SETTINGS = {"application_name": "kvstorage", "enable_bitmapscan": "off"}
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, unreachable, reset
    TimeoutError,  # connecting took longer than `timeout`
    asyncpg.PostgresConnectionError,  # class 08: the connection broke or was refused
    asyncpg.exceptions.AdminShutdownError,  # 57P01: pg_terminate_backend, fast shutdown
    asyncpg.exceptions.CrashShutdownError,  # 57P02
    asyncpg.exceptions.CannotConnectNowError,  # 57P03: starting up or shutting down
    asyncpg.exceptions.TooManyConnectionsError,  # 53300
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,  # 28xxx: login refused
)

_NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION kvstorage_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    PERFORM pg_notify('kvstorage_' || TG_RELID, 'r' || key) FROM kvstorage_old;
  ELSIF TG_OP = 'INSERT' THEN
    PERFORM pg_notify('kvstorage_' || TG_RELID, 'u' || key) FROM kvstorage_new;
  ELSE  -- an UPDATE: a write changes the version, a touch (expiry only) does not
    PERFORM pg_notify('kvstorage_' || TG_RELID, 'u' || n.key)
      FROM kvstorage_new n JOIN kvstorage_old o USING (key) WHERE n.version <> o.version;
  END IF;
  RETURN NULL;
END $$
"""
_TRIGGERS = (
    ("insert", "NEW TABLE AS kvstorage_new"),
    ("update", "OLD TABLE AS kvstorage_old NEW TABLE AS kvstorage_new"),
    ("delete", "OLD TABLE AS kvstorage_old"),
)


class _Unreachable:
    """Context manager: a connection failure raised inside becomes
    :class:`~kvstorage.errors.DriverUnavailableError` naming the server (never its
    password), and the pool's other connections are replaced on their next use."""

    __slots__ = ("_driver",)

    def __init__(self, driver: PostgresDriver) -> None:
        self._driver = driver

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None or not _is_unavailable(exc):
            return
        driver = self._driver
        pool = driver._pool
        if pool is not None:  # a restart broke them all: do not hand out the others
            task = asyncio.get_running_loop().create_task(pool.expire_connections())
            driver._background.add(task)
            task.add_done_callback(driver._background.discard)
        detail = str(exc) or type(exc).__name__
        url = f" ({driver._shown})" if driver._shown else ""
        raise DriverUnavailableError(
            f"cannot reach PostgreSQL at {driver.where}{url}: {detail}", driver=driver.name
        ) from exc


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, _UNAVAILABLE):
        return True
    # asyncpg's wording for a connection that closed before this call used it
    return isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc)


async def _keep_session_state(connection: asyncpg.Connection) -> None:
    """The pool's reset hook: nothing to reset, so no extra round trip per call (the
    driver never changes session state; ``watch`` undoes its ``LISTEN`` itself)."""


def _count(status: str) -> int:
    """The row count of a command status such as ``"INSERT 0 1"`` or ``"DELETE 3"``."""
    return int(status.rpartition(" ")[2])


class PostgresDriver(Driver):
    """Stores every key as one row of a table in PostgreSQL. **asyncio only.**

    Args:
        dsn: ``postgresql://user:password@host:port/database`` (or ``postgres://``),
            anything asyncpg accepts; None uses libpq's ``PG*`` environment variables.
        pool: a ready ``asyncpg.Pool`` to use instead of ``dsn``; it is never closed.
        table: the table to use (a plain SQL identifier, created on first use in the
            connection's current schema); several drivers can share a database with
            different tables.
        min_size: connections the driver's pool keeps open.
        max_size: connections the driver's pool opens at most.
        timeout: seconds to connect. A call to a server that is down or unreachable
            raises :class:`~kvstorage.errors.DriverUnavailableError` within about this.
        **options: passed to ``asyncpg.create_pool`` (``ssl``, ``command_timeout``,
            ``statement_cache_size=0`` behind pgbouncer, ...); ``server_settings`` add to
            :data:`SERVER_SETTINGS`.

    A given ``pool`` should switch bitmap scans off as :data:`SERVER_SETTINGS` does (or
    see listing slow down on tables not yet analyzed) and skip the reset query (asyncpg's
    ``reset=``) to save a round trip per call.

    See the module docstring for the table, watching and errors.
    """

    name = "postgres"
    capabilities = Capabilities(
        max_depth=True, conditions=True, watch=True, asyncio_only=True, exact_watch=True
    )

    table: str
    """The table holding the keys."""

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: asyncpg.Pool | None = None,
        table: str = "kv",
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 5.0,
        **options: Any,
    ) -> None:
        if dsn is not None and pool is not None:
            raise ValueError("pass dsn or pool, not both")
        if not _IDENTIFIER.fullmatch(table) or table.lower().startswith("pg_"):
            raise ValueError(
                f"table must be a plain SQL identifier (letters, digits, _; not pg_...), "
                f"got {table!r}"
            )
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ValueError("need 0 <= min_size <= max_size and max_size >= 1")
        if not timeout > 0:
            raise ValueError("timeout must be a number of seconds > 0")
        if dsn is not None:
            scheme = dsn.partition("://")[0].lower()
            if scheme not in {"postgresql", "postgres"}:
                raise ValueError(f"not a postgresql:// URL: {redact_url(dsn)!r}")
        self.table = table
        self._dsn = dsn
        self._shown = redact_url(dsn) if dsn is not None else None
        self.where = _address(dsn) if pool is None else "the given asyncpg pool"
        """``host:port`` of the server, as errors name it (never a password)."""
        self._given = pool
        self._pool: asyncpg.Pool | None = pool
        #: The pool once the table is known to be there: the fast path of every call.
        self._ready_pool: asyncpg.Pool | None = None
        self._connecting = asyncio.Lock()
        self._pool_options: dict[str, Any] = {
            "min_size": min_size,
            "max_size": max_size,
            "timeout": timeout,
            "reset": _keep_session_state,
            **options,
            "server_settings": {**SERVER_SETTINGS, **options.get("server_settings", {})},
        }
        self._unreachable = _Unreachable(self)
        self._watchers: set[Callable[[], Awaitable[None]]] = set()
        self._background: set[asyncio.Task[None]] = set()
        t = f'"{table}"'
        self._t = t
        columns = "value, version, mtime, expires_at"
        self._sql_get = f"SELECT {columns} FROM {t} WHERE key = $1"
        self._sql_head = (
            f"SELECT octet_length(value), version, mtime, expires_at FROM {t} WHERE key = $1"
        )
        # Rows in the order of the keys given (NULLs for missing): no lookup in Python.
        self._sql_get_many = (
            f"SELECT {', '.join('t.' + c for c in columns.split(', '))} "
            f"FROM unnest($1::text[]) WITH ORDINALITY AS k(key, i) "
            f"LEFT JOIN {t} AS t ON t.key = k.key ORDER BY k.i"
        )
        upsert = (
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "expires_at = excluded.expires_at, mtime = excluded.mtime, "
            "version = excluded.version"
        )
        # single writes draw the version in Python, so that set() knows its etag
        self._sql_set = (
            f"INSERT INTO {t} (key, value, expires_at, mtime, version) "
            f"VALUES ($1, $2, $3, $4, $5) {upsert}"
        )
        # An expired row counts as absent: the upsert overwrites it, a live one stays.
        self._sql_set_absent = self._sql_set + f" WHERE {t}.expires_at <= $4"
        self._sql_set_match = (
            f"UPDATE {t} SET value = $2, expires_at = $3, mtime = $4, version = $6 "
            f"WHERE key = $1 AND version = $5 AND {_LIVE % 4}"
        )
        self._sql_set_many = (
            f"INSERT INTO {t} (key, value, expires_at, mtime, version) "
            f"SELECT key, value, $3, $4, {_NEW_VERSION} "
            f"FROM unnest($1::text[], $2::bytea[]) AS u(key, value) {upsert}"
        )
        self._sql_touch = f"UPDATE {t} SET expires_at = $2 WHERE key = $1 AND {_LIVE % 3}"
        # Only a live row counts; an expired one is left to sweep() (it is invisible).
        self._sql_remove = f"DELETE FROM {t} WHERE key = $1 AND {_LIVE % 2}"
        self._sql_remove_many = f"DELETE FROM {t} WHERE key = ANY($1::text[]) AND {_LIVE % 2}"

    @classmethod
    def from_url(cls, url: str) -> PostgresDriver:
        """Build from ``postgresql://user:password@host:port/database?table=kv`` (or
        ``postgres://``). The query parameters ``table``, ``min_size``, ``max_size`` and
        ``timeout`` are the driver's; the others go to asyncpg (``sslmode``, ...)."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in {"postgresql", "postgres"}:
            raise ValueError(f"not a postgresql:// URL: {redact_url(url)!r}")
        query = parse_qsl(parts.query, keep_blank_values=True)
        ours = {name: value for name, value in query if name in _URL_OPTIONS}
        rest = [(name, value) for name, value in query if name not in _URL_OPTIONS]
        options: dict[str, Any] = {}
        try:
            for name in ("min_size", "max_size"):
                if name in ours:
                    options[name] = int(ours[name])
            if "timeout" in ours:
                options["timeout"] = float(ours["timeout"])
        except ValueError:
            raise ValueError(f"bad number in postgresql URL {redact_url(url)!r}") from None
        if "table" in ours:
            options["table"] = ours["table"]
        return cls(urlunsplit(parts._replace(query=urlencode(rest))), **options)

    def __repr__(self) -> str:
        where = self._shown if self._given is None else repr(self._given)
        return f"PostgresDriver({where!r}, table={self.table!r})"

    # -- connection ---------------------------------------------------------------------

    async def _connect(self) -> asyncpg.Pool:
        """The pool, created (and the table checked) on first use."""
        require_asyncio(self.name)
        async with self._connecting:
            if self._ready_pool is not None:
                return self._ready_pool
            with self._unreachable:
                pool = self._pool
                if pool is None:
                    pool = await asyncpg.create_pool(self._dsn, **self._pool_options)
                    self._pool = pool
                async with pool.acquire() as connection, connection.transaction():
                    await self._create_or_check(connection)
            self._ready_pool = pool
            return pool

    async def _create_or_check(self, connection: asyncpg.Connection) -> None:
        """Create the table (or check the one there), under a lock that every kvstorage
        client of the database takes for schema changes."""
        await connection.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS kvstorage_schema "
            "(name text PRIMARY KEY, version integer NOT NULL)"
        )
        version = await connection.fetchval(
            "SELECT version FROM kvstorage_schema WHERE name = $1", self.table
        )
        exists = await connection.fetchval("SELECT to_regclass($1)", self._t) is not None
        if check_table(
            self.name,
            self.table,
            self.where,
            version=version,
            supported=SCHEMA_VERSION,
            exists=exists,
        ):
            return
        # value last: reading the other columns never touches a large value's TOAST
        await connection.execute(
            f'CREATE TABLE {self._t} (key text COLLATE "C" PRIMARY KEY, '
            "expires_at double precision, mtime double precision NOT NULL, "
            "version bigint NOT NULL, value bytea NOT NULL)"
        )
        await connection.execute(
            f'CREATE INDEX "{self.table}_expires_at" ON {self._t} (expires_at) '
            "WHERE expires_at IS NOT NULL"
        )
        await connection.execute(
            "INSERT INTO kvstorage_schema (name, version) VALUES ($1, $2)",
            self.table,
            SCHEMA_VERSION,
        )

    # -- single items -------------------------------------------------------------------

    async def get(self, key: str) -> Record | None:
        with self._unreachable:
            pool = self._ready_pool or await self._connect()
            row = await pool.fetchrow(self._sql_get, key)
        if row is None:
            return None
        value, version, mtime, expires_at = row
        return Record(value, str(version), mtime, expires_at)

    async def head(self, key: str) -> Stat | None:
        with self._unreachable:
            pool = self._ready_pool or await self._connect()
            row = await pool.fetchrow(self._sql_head, key)
        if row is None:
            return None
        size, version, mtime, expires_at = row
        return Stat(size, str(version), mtime, expires_at)

    async def set(
        self,
        key: str,
        value: bytes,
        *,
        expires_at: float | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> str:
        now = time.time()
        new = random.getrandbits(62)  # as the server's (random() * 2^62)::int8
        with self._unreachable:
            pool = self._ready_pool or await self._connect()
            if if_match is not None:
                try:
                    version = int(if_match)
                except ValueError:
                    raise ConditionFailedError(f"etag of {key!r} does not match") from None
                if not -(2**63) <= version < 2**63:
                    raise ConditionFailedError(f"etag of {key!r} does not match")
                status: str = await pool.execute(
                    self._sql_set_match, key, value, expires_at, now, version, new
                )
                if status == "UPDATE 0":
                    raise ConditionFailedError(f"etag of {key!r} does not match")
            elif if_absent:
                status = await pool.execute(self._sql_set_absent, key, value, expires_at, now, new)
                if status == "INSERT 0 0":
                    raise ConditionFailedError(f"key {key!r} already exists")
            else:
                await pool.execute(self._sql_set, key, value, expires_at, now, new)
        return str(new)

    async def remove(self, key: str) -> bool:
        with self._unreachable:
            pool = self._ready_pool or await self._connect()
            status: str = await pool.execute(self._sql_remove, key, time.time())
        return status != "DELETE 0"

    async def touch(self, key: str, *, expires_at: float | None) -> bool:
        with self._unreachable:
            pool = self._ready_pool or await self._connect()
            status: str = await pool.execute(self._sql_touch, key, expires_at, time.time())
        return status != "UPDATE 0"

    # -- batches ------------------------------------------------------------------------

    async def get_many(self, keys: Sequence[str]) -> list[Record | None]:
        if not keys:
            return []
        with self._unreachable:
            pool = self._ready_pool or await self._connect()
            rows = await pool.fetch(self._sql_get_many, keys)
        return [
            None if row[0] is None else Record(row[0], str(row[1]), row[2], row[3]) for row in rows
        ]

    async def set_many(
        self, items: Sequence[tuple[str, bytes]], *, expires_at: float | None = None
    ) -> None:
        if not items:
            return
        keys = [key for key, _ in items]
        values = [value for _, value in items]
        if len(set(keys)) != len(keys):  # one statement may not write a row twice
            last = dict(items)
            keys, values = list(last), list(last.values())
        now = time.time()
        sql = self._sql_set_many
        with self._unreachable:
            pool = self._ready_pool or await self._connect()
            if len(keys) <= _BATCH:
                await pool.execute(sql, keys, values, expires_at, now)
                return
            async with pool.acquire() as connection, connection.transaction():
                for start in range(0, len(keys), _BATCH):
                    end = start + _BATCH
                    await connection.execute(
                        sql, keys[start:end], values[start:end], expires_at, now
                    )

    async def remove_many(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        with self._unreachable:
            pool = self._ready_pool or await self._connect()
            status: str = await pool.execute(self._sql_remove_many, list(keys), time.time())
        return _count(status)

    # -- listing and clearing -----------------------------------------------------------

    def _range(self, base: str, first: int) -> tuple[str, tuple[str, ...]]:
        """The condition (and its parameters, numbered from ``first``) selecting exactly
        the keys under ``base``, by primary-key range -- never ``LIKE``, so no character
        is special. ``""`` for the root."""
        if not base:
            return "", ()
        return f"key >= ${first} AND key < ${first + 1}", key_range(base)

    scan = Driver.scan_by_pages  # listing is keyset pages: scan_pages below

    async def scan_pages(
        self, base: str = "", *, max_depth: int | None = None
    ) -> AsyncGenerator[list[str], None]:
        # Keyset pagination: each page is its own short query that starts after the last
        # key seen, so no transaction stays open while the caller iterates.
        where = f"key > $1 AND {_LIVE % 2}"
        params: tuple[Any, ...] = ()
        if base:
            where += " AND key < $3"
            params += (key_range(base)[1],)
        if max_depth is not None:
            where += f" AND length(key) - length(replace(key, ':', '')) <= ${len(params) + 3}"
            params += (max_depth + (base.count(":") + 1 if base else 0),)
        sql = f"SELECT key FROM {self._t} WHERE {where} ORDER BY key LIMIT {_PAGE}"
        after = key_range(base)[0] if base else ""
        while True:
            with self._unreachable:
                pool = self._ready_pool or await self._connect()
                rows = await pool.fetch(sql, after, time.time(), *params)
            if rows:
                yield [row[0] for row in rows]
            if len(rows) < _PAGE:
                return
            after = rows[-1][0]

    async def clear(self, base: str = "") -> None:
        where, params = self._range(base, 1)
        sql = f"DELETE FROM {self._t}" + (f" WHERE {where}" if where else "")
        with self._unreachable:
            pool = self._ready_pool or await self._connect()
            await pool.execute(sql, *params)

    async def sweep(self, base: str = "") -> int:
        where, params = self._range(base, 2)
        sql = f"DELETE FROM {self._t} WHERE expires_at <= $1" + (f" AND {where}" if where else "")
        with self._unreachable:
            pool = self._ready_pool or await self._connect()
            status: str = await pool.execute(sql, time.time(), *params)
        return _count(status)

    # -- watching -----------------------------------------------------------------------

    async def watch(self, emit: EmitEvent) -> Callable[[], Awaitable[None]]:
        """Report every write and deletion of the table, by any client, through
        ``LISTEN``/``NOTIFY`` (installing the notifying triggers on first use)."""
        with self._unreachable:
            pool = self._ready_pool or await self._connect()
            async with pool.acquire() as connection, connection.transaction():
                channel = await self._install_triggers(connection)
        listener = _Listener(self, channel, emit)
        await listener.start()

        async def stop() -> None:
            self._watchers.discard(stop)
            await listener.stop()

        self._watchers.add(stop)
        return stop

    async def _install_triggers(self, connection: asyncpg.Connection) -> str:
        """Create the notifying triggers unless they exist; return the channel name."""
        await connection.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
        oid = await connection.fetchval("SELECT $1::regclass::oid", self._t)
        names = [f"{self.table}_kvstorage_{event}" for event, _ in _TRIGGERS]
        present = await connection.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1 AND tgname = ANY($2::text[])",
            oid,
            names,
        )
        if present != len(names):
            await connection.execute(_NOTIFY_FUNCTION)
            for name, (event, tables) in zip(names, _TRIGGERS, strict=True):
                await connection.execute(
                    f'CREATE OR REPLACE TRIGGER "{name}" AFTER {event.upper()} ON {self._t} '
                    f"REFERENCING {tables} FOR EACH STATEMENT EXECUTE FUNCTION kvstorage_notify()"
                )
        return f"kvstorage_{oid}"

    # -- lifecycle ----------------------------------------------------------------------

    async def dispose(self) -> None:
        for stop in list(self._watchers):
            await stop()
        pool = self._pool
        self._ready_pool = None
        if pool is not None and pool is not self._given:
            self._pool = None
            await pool.close()


class _Listener:
    """One pooled connection that ``LISTEN``\\ s on a table's channel and forwards each
    notification; when the connection is lost, it reconnects in the background (writes
    made meanwhile are not reported)."""

    def __init__(self, driver: PostgresDriver, channel: str, emit: EmitEvent) -> None:
        self._driver = driver
        self._channel = channel
        self._emit = emit
        self._connection: Any = None  # the pool's connection proxy while listening
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _notified(self, connection: object, pid: int, channel: str, payload: str) -> None:
        event: Literal["update", "remove"] = "remove" if payload[:1] == "r" else "update"
        self._emit(event, payload[1:])

    def _terminated(self, connection: object) -> None:
        self._lost.set()

    async def _listen(self) -> None:
        pool = self._driver._ready_pool or await self._driver._connect()
        connection = await pool.acquire()
        try:
            await connection.add_listener(self._channel, self._notified)
            connection.add_termination_listener(self._terminated)
        except BaseException:
            await pool.release(connection)
            raise
        self._connection = connection
        self._lost.clear()

    async def start(self) -> None:
        """Listen now (failing as any call does), then keep listening in the background."""
        with self._driver._unreachable:
            await self._listen()
        self._task = asyncio.get_running_loop().create_task(self._keep_listening())

    async def _keep_listening(self) -> None:
        while True:
            await self._lost.wait()
            await self._release()
            delay = 0.1
            while True:
                try:
                    await self._listen()
                    break
                except Exception as exc:
                    logger.debug("cannot listen at %s yet: %s", self._driver.where, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _release(self) -> None:
        connection, self._connection = self._connection, None
        pool = self._driver._pool
        if connection is None or pool is None:
            return
        with contextlib.suppress(Exception):
            connection.remove_termination_listener(self._terminated)
            if not connection.is_closed():
                await connection.remove_listener(self._channel, self._notified)
        with contextlib.suppress(Exception):
            await pool.release(connection)

    async def stop(self) -> None:
        """Stop listening and give the connection back to the pool."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._release()


def _address(dsn: str | None) -> str:
    """``host:port`` of a DSN (libpq's defaults and ``PG*`` variables filling gaps), for
    messages. Several hosts are listed with commas."""
    env_host = os.environ.get("PGHOST", "localhost")
    env_port = os.environ.get("PGPORT", "5432")
    if dsn is None:
        return f"{env_host}:{env_port}"
    netloc = urlsplit(dsn).netloc.rpartition("@")[2]
    query = dict(parse_qsl(urlsplit(dsn).query))
    hosts = netloc or query.get("host", env_host)
    addresses = []
    for address in hosts.split(","):
        if address.startswith("["):  # [ipv6]:port
            host, _, port = address[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = address.partition(":")
        addresses.append(f"{host or env_host}:{port or query.get('port', env_port)}")
    return ",".join(addresses)
