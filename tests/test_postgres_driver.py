"""PostgresDriver specifics, against PostgreSQL clusters the tests start themselves: what
the shared conformance suite cannot see (the table, URLs and secrets, round trips, other
processes, killed connections and restarts)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import pytest

from kvstorage import (
    ConditionFailedError,
    DriverError,
    DriverUnavailableError,
    Storage,
    create_storage,
)
from kvstorage.drivers import PostgresDriver, from_url
from kvstorage.drivers.postgres import SCHEMA_VERSION
from kvstorage.keys import normalize_key

from .backends.postgres import drop_tables, unique_table
from .support import reliability
from .support.children import read_lines, spawn
from .support.helpers import assert_redacted, eventually
from .support.servers import PostgresServer, free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
async def table(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """A table name of this test's own; the table is dropped afterwards."""
    name = unique_table()
    yield name
    await drop_tables(postgres_server.url, [name])


@pytest.fixture
async def storage(postgres_server: PostgresServer, table: str) -> AsyncIterator[Storage]:
    store = create_storage(PostgresDriver(postgres_server.url, table=table))
    yield store
    await store.dispose()


@pytest.fixture
async def admin(postgres_server: PostgresServer) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection to the same database, to look at what the driver did."""
    connection = await asyncpg.connect(postgres_server.url)
    yield connection
    await connection.close()


# -- keys, listing, batches --------------------------------------------------------------

LIKE_TRAPS = ["a%:1", "a_:1", "ab:1", "a:%", "a:_", "a:x%y", "a;:1", "a;", "a", "b:a", "a:b;c"]


async def test_listing_is_by_byte_range_whatever_the_database_collation(
    storage: Storage, admin: asyncpg.Connection
) -> None:
    # The test cluster's default collation is ICU en-US where it can be, which sorts
    # "a;" before "a:" -- a key column without COLLATE "C" would list wrongly.
    await storage.set_items({key: key for key in LIKE_TRAPS})
    assert sorted(await storage.get_keys("a")) == ["a:%", "a:_", "a:b;c", "a:x%y"]
    assert await storage.get_keys("a%") == ["a%:1"]
    assert await storage.get_keys("a_") == ["a_:1"]
    assert await storage.get_keys("a;") == ["a;:1"]
    assert sorted(await storage.get_keys("a", max_depth=0)) == ["a:%", "a:_", "a:b;c", "a:x%y"]
    await storage.clear("a_")
    await storage.clear("a")
    assert sorted(await storage.get_keys()) == ["a", "a%:1", "a;", "a;:1", "ab:1", "b:a"]


AWKWARD_KEYS = [
    "it's:quoted",
    "100%:sure",
    "snake_case:x_y",
    "back\\slash:\\",
    "ünïcødé:日本語:🙂",
    "a:b'c%d_e\\f",
    "x" * 1024,  # the longest key: 1024 bytes
    "é" * 512,  # 1024 bytes in two-byte characters
]


async def test_awkward_keys_round_trip_and_list(storage: Storage) -> None:
    await storage.set_items({key: i for i, key in enumerate(AWKWARD_KEYS)})
    for i, key in enumerate(AWKWARD_KEYS):
        assert await storage.get_item(key) == i
        assert (await storage.get_meta(key)) is not None
    # "\\" is a separator, as ":" and "/" are: listing shows keys normalized
    assert sorted(await storage.get_keys()) == sorted(map(normalize_key, AWKWARD_KEYS))
    assert await storage.get_keys("it's") == ["it's:quoted"]
    assert await storage.get_keys("100%") == ["100%:sure"]
    assert await storage.get_keys("snake_case") == ["snake_case:x_y"]
    assert await storage.get_keys("back") == ["back:slash"]
    assert await storage.get_keys("a:b'c%d_e") == ["a:b'c%d_e:f"]
    assert await storage.get_keys("ünïcødé:日本語") == ["ünïcødé:日本語:🙂"]
    assert await storage.remove_items(AWKWARD_KEYS) == len(AWKWARD_KEYS)
    assert await storage.get_keys() == []


async def test_base_a_never_matches_ab(storage: Storage) -> None:
    await storage.set_items({"a": 0, "a:1": 1, "ab": 2, "ab:1": 3, "a0:1": 4, "a:b:c": 5})
    assert sorted(await storage.get_keys("a")) == ["a:1", "a:b:c"]
    await storage.clear("a")
    assert sorted(await storage.get_keys()) == ["a", "a0:1", "ab", "ab:1"]


async def test_set_items_of_10000_keys_is_one_statement(
    postgres_server: PostgresServer, table: str
) -> None:
    statements: list[str] = []

    async def log_statements(connection: asyncpg.Connection) -> None:
        connection.add_query_logger(lambda query: statements.append(query.query))

    async def no_reset(connection: asyncpg.Connection) -> None:
        pass  # as the driver's own pool: no reset query after each call

    pool = await asyncpg.create_pool(
        postgres_server.url, min_size=1, max_size=1, init=log_statements, reset=no_reset
    )
    store = create_storage(PostgresDriver(pool=pool, table=table))
    try:
        await store.set_items({"warm:1": 1, "warm:2": 2})  # creates the table, learns types
        items = {f"bulk:{i:05d}": {"n": i, "s": "x" * 100} for i in range(10_000)}
        statements.clear()
        await store.set_items(items)
        assert len(statements) == 1, statements  # (its speed is the benchmark's business)
        got = await store.get_items(list(items))
        assert got == items
        assert len(await store.get_keys("bulk")) == 10_000
    finally:
        await store.dispose()
        assert not pool._closed  # a given pool is never closed
        await pool.close()


async def test_batches_larger_than_one_statement_and_duplicates(storage: Storage) -> None:
    keys = [f"b:{i}" for i in range(25_001)]
    await storage.set_items({key: key for key in keys})
    assert len(await storage.get_keys("b")) == len(keys)
    await storage.set_items([("d", 1), ("e", 1), ("d", 2)])  # the last one wins
    assert await storage.get_items(["d", "e", "d"]) == {"d": 2, "e": 1}
    assert await storage.remove_items([*keys[:1100], "b:missing"]) == 1100
    assert len(await storage.get_keys("b")) == len(keys) - 1100


async def test_listing_pages_through_many_keys_while_removing(storage: Storage) -> None:
    keys = {f"r:{i % 3}:{i:04d}" for i in range(2500)}
    await storage.set_items({key: 1 for key in keys})
    assert len(await storage.get_keys("r", max_depth=0)) == 0
    assert len(await storage.get_keys("r:1")) == 833
    seen = []
    async for key in storage.iter_keys("r"):
        seen.append(key)
        assert await storage.remove_item(key)
    assert sorted(seen) == sorted(keys)
    assert await storage.get_keys() == []


# -- expiry, conditions ------------------------------------------------------------------


async def test_expired_rows_do_not_count_and_sweep_deletes_them(
    storage: Storage, admin: asyncpg.Connection, table: str
) -> None:
    await storage.set_items({"e:1": 1, "e:2": 2, "x:1": 3}, ttl=0.2)
    await storage.set_item("e:keep", 4)

    async def expired() -> bool:
        return not await storage.has_item("e:1")

    await eventually(expired)
    assert await storage.remove_items(["e:1", "e:keep"]) == 1
    assert await storage.remove_item("e:2") is False
    assert await storage.touch("e:2", ttl=10) is False
    await storage.set_item("e:1", "new", if_absent=True)  # an expired row counts as absent
    assert await storage.get_item("e:1") == "new"
    assert await admin.fetchval(f'SELECT count(*) FROM "{table}"') == 3
    assert await storage.sweep("e") == 1
    assert await storage.sweep() == 1
    assert await admin.fetchval(f'SELECT count(*) FROM "{table}"') == 1


async def test_foreign_or_out_of_range_etags_fail_the_condition(storage: Storage) -> None:
    await storage.set_item("k", 1)
    for etag in ["not-a-postgres-etag", str(2**64), "", "1.5"]:
        with pytest.raises(ConditionFailedError):
            await storage.set_item("k", 2, if_match=etag)
    assert await storage.get_item("k") == 1


async def test_touch_keeps_value_and_etag(storage: Storage) -> None:
    await storage.set_item("k", [1])
    before = await storage.get_entry("k")
    assert await storage.touch("k", ttl=100)
    after = await storage.get_entry("k")
    assert before is not None and after is not None
    assert after.value == [1] and after.etag == before.etag
    assert after.meta.ttl is not None and 99 < after.meta.ttl <= 100
    assert await storage.touch("k", ttl=None)
    meta = await storage.get_meta("k")
    assert meta is not None and meta.expires_at is None and meta.size == len(b"[1]")


# -- the table ---------------------------------------------------------------------------


async def test_table_layout_and_schema_version(
    storage: Storage, admin: asyncpg.Connection, table: str
) -> None:
    await storage.set_item("k", 1)
    assert (
        await admin.fetchval("SELECT version FROM kvstorage_schema WHERE name = $1", table)
        == SCHEMA_VERSION
    )
    columns = await admin.fetch(
        "SELECT column_name, data_type, collation_name FROM information_schema.columns "
        "WHERE table_name = $1 ORDER BY ordinal_position",
        table,
    )
    assert [tuple(row) for row in columns] == [
        ("key", "text", "C"),
        ("expires_at", "double precision", None),
        ("mtime", "double precision", None),
        ("version", "bigint", None),
        ("value", "bytea", None),
    ]


async def test_foreign_table_and_newer_schema_are_refused(
    postgres_server: PostgresServer, admin: asyncpg.Connection
) -> None:
    foreign, ours = unique_table(), unique_table()
    await admin.execute(f'CREATE TABLE "{foreign}" (id integer PRIMARY KEY)')
    try:
        store = create_storage(PostgresDriver(postgres_server.url, table=foreign))
        with pytest.raises(DriverError, match="did not create"):
            await store.get_item("k")
        await store.dispose()

        store = create_storage(PostgresDriver(postgres_server.url, table=ours))
        await store.set_item("k", 1)
        await store.dispose()
        await admin.execute("UPDATE kvstorage_schema SET version = 99 WHERE name = $1", ours)
        store = create_storage(PostgresDriver(postgres_server.url, table=ours))
        with pytest.raises(DriverError, match="schema version 99"):
            await store.get_item("k")
        await store.dispose()
        assert await admin.fetchval(f'SELECT count(*) FROM "{ours}"') == 1
    finally:
        await drop_tables(postgres_server.url, [foreign, ours])


async def test_tables_are_separate_and_created_once_by_concurrent_drivers(
    postgres_server: PostgresServer,
) -> None:
    table, other_table = unique_table(), unique_table()
    stores = [create_storage(PostgresDriver(postgres_server.url, table=table)) for _ in range(6)]
    other = create_storage(PostgresDriver(postgres_server.url, table=other_table))
    try:
        async with anyio.create_task_group() as group:  # all create the table at once
            for i, store in enumerate(stores):
                group.start_soon(store.set_item, f"k{i}", i)
        await other.set_item("k0", "other")
        assert sorted(await stores[0].get_keys()) == [f"k{i}" for i in range(6)]
        assert await other.get_keys() == ["k0"]
    finally:
        for store in [*stores, other]:
            await store.dispose()
        await drop_tables(postgres_server.url, [table, other_table])


@pytest.mark.parametrize(
    "table", ['kv"; DROP TABLE kv; --', "kv x", "1kv", "", "pg_class", "kv-1", "k" * 64]
)
def test_table_name_must_be_an_identifier(table: str) -> None:
    with pytest.raises(ValueError, match="table"):
        PostgresDriver("postgresql://127.0.0.1/db", table=table)


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="min_size"):
        PostgresDriver("postgresql://127.0.0.1/db", min_size=5, max_size=2)
    with pytest.raises(ValueError, match="timeout"):
        PostgresDriver("postgresql://127.0.0.1/db", timeout=0)
    with pytest.raises(ValueError, match="dsn or pool"):
        PostgresDriver("postgresql://127.0.0.1/db", pool=object())


# -- URLs and secrets --------------------------------------------------------------------


def test_from_url() -> None:
    driver = from_url(
        "postgresql://u:pw@db.example:6543/app?table=cache&max_size=3&sslmode=disable"
    )
    assert isinstance(driver, PostgresDriver)
    assert driver.table == "cache" and driver.where == "db.example:6543"
    assert repr(driver) == (
        "PostgresDriver('postgresql://u:***@db.example:6543/app?sslmode=disable', table='cache')"
    )
    short = from_url("postgres://h/db")
    assert isinstance(short, PostgresDriver) and short.where == "h:5432"
    for bad in ["postgresql://h/db?max_size=many", "postgresql://h/db?table=a;b"]:
        with pytest.raises(ValueError):
            from_url(bad)


_SECRET_URLS = [
    "postgresql://kv:s3cret@127.0.0.1:{port}/db",
    "postgres://kv:s3cret@127.0.0.1:{port}/db?table=kv",
    "postgresql://kv@127.0.0.1:{port}/db?password=s3cret",
]


@pytest.mark.parametrize("url", _SECRET_URLS)
def test_repr_hides_the_password(url: str) -> None:
    port = free_port()
    text = repr(from_url(url.format(port=port)))
    assert_redacted(text)
    assert f"127.0.0.1:{port}" in text


@pytest.mark.parametrize("url", _SECRET_URLS)
async def test_unreachable_server_is_named_without_the_password(url: str) -> None:
    port = free_port()  # closed: nothing listens there
    store = create_storage(url.format(port=port))
    started = time.monotonic()
    with pytest.raises(DriverUnavailableError, match=f"127.0.0.1:{port}") as caught:
        await store.get_item("k")
    assert time.monotonic() - started < 5
    assert "s3cret" not in str(caught.value)
    await store.dispose()


def test_bad_url_errors_hide_the_password() -> None:
    for url in ["mysql://kv:s3cret@h/db", "postgresql://kv:s3cret@h/db?min_size=x"]:
        with pytest.raises(ValueError) as caught:
            from_url(url) if url.startswith("postgresql") else PostgresDriver(url)
        assert_redacted(str(caught.value))


async def test_wrong_password_is_unavailable_and_hidden(postgres_server: PostgresServer) -> None:
    url = f"postgresql://{postgres_server.user}:s3cret@127.0.0.1:{postgres_server.port}/postgres"
    store = create_storage(url)
    with pytest.raises(DriverUnavailableError, match=f"127.0.0.1:{postgres_server.port}") as caught:
        await store.get_item("k")
    assert "s3cret" not in str(caught.value)
    await store.dispose()


def test_trio_is_refused_with_a_clear_error(postgres_server: PostgresServer) -> None:
    import trio

    async def use() -> None:
        store = create_storage(PostgresDriver(postgres_server.url, table=unique_table()))
        await store.get_item("k")

    with pytest.raises(DriverError, match="only on asyncio, not on trio"):
        trio.run(use)


# -- watch, other processes --------------------------------------------------------------

WRITER_CHILD = """
import asyncio, sys
from kvstorage import create_storage

