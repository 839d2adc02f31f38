"""SQLiteDriver: one table in a SQLite database file, through aiosqlite. Runs on asyncio only
(aiosqlite is asyncio-only); using it under trio raises a clear
:class:`~kvstorage.errors.DriverError`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote

import aiosqlite
import anyio
import anyio.to_thread
import msgspec

from ..errors import ConditionFailedError, DriverUnavailableError
from ..keys import key_range
from ..urls import redact_url
from ._batching import ReadBatcher
from .base import (
    Capabilities,
    Driver,
    Record,
    Stat,
    check_table,
    require_asyncio,
)

__all__ = ["SQLiteDriver"]

logger = logging.getLogger("kvstorage")

T = TypeVar("T")
_json = msgspec.json.encode
_decode_keys = msgspec.json.Decoder(list[str]).decode

#: The table layout this version writes; recorded per table in ``kvstorage_schema``.
SCHEMA_VERSION = 1
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
_CHUNK = 500  # keys per IN (...) list: well below SQLite's bound-parameter limit
_FIRST_PAGE = 1000  # keys in the first listing query
_PAGE = 16000  # keys per listing query at most
_LIVE = "(expiry IS NULL OR expiry > ?)"


def _new_version() -> int:
    """A random signed 64-bit version for a row written: its etag, which the writer knows
    without reading it back (the random module reseeds in forked children)."""
    return random.getrandbits(64) - 2**63


class SQLiteDriver(Driver):
    """Stores every key as one row of a table in a SQLite database. **asyncio only.**

    Args:
        path: the database file (created if missing; its directory must exist), or
            ``":memory:"`` for a private in-memory database.
        table: the table to use (a plain SQL identifier); several drivers can share one
            file with different tables.
        synchronous: SQLite's ``PRAGMA synchronous``. ``"NORMAL"`` (default) is safe
            against crashes of the process in WAL mode; ``"FULL"`` also against power loss.
        busy_timeout: seconds to wait for another connection's write lock before failing.

    The database runs in WAL mode, so readers never block the writer, and several
    processes can use one file safely: every write is a single statement or an
    ``IMMEDIATE`` transaction, and conditional writes (``if_absent``, ``if_match``) are
    single statements, atomic against every other writer. The table holds ``key`` (primary
    key), ``expiry`` and ``mtime`` (Unix seconds), ``version`` (a random 64-bit number
    drawn on every write; the etag) and ``value``. It is created on first use, and its
    layout version is recorded in the ``kvstorage_schema`` table for future migrations.

    Expired rows are invisible to every read at once, and deleted by ``sweep()``
    (``storage.sweep()`` or the storage's ``sweep_interval``) or by the next write of the
    key. Listing reads the primary-key index by range, a page at a time. ``get_many`` is
    one query whatever the number of keys (SQLite's JSON functions, built in since 3.38);
    a ``get`` made while another read is under way waits for the next such batch.
    """

    name = "sqlite"
    capabilities = Capabilities(max_depth=True, conditions=True, asyncio_only=True)

    path: str
    """The database file as an absolute path (relative paths are resolved when the driver
    is created), or ``":memory:"``."""
    table: str
    """The table holding the keys."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table: str = "kv",
        synchronous: str = "NORMAL",
        busy_timeout: float = 5.0,
    ) -> None:
        path = os.fspath(path)
        if not path:
            raise ValueError("path must name a database file or ':memory:'")
        if not _IDENTIFIER.fullmatch(table) or table.lower().startswith("sqlite_"):
            raise ValueError(
                f"table must be a plain SQL identifier (letters, digits, _; not sqlite_...), "
                f"got {table!r}"
            )
        if synchronous.upper() not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(_SYNCHRONOUS)}")
        if not busy_timeout >= 0:
            raise ValueError("busy_timeout must be a number of seconds >= 0")
        self.path = path if path == ":memory:" else os.path.abspath(path)
        self.table = table
        self._synchronous = synchronous.upper()
        self._busy_timeout = float(busy_timeout)
        self._db: aiosqlite.Connection | None = None
        self._connecting = asyncio.Lock()
        # Held across the statements of a multi-statement transaction, so that no other
        # statement of this connection lands inside it (see _connection).
        self._txn = asyncio.Lock()
        # Concurrent gets: one alone, the others in one get_many query while it runs (looked
        # up per batch, so a subclass's get_many is the one used).
        self._reads = ReadBatcher(self._get_one, lambda keys: self.get_many(keys))
        t = f'"{table}"'
        # The version read as text: the etag, so that a row is a Record as it comes.
        self._sql_get = (
            f"SELECT value, CAST(version AS TEXT), mtime, expiry FROM {t} WHERE key = ? AND {_LIVE}"
        )
        # One row per key, in the order of the keys: json_each is the outer loop of the
        # LEFT JOIN (SQLite never reorders outer joins), and walks its array in order.
        # Unlike an IN (...) list, it needs no temporary index and has no length limit.
        in_order = (
            f"FROM json_each(?1) AS k "
            f"LEFT JOIN {t} ON {t}.key = k.value AND (expiry IS NULL OR expiry > ?2)"
        )
        self._sql_get_many = f"SELECT {t}.value, CAST(version AS TEXT), mtime, expiry {in_order}"
        # Without etag and times, a third less work per row: for get_values.
        self._sql_get_values = f"SELECT {t}.value {in_order}"
        self._sql_head = (
            f"SELECT length(value), version, mtime, expiry FROM {t} WHERE key = ? AND {_LIVE}"
        )
        self._sql_set = (
            f"INSERT INTO {t} (key, value, expiry, mtime, version) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expiry = excluded.expiry, "
            "mtime = excluded.mtime, version = excluded.version"
        )
        # An expired row counts as absent: the upsert overwrites it, a live one stays.
        self._sql_set_absent = self._sql_set + f" WHERE {t}.expiry <= ?"
        self._sql_set_match = (
            f"UPDATE {t} SET value = ?, expiry = ?, mtime = ?, version = ? "
            f"WHERE key = ? AND version = ? AND {_LIVE}"
        )
        self._sql_touch = f"UPDATE {t} SET expiry = ? WHERE key = ? AND {_LIVE}"
        self._sql_remove = f"DELETE FROM {t} WHERE key = ? AND {_LIVE}"
        self._t = t

    @classmethod
    def from_url(cls, url: str) -> SQLiteDriver:
        """Build from a URL in SQLAlchemy's convention: ``sqlite:///relative.db``,
        ``sqlite:////absolute/path.db`` or ``sqlite://:memory:``, with optional query
        parameters ``table``, ``synchronous`` and ``busy_timeout``
        (``sqlite:///app.db?table=cache``)."""
        shown = redact_url(url)
        scheme, sep, rest = url.partition("://")
        if scheme.lower() != "sqlite" or not sep:
            raise ValueError(f"not a sqlite:// URL: {shown!r}")
        rest, _, query = rest.partition("?")
        if rest in ("", ":memory:", "/:memory:"):
            path = ":memory:"
        elif rest.startswith("/") and len(rest) > 1:
            path = unquote(rest[1:])
        else:
            raise ValueError(
                f"bad sqlite URL {shown!r}: use sqlite:///relative.db, sqlite:////abs/path.db "
                "or sqlite://:memory:"
            )
        options: dict[str, Any] = {k: v[-1] for k, v in parse_qs(query).items()}
        unknown = set(options) - {"table", "synchronous", "busy_timeout"}
        if unknown:
            raise ValueError(f"unknown sqlite URL option(s): {', '.join(sorted(unknown))}")
        if "busy_timeout" in options:
            options["busy_timeout"] = float(options["busy_timeout"])
        return cls(path, **options)

    def __repr__(self) -> str:
        return f"SQLiteDriver({self.path!r}, table={self.table!r})"

    # -- connection ---------------------------------------------------------------------

    async def _connect(self) -> aiosqlite.Connection:
        require_asyncio(self.name)
        async with self._connecting:
            if self._db is not None:
                return self._db
            # Shielded: a connection cancelled half-way would leak its worker thread.
            with anyio.CancelScope(shield=True):
                try:
                    if self.path != ":memory:":
                        # Fail here rather than in aiosqlite.connect(), which leaves its
                        # worker thread to stop after the event loop may have closed.
                        await anyio.to_thread.run_sync(_probe, self.path)
                    db = await _daemonic(
                        aiosqlite.connect(
                            self.path, timeout=self._busy_timeout, isolation_level=None
                        )
                    )
                except sqlite3.Error as exc:
                    raise self._unavailable(exc) from exc
                try:
                    await self._prepare_retrying(db)
                except BaseException as exc:
                    await db.close()
                    if isinstance(exc, sqlite3.Error):
                        raise self._unavailable(exc) from exc
                    raise
            self._db = db
            return db

    def _unavailable(self, exc: sqlite3.Error) -> DriverUnavailableError:
        return DriverUnavailableError(
            f"cannot open SQLite database {self.path!r}: {exc}", driver=self.name
        )

    async def _prepare_retrying(self, db: aiosqlite.Connection) -> None:
        """:meth:`_prepare`, retried for up to ``busy_timeout`` while other connections
        hold the lock it needs: SQLite does not always wait for it (switching a new file
        to WAL, several processes creating the table at once)."""
        deadline = time.monotonic() + self._busy_timeout
        delay = 0.005
        while True:
            try:
                return await self._prepare(db)
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                    raise
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _prepare(self, db: aiosqlite.Connection) -> None:
        """Set the connection up and create (or check) the table."""
        if self.path != ":memory:":
            rows = list(await db.execute_fetchall("PRAGMA journal_mode = WAL"))
            if rows[0][0].lower() != "wal":
                logger.warning("SQLite database %s is not in WAL mode (%s)", self.path, rows[0][0])
        await db.execute(f"PRAGMA synchronous = {self._synchronous}")
        await db.execute("BEGIN IMMEDIATE")
        try:
            await self._create_or_check(db)
            await db.execute("COMMIT")
        except BaseException:
            await _rollback(db)
            raise

    async def _create_or_check(self, db: aiosqlite.Connection) -> None:
        t = self._t
        await db.execute(
            "CREATE TABLE IF NOT EXISTS kvstorage_schema (name TEXT PRIMARY KEY NOT NULL "
            "COLLATE NOCASE, version INTEGER NOT NULL) WITHOUT ROWID"
        )
        rows = list(
            await db.execute_fetchall(
                "SELECT version FROM kvstorage_schema WHERE name = ?", (self.table,)
            )
        )
        exists = list(
            await db.execute_fetchall(
                "SELECT 1 FROM sqlite_master WHERE name = ? COLLATE NOCASE", (self.table,)
            )
        )
        version = rows[0][0] if rows else None
        where = repr(self.path)
        if check_table(
            self.name,
            self.table,
            where,
            version=version,
            supported=SCHEMA_VERSION,
            exists=bool(exists),
        ):
            return
        # A rowid table, not WITHOUT ROWID: the latter is a little faster for tiny values
        # but several times slower for large ones (its searches load whole rows). value
        # goes last, so reading expiry or version never walks a large value's pages.
        await db.execute(
            f"CREATE TABLE {t} (key TEXT PRIMARY KEY NOT NULL, expiry REAL, "
            "mtime REAL NOT NULL, version INTEGER NOT NULL, value BLOB NOT NULL)"
        )
        await db.execute(
            f'CREATE INDEX "{self.table}_expiry" ON {t} (expiry) WHERE expiry IS NOT NULL'
        )
        await db.execute(
            "INSERT INTO kvstorage_schema (name, version) VALUES (?, ?)",
            (self.table, SCHEMA_VERSION),
        )

    async def _connection(self) -> aiosqlite.Connection:
        """The connection, once no transaction of this driver is open on it.

        aiosqlite runs a connection's statements one at a time, in the order they were
        queued. The caller queues its statement right after this returns (no ``await`` in
        between), so it runs before any later ``BEGIN`` and never inside a transaction.
        """
        db = self._db or await self._connect()
        if self._txn.locked():
            async with self._txn:
                pass
        return db

    def _idle(self) -> aiosqlite.Connection | None:
        """The connection when it is open and no transaction holds it, else None: the
        common case of :meth:`_connection`, without a coroutine."""
        return None if self._txn.locked() else self._db

    async def _transaction(self, work: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        """Run ``work`` inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` (taking the write lock up
        front, so it never fails half-way on another process's lock)."""
        db = self._db or await self._connect()
        async with self._txn:
            try:
                await db.execute("BEGIN IMMEDIATE")
                result = await work(db)
                await db.execute("COMMIT")
            except BaseException:
                # Queued even when cancelled, so it runs before any later statement.
                await _rollback(db)
                raise
            return result

    # -- single items -------------------------------------------------------------------

    async def get(self, key: str) -> Record | None:
        return await self._reads.read(key)

    async def _get_one(self, key: str) -> Record | None:
        db = self._idle() or await self._connection()
        rows: Iterable[Any] = await db.execute_fetchall(self._sql_get, (key, time.time()))
        for row in rows:
            return Record(*row)
        return None

    async def head(self, key: str) -> Stat | None:
        db = await self._connection()
        rows = await db.execute_fetchall(self._sql_head, (key, time.time()))
        for size, version, mtime, expiry in rows:
            return Stat(size, str(version), mtime, expiry)
        return None

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
        new = _new_version()
        if if_match is not None:
            try:
                version = int(if_match)
            except ValueError:
                raise ConditionFailedError(f"etag of {key!r} does not match") from None
            sql = self._sql_set_match
            params: tuple[Any, ...] = (value, expires_at, now, new, key, version, now)
        elif if_absent:
            sql, params = self._sql_set_absent, (key, value, expires_at, now, new, now)
        else:
            sql, params = self._sql_set, (key, value, expires_at, now, new)
        db = self._idle() or await self._connection()
        cursor = await db.execute(sql, params)
        if cursor.rowcount == 0:
            if if_absent:
                raise ConditionFailedError(f"key {key!r} already exists")
            raise ConditionFailedError(f"etag of {key!r} does not match")
        return str(new)

    async def remove(self, key: str) -> bool:
        # Only a live row counts; an expired one is left to sweep() (it is invisible).
        db = self._idle() or await self._connection()
        cursor = await db.execute(self._sql_remove, (key, time.time()))
        return bool(cursor.rowcount)

    async def touch(self, key: str, *, expires_at: float | None) -> bool:
        db = await self._connection()
        cursor = await db.execute(self._sql_touch, (expires_at, key, time.time()))
        return bool(cursor.rowcount)

    # -- batches ------------------------------------------------------------------------

    async def get_many(self, keys: Sequence[str]) -> list[Record | None]:
        rows = await self._rows_in_order(self._sql_get_many, keys) if keys else ()
        return [None if row[0] is None else Record(*row) for row in rows]

    async def get_values(self, keys: Sequence[str]) -> list[bytes | None]:
        rows = await self._rows_in_order(self._sql_get_values, keys) if keys else ()
        return [row[0] for row in rows]

    async def _rows_in_order(self, sql: str, keys: Sequence[str]) -> Iterable[Any]:
        """The rows of a ``json_each`` query (``sql``): one per key, in the keys' order."""
        db = self._idle() or await self._connection()
        return await db.execute_fetchall(
            # Text, not bytes: from SQLite 3.45 a BLOB argument may be read as binary JSONB.
            sql,
            (_json(keys if type(keys) is list else list(keys)).decode(), time.time()),
        )

    async def set_many(
        self, items: Sequence[tuple[str, bytes]], *, expires_at: float | None = None
    ) -> None:
        if len(items) <= 1:
            for key, value in items:
                await self.set(key, value, expires_at=expires_at)
            return
        now = time.time()
        rows = [(key, value, expires_at, now, _new_version()) for key, value in items]
        sql = self._sql_set
        await self._transaction(lambda db: db.executemany(sql, rows))

    async def remove_many(self, keys: Sequence[str]) -> int:
        async def remove(db: aiosqlite.Connection) -> int:
            removed = 0
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start : start + _CHUNK]
                sql = (
                    f"DELETE FROM {self._t} "
                    f"WHERE key IN ({', '.join('?' * len(chunk))}) AND {_LIVE}"
                )
                cursor = await db.execute(sql, (*chunk, time.time()))
                removed += cursor.rowcount
            return removed

        if not keys:
            return 0
        if len(keys) <= _CHUNK:
            return await remove(await self._connection())
        return await self._transaction(remove)

    # -- listing and clearing -----------------------------------------------------------

    def _range(self, base: str) -> tuple[str, tuple[str, ...]]:
        """The condition (and its parameters) selecting exactly the keys under ``base``,
        by primary-key range -- never ``LIKE``, so no character is special. ``""`` for
        the root."""
        return ("key >= ? AND key < ?", key_range(base)) if base else ("", ())

    scan = Driver.scan_by_pages  # listing is keyset pages: scan_pages below

    async def scan_pages(
        self, base: str = "", *, max_depth: int | None = None
    ) -> AsyncGenerator[list[str], None]:
        # Keyset pagination: each page is its own query that starts after the last key
        # seen, so no read transaction stays open while the caller iterates. Pages grow
        # from _FIRST_PAGE to _PAGE keys: a short listing costs one query, a long one few.
        # A page comes back as one JSON array (json_group_array), not a row per key: one
        # string that msgspec splits into keys for half the cost of a row each. Each row's
        # expiry is read only while some row has expired (the CASE picks one of the two
        # subqueries once per page): until then the query reads the key index alone.
        where = "key > ?1"
        params: tuple[Any, ...] = ()
        if base:
            where += " AND key < ?3"
            params += (key_range(base)[1],)
        if max_depth is not None:
            where += f" AND length(key) - length(replace(key, ':', '')) <= ?{3 + len(params)}"
            params += (max_depth + (base.count(":") + 1 if base else 0),)
        t = self._t

        def page_where(condition: str) -> str:
            return (
                f"(SELECT json_group_array(key) FROM (SELECT key FROM {t} WHERE {condition} "
                f"ORDER BY key LIMIT ?{3 + len(params)}))"
            )

        live = page_where(f"{where} AND (expiry IS NULL OR expiry > ?2)")
        sql = (
            f"SELECT CASE WHEN EXISTS (SELECT 1 FROM {t} WHERE expiry <= ?2) "
            f"THEN {live} ELSE {page_where(where)} END"
        )
        after = key_range(base)[0] if base else ""
        size = _FIRST_PAGE
        while True:
            db = self._idle() or await self._connection()
            # One row more than the page: a listing that fits ends without an empty query.
            [(array,)] = await db.execute_fetchall(sql, (after, time.time(), *params, size + 1))
            page = _decode_keys(array)
            if not page:
                return
            # The keys come in the subquery's order in SQLite, which the documentation
            # leaves open for an aggregate: sorting a sorted list costs a compare per key.
            page.sort()
            yield page
            if len(page) <= size:
                return
            after = page[-1]
            size = min(size * 4, _PAGE)

    async def clear(self, base: str = "") -> None:
        where, params = self._range(base)
        sql = f"DELETE FROM {self._t}" + (f" WHERE {where}" if where else "")
        db = await self._connection()
        await db.execute(sql, params)

    async def sweep(self, base: str = "") -> int:
        where, params = self._range(base)
        sql = f"DELETE FROM {self._t} WHERE expiry <= ?" + (f" AND {where}" if where else "")
        db = await self._connection()
        cursor = await db.execute(sql, (time.time(), *params))
        return int(cursor.rowcount)

    async def dispose(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with anyio.CancelScope(shield=True):
                await db.close()


def _daemonic(connection: aiosqlite.Connection) -> aiosqlite.Connection:
    """Make aiosqlite's worker thread a daemon (before it starts), so that a storage
    nobody disposed does not keep the process alive at exit. Stopping SQLite mid-write
    is safe: it is then the same as a crash, which SQLite survives."""
    thread = getattr(connection, "_thread", connection)  # aiosqlite < 0.21: a Thread itself
    if isinstance(thread, threading.Thread) and not thread.is_alive():
        thread.daemon = True
    return connection


def _probe(path: str) -> None:
    """Create the database file private to its owner (``0600``; SQLite gives its ``-wal``
    and ``-shm`` files the same mode) unless it exists, then check that it opens."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    # It may exist already, or its directory may not: sqlite3 reports that in its words.
    with contextlib.suppress(OSError):
        os.close(os.open(path, flags, 0o600))
    sqlite3.connect(path).close()


async def _rollback(db: aiosqlite.Connection) -> None:
    # Fails harmlessly when no transaction is open (BEGIN failed, or COMMIT got through).
    with contextlib.suppress(sqlite3.OperationalError):
        await db.execute("ROLLBACK")