async def main() -> None:
    storage = create_storage(sys.argv[1])
    await storage.set_item("from:child", 1)
    await storage.set_items({"batch:1": 1, "batch:2": 2})
    await storage.remove_item("from:child")
    await storage.dispose()
    print("done", flush=True)

asyncio.run(main())
"""


async def test_watch_reports_writes_by_another_process(
    postgres_server: PostgresServer, storage: Storage, table: str
) -> None:
    events: list[tuple[str, str]] = []
    unwatch = await storage.watch(lambda event, key: events.append((event, key)))
    await storage.set_item("touched", 1)
    async with await spawn(WRITER_CHILD, f"{postgres_server.url}?table={table}") as child:
        with anyio.fail_after(30):
            assert await read_lines(child, 1) == ["done"]
    expected = [
        ("update", "from:child"),
        ("update", "batch:1"),
        ("update", "batch:2"),
        ("remove", "from:child"),
    ]

    async def seen() -> bool:
        return all(event in events for event in expected)

    await eventually(seen)
    count = len(events)
    assert await storage.touch("touched", ttl=60)  # expiry only: no event
    await storage.set_item("after", 1)
    await eventually(lambda: _contains(events, ("update", "after")))
    assert ("update", "touched") not in events[count:]
    await unwatch()


async def _contains(events: list[tuple[str, str]], event: tuple[str, str]) -> bool:
    return event in events


async def test_two_watchers_and_sweep_are_reported(
    postgres_server: PostgresServer, storage: Storage, table: str
) -> None:
    other = create_storage(PostgresDriver(postgres_server.url, table=table))
    mine: list[tuple[str, str]] = []
    theirs: list[tuple[str, str]] = []
    await storage.watch(lambda event, key: mine.append((event, key)))
    await other.watch(lambda event, key: theirs.append((event, key)))
    await storage.set_item("short", 1, ttl=0.05)
    await anyio.sleep(0.1)  # let it expire: sweep deletes only expired rows
    assert await other.sweep() == 1
    for events in (mine, theirs):
        await eventually(lambda events=events: _contains(events, ("remove", "short")))
    await other.dispose()


# -- faults ------------------------------------------------------------------------------


async def _terminate(admin: asyncpg.Connection, application: str) -> int:
    killed = await admin.fetchval(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = $1",
        application,
    )
    return int(killed)


async def test_terminated_connections_fail_cleanly_then_recover(
    postgres_server: PostgresServer, admin: asyncpg.Connection, table: str
) -> None:
    application = f"kvtest-{uuid.uuid4().hex[:8]}"
    driver = PostgresDriver(
        postgres_server.url, table=table, server_settings={"application_name": application}
    )
    store = create_storage(driver)
    events: list[tuple[str, str]] = []
    await store.watch(lambda event, key: events.append((event, key)))
    try:
        await store.set_item("k", 1)
        entry = await store.get_entry("k")
        assert entry is not None
        # A conditional write waiting for a row lock when its connection is killed.
        await admin.execute("BEGIN")
        await admin.execute(f'SELECT 1 FROM "{table}" WHERE key = $1 FOR UPDATE', "k")
        failure: list[BaseException] = []

        async def write() -> None:
            try:
                await store.set_item("k", 2, if_match=entry.etag)
            except DriverUnavailableError as exc:
                failure.append(exc)

        async def waiting() -> bool:
            return bool(
                await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE application_name = $1 AND wait_event_type = 'Lock'",
                    application,
                )
            )

        async with anyio.create_task_group() as group:
            group.start_soon(write)
            await eventually(waiting)
            started = time.monotonic()
            assert await _terminate(admin, application) >= 2  # the writer and the listener
        failed_after = time.monotonic() - started
        await admin.execute("ROLLBACK")
        assert len(failure) == 1 and failed_after < 5
        message = str(failure[0])
        assert f"127.0.0.1:{postgres_server.port}" in message
        assert postgres_server.password not in message
        # Not applied, and never resent: the etag is still the one read before.
        after = await store.get_entry("k")
        assert after is not None and after.value == 1 and after.etag == entry.etag
        # The same driver works again: every call from now on succeeds.
        await store.set_item("k", 2, if_match=entry.etag)
        with pytest.raises(ConditionFailedError):
            await store.set_item("k", 3, if_match=entry.etag)
        assert await store.get_item("k") == 2

        async def watching_again() -> bool:  # the listener reconnects by itself
            await store.set_item("again", len(events))
            return ("update", "again") in events

        await eventually(watching_again)
        reliability.record(
            "faults",
            "postgres: pg_terminate_backend of the pool's connections",
            in_flight_conditional_write_failed_s=round(failed_after, 2),
            applied=0,
            recovered_without_new_storage=True,
        )
    finally:
        await store.dispose()


async def test_outage_and_restart() -> None:
    server = PostgresServer()
    server.start()
    url = f"{server.url}?table=kv&timeout=2"
    store = create_storage(url)
    events: list[tuple[str, str]] = []
    await store.watch(lambda event, key: events.append((event, key)))
    try:
        await store.set_item("k", 1)
        await anyio.to_thread.run_sync(server.stop)
        slowest = 0.0
        calls: list[Any] = [store.get_item("k"), store.set_item("k", 2), store.get_keys()]
        calls += [store.set_item("k", 2, if_absent=True), store.get_items(["k"])]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(DriverUnavailableError, match=f"127.0.0.1:{server.port}") as caught:
                await call
            slowest = max(slowest, time.monotonic() - started)
            assert "pg-s3cret" not in str(caught.value) and "***" in str(caught.value)
        assert slowest < 5
        await anyio.to_thread.run_sync(server.start)  # same port, same data
        assert await store.get_item("k") == 1
        await store.set_item("k", 3)
        assert await store.get_items(["k"]) == {"k": 3}

        async def watching_again() -> bool:
            await store.set_item("again", 1)
            return ("update", "again") in events

        await eventually(watching_again, within=10)
        reliability.record(
            "faults",
            "postgres: server stopped and restarted under a running storage",
            calls_while_down=len(calls),
            failed_cleanly=len(calls),
            slowest_failure_s=round(slowest, 2),
            recovered_without_new_storage=True,
        )
    finally:
        await store.dispose()
        server.destroy()
