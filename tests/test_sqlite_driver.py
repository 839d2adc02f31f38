"""SQLiteDriver specifics: what the shared conformance suite cannot see (the file on disk,
the schema, URLs, other connections and processes, crashes)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import sqlite3
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from kvstorage import (
    ConditionFailedError,
    DriverError,
    DriverUnavailableError,
    Storage,
    create_storage,
)
from kvstorage.drivers import SQLiteDriver, from_url
from kvstorage.drivers import sqlite as sqlite_module
from kvstorage.drivers.base import Record
from kvstorage.drivers.sqlite import SCHEMA_VERSION

from .support import reliability
from .support.children import read_lines, run_counters, spawn
from .support.helpers import ROOT, eventually

pytestmark = pytest.mark.anyio


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "kv.db"


@pytest.fixture
async def storage(db_path: Path) -> AsyncIterator[Storage]:
    store = create_storage(SQLiteDriver(db_path))
    yield store
    await store.dispose()


def query(path: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    """Read the database file directly, with the plain sqlite3 module."""
    with sqlite3.connect(path) as db:
        return db.execute(sql, params).fetchall()


# -- listing -----------------------------------------------------------------------------

LIKE_TRAPS = ["a%:1", "a_:1", "ab:1", "a:%", "a:_", "a:x%y", "a;:1", "a;", "a", "b:a", "a:b;c"]


async def test_listing_treats_like_wildcards_and_semicolons_as_ordinary(
    storage: Storage,
) -> None:
    await storage.set_items({key: key for key in LIKE_TRAPS})
    assert sorted(await storage.get_keys("a")) == ["a:%", "a:_", "a:b;c", "a:x%y"]
    assert await storage.get_keys("a%") == ["a%:1"]
    assert await storage.get_keys("a_") == ["a_:1"]
    assert await storage.get_keys("a;") == ["a;:1"]
    assert sorted(await storage.get_keys("a", max_depth=0)) == ["a:%", "a:_", "a:b;c", "a:x%y"]
    await storage.clear("a_")
    await storage.clear("a")
    assert sorted(await storage.get_keys()) == ["a", "a%:1", "a;", "a;:1", "ab:1", "b:a"]


async def test_listing_pages_through_many_keys(storage: Storage) -> None:
    keys = [f"p:{i % 3}:{i:05d}" for i in range(1234)] + [f"p:{i:05d}" for i in range(700)]
    await storage.set_items({key: 1 for key in keys})
    assert sorted(await storage.get_keys("p")) == sorted(keys)
    assert len(await storage.get_keys("p", max_depth=0)) == 700
    assert len(await storage.get_keys("p:1")) == 411


async def test_removing_keys_while_listing_them(storage: Storage) -> None:
    keys = {f"r:{i:04d}" for i in range(1100)}
    await storage.set_items({key: 1 for key in keys})
    seen = []
    async for key in storage.iter_keys("r"):
        seen.append(key)
        assert await storage.remove_item(key)
    assert sorted(seen) == sorted(keys)
    assert await storage.get_keys() == []


def expire(path: Path, *keys: str) -> None:
    """Give ``keys`` an expiry in the past, behind the driver's back."""
    with sqlite3.connect(path) as db:
        db.executemany("UPDATE kv SET expiry = 1 WHERE key = ?", [(key,) for key in keys])


@pytest.mark.parametrize("count", [0, 1, 3, 4, 5, 15, 16, 17, 28, 29, 30, 60])
@pytest.mark.parametrize("with_expired", [False, True])
async def test_listing_pages_end_exactly_at_their_boundaries(
    storage: Storage,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    count: int,
    with_expired: bool,
) -> None:
    # Pages of 3, then 12: each query asks one row more than its page.
    monkeypatch.setattr(sqlite_module, "_FIRST_PAGE", 3)
    monkeypatch.setattr(sqlite_module, "_PAGE", 12)
    keys = [f"p:{i:03d}" for i in range(count)]
    await storage.set_items({key: 1 for key in [*keys, "p", "o:1", "p;1", "q:1", "p:x:deep"]})
    expected = [*keys, "p:x:deep"]
    if with_expired:  # then every row's expiry is read, not the key index alone
        gone = keys[::4]
        expire(db_path, *gone, "q:1")
        expected = [key for key in expected if key not in gone]
    driver = storage.get_mount().driver
    pages = [page async for page in driver.scan_pages("p")]
    assert all(pages)
    assert [key for page in pages for key in page] == expected
    assert await storage.get_keys("p") == expected
    assert [key async for key in storage.iter_keys("p")] == expected
    assert await storage.get_keys("p", max_depth=0) == expected[:-1]


async def test_listing_returns_keys_that_json_escapes_exactly_and_in_order(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A page comes back as one JSON array: quotes, brackets, commas, non-ASCII and
    # characters JSON escapes or not must come back as they went in, in byte order.
    monkeypatch.setattr(sqlite_module, "_FIRST_PAGE", 2)
    monkeypatch.setattr(sqlite_module, "_PAGE", 4)
    segments = ['a"b', "a'b", "[x]", "x,y", "a b", "{}", "e\u0301", "żółw", "🐢", "\u2028"]
    segments += ["\ufeff", "u\u2028v", "日本", "z" * 200, "%_*?"]
    keys = [f"j:{segment}" for segment in segments]
    await storage.set_items({key: 1 for key in [*keys, "i:1", "k:1"]})
    expected = sorted(keys)  # code point order: UTF-8 byte order
    assert await storage.get_keys("j") == expected
    assert await storage.get_keys() == ["i:1", *expected, "k:1"]
    assert [key async for key in storage.iter_keys("j")] == expected


async def test_concurrent_reads_go_in_one_batch_query(storage: Storage, db_path: Path) -> None:
    driver = storage.get_mount().driver
    await storage.set_items({f"c:{i}": i for i in range(60)})
    expire(db_path, "c:7")
    keys = [f"c:{i}" for i in range(60)] + ["c:missing", "c:3", "c:3"]
    batches: list[int] = []
    get_many = driver.get_many

    async def counted(keys: list[str]) -> list[Record | None]:
        batches.append(len(keys))
        return await get_many(keys)

    driver.get_many = counted  # type: ignore[method-assign]
    values = await asyncio.gather(*(storage.get_item(key, "absent") for key in keys))
    expected = [*range(60), "absent", 3, 3]
    expected[7] = "absent"
    assert values == expected
    assert batches == [len(keys) - 1]  # the first read went alone; the rest waited for it
    assert await storage.get_item("c:1") == 1 and batches == [len(keys) - 1]


async def test_a_cancelled_read_leaves_its_batch_alone(storage: Storage) -> None:
    await storage.set_items({f"k:{i}": i for i in range(10)})
    tasks = [asyncio.create_task(storage.get_item(f"k:{i}")) for i in range(10)]
    await asyncio.sleep(0)  # every read started: the first alone, the others in a batch
    tasks[5].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[5], asyncio.CancelledError)
    assert results[:5] + results[6:] == [0, 1, 2, 3, 4, 6, 7, 8, 9]


async def test_reads_of_a_cancelled_batch_are_cancelled(storage: Storage) -> None:
    await storage.set_items({f"k:{i}": i for i in range(5)})
    driver = storage.get_mount().driver
    assert isinstance(driver, SQLiteDriver)
    tasks = [asyncio.create_task(storage.get_item(f"k:{i}")) for i in range(5)]
    await asyncio.sleep(0)  # the first read went alone; the batch of the others is queued
    driver._reads.cancel()  # as when the loop closes, here before the batch started
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0] == 0
    assert all(isinstance(result, asyncio.CancelledError) for result in results[1:])
    assert await asyncio.gather(*(storage.get_item(f"k:{i}") for i in range(5))) == [*range(5)]


async def test_a_failed_batch_fails_each_of_its_reads(storage: Storage, db_path: Path) -> None:
    await storage.set_items({f"k:{i}": i for i in range(10)})
    with sqlite3.connect(db_path) as db:
        db.execute("ALTER TABLE kv RENAME TO moved")
    results = await asyncio.gather(
        *(storage.get_item(f"k:{i}") for i in range(10)), return_exceptions=True
    )
    assert all(isinstance(result, DriverError) for result in results)
    with sqlite3.connect(db_path) as db:
        db.execute("ALTER TABLE moved RENAME TO kv")
    assert await asyncio.gather(*(storage.get_item(f"k:{i}") for i in range(10))) == [*range(10)]


async def test_get_many_answers_every_key_in_its_place(storage: Storage, db_path: Path) -> None:
    keys = [f"m:{i}" for i in range(1500)] + ["m:\u00e9\"'[]{}%_", "m:🐢"]
    await storage.set_items({key: key for key in keys})
    expire(db_path, *keys[::7])
    asked = [*keys, "m:missing", *keys[:50], "m:"]
    random.Random(18).shuffle(asked)
    driver = storage.get_mount().driver
    records = await driver.get_many(asked)
    assert len(records) == len(asked)
    live = set(keys) - set(keys[::7])
    for key, record in zip(asked, records, strict=True):
        if key in live:
            assert record is not None and json.loads(record.value) == key
            assert record == await driver.get(key)
        else:
            assert record is None
    assert await driver.get_many([]) == []


# -- batches, expiry ---------------------------------------------------------------------


async def test_batches_larger_than_one_statement(storage: Storage) -> None:
    keys = [f"b:{i}" for i in range(1201)]
    await storage.set_items({key: key for key in keys})
    got = await storage.get_items(reversed(keys))
    assert list(got) == keys[::-1]
    assert all(got[key] == key for key in keys)
    assert await storage.remove_items([*keys[:1100], "b:missing"]) == 1100
    assert sorted(await storage.get_keys("b")) == sorted(keys[1100:])


async def test_expired_rows_do_not_count_and_sweep_deletes_them(
    storage: Storage, db_path: Path
) -> None:
    await storage.set_items({"e:1": 1, "e:2": 2, "x:1": 3}, ttl=0.2)
    await storage.set_item("e:keep", 4)
    await eventually(lambda: _missing(storage, "e:1"))
    assert await storage.remove_items(["e:1", "e:keep"]) == 1
    assert await storage.remove_item("e:2") is False
    assert query(db_path, "SELECT count(*) FROM kv") == [(3,)]  # expired, invisible, kept
    assert await storage.sweep("e") == 2
    assert await storage.sweep() == 1
    assert query(db_path, "SELECT count(*) FROM kv") == [(0,)]


async def _missing(storage: Storage, key: str) -> bool:
    return not await storage.has_item(key)


async def test_if_match_with_a_foreign_etag_fails(storage: Storage) -> None:
    await storage.set_item("k", 1)
    with pytest.raises(ConditionFailedError):
        await storage.set_item("k", 2, if_match="not-a-sqlite-etag")
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
    assert (await storage.get_meta("k")).expires_at is None  # type: ignore[union-attr]


# -- the file, the schema, reopening -----------------------------------------------------


async def test_schema_is_created_versioned_and_in_wal_mode(storage: Storage, db_path: Path) -> None:
    await storage.set_item("k", 1)
    assert query(db_path, "SELECT version FROM kvstorage_schema WHERE name = 'kv'") == [
        (SCHEMA_VERSION,)
    ]
    columns = [row[1] for row in query(db_path, "PRAGMA table_info(kv)")]
    assert sorted(columns) == ["expiry", "key", "mtime", "value", "version"]
    assert query(db_path, "PRAGMA journal_mode") == [("wal",)]


@pytest.mark.parametrize("umask", [0o000, 0o022])
async def test_database_files_are_private_whatever_the_umask(db_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        storage = create_storage(SQLiteDriver(db_path))
        await storage.set_item("k", 1)  # WAL mode: the -wal and -shm files exist now
        files = [db_path, db_path.with_name("kv.db-wal"), db_path.with_name("kv.db-shm")]
        assert {path.name: stat.S_IMODE(os.stat(path).st_mode) for path in files} == {
            path.name: 0o600 for path in files
        }
        await storage.dispose()
    finally:
        os.umask(old)


async def test_an_existing_database_keeps_its_mode(db_path: Path) -> None:
    sqlite3.connect(db_path).close()
    os.chmod(db_path, 0o640)  # the owner chose to share it with a group: not ours to change
    storage = create_storage(SQLiteDriver(db_path))
    await storage.set_item("k", 1)
    await storage.dispose()
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o640


async def test_reopen_keeps_data_etags_and_ttl(db_path: Path) -> None:
    first = create_storage(SQLiteDriver(db_path))
    await first.set_item("keep", {"a": [1, 2]})
    await first.set_item("long", "x", ttl=600)
    written = time.monotonic()
    await first.set_item("short", "y", ttl=0.5)
    long_meta = await first.get_meta("long")
    keep_entry = await first.get_entry("keep")
    await first.dispose()

    second = create_storage(SQLiteDriver(db_path))
    entry = await second.get_entry("keep")
    assert entry is not None and keep_entry is not None
    assert entry.value == {"a": [1, 2]} and entry.etag == keep_entry.etag
    meta = await second.get_meta("long")
    assert meta is not None and long_meta is not None
    assert meta.expires_at == long_meta.expires_at and meta.mtime == long_meta.mtime
    short = await second.get_item("short")
    if time.monotonic() - written < 0.5:  # else a stall outlived the ttl: it may be gone
        assert short == "y"
    await eventually(lambda: _missing(second, "short"))
    assert sorted(await second.get_keys()) == ["keep", "long"]
    await second.dispose()


async def test_tables_in_one_file_are_separate(db_path: Path) -> None:
    one = create_storage(SQLiteDriver(db_path, table="one"))
    two = create_storage(SQLiteDriver(db_path, table="two"))
    await one.set_item("k", 1)
    await two.set_item("k", 2)
    await two.clear()
    assert await one.get_item("k") == 1
    assert await two.get_keys() == []
    same = create_storage(SQLiteDriver(db_path, table="ONE"))  # SQL names ignore case
    assert await same.get_item("k") == 1
    for store in (one, two, same):
        await store.dispose()


@pytest.mark.parametrize(
    "table",
    ['kv"; DROP TABLE kv; --', "kv x", "1kv", "", "sqlite_master", "SQLITE_x", "kv-1", "k" * 64],
)
def test_table_name_must_be_an_identifier(db_path: Path, table: str) -> None:
    with pytest.raises(ValueError, match="table"):
        SQLiteDriver(db_path, table=table)


async def test_good_table_names(db_path: Path) -> None:
    for table in ["_x", "Cache_2", "k" * 63]:
        store = create_storage(SQLiteDriver(db_path, table=table))
        await store.set_item("k", table)
        assert await store.get_item("k") == table
        await store.dispose()


async def test_foreign_table_and_newer_schema_are_refused(db_path: Path) -> None:
    with sqlite3.connect(db_path) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    store = create_storage(SQLiteDriver(db_path, table="users"))
    with pytest.raises(DriverError, match="did not create"):
        await store.get_item("k")
    await store.dispose()

    store = create_storage(SQLiteDriver(db_path))
    await store.set_item("k", 1)
    await store.dispose()
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE kvstorage_schema SET version = ? WHERE name = 'kv'", (99,))
    store = create_storage(SQLiteDriver(db_path))
    with pytest.raises(DriverError, match="schema version 99"):
        await store.get_item("k")
    await store.dispose()
    assert query(db_path, "SELECT count(*) FROM kv") == [(1,)]


async def test_unopenable_file_raises_driver_unavailable(tmp_path: Path) -> None:
    missing_dir = tmp_path / "no" / "such" / "dir" / "kv.db"
    store = create_storage(SQLiteDriver(missing_dir))
    with pytest.raises(DriverUnavailableError, match=re.escape(str(missing_dir))):
        await store.get_item("k")
    await store.dispose()

    not_a_db = tmp_path / "garbage.db"
    not_a_db.write_bytes(b"this is not a database" * 100)
    store = create_storage(SQLiteDriver(not_a_db))
    with pytest.raises(DriverUnavailableError, match=r"garbage\.db"):
        await store.set_item("k", 1)
    await store.dispose()
    assert not_a_db.read_bytes() == b"this is not a database" * 100


def test_bad_options_are_rejected(db_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteDriver(db_path, synchronous="SOMETIMES")
    with pytest.raises(ValueError, match="busy_timeout"):
        SQLiteDriver(db_path, busy_timeout=-1)
    with pytest.raises(ValueError, match="path"):
        SQLiteDriver("")


def test_trio_is_refused_with_a_clear_error(db_path: Path) -> None:
    import trio

    async def use() -> None:
        store = create_storage(SQLiteDriver(db_path))
        await store.get_item("k")

    with pytest.raises(DriverError, match="only on asyncio, not on trio"):
        trio.run(use)
    assert not db_path.exists()


# -- URLs --------------------------------------------------------------------------------


def test_from_url_follows_sqlalchemy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = from_url("sqlite:///data/app.db")
    assert isinstance(relative, SQLiteDriver)
    assert relative.path == str(tmp_path / "data" / "app.db")
    absolute = from_url("sqlite:////var/lib/app%20x.db?table=cache&busy_timeout=2.5")
    assert isinstance(absolute, SQLiteDriver)
    assert (absolute.path, absolute.table) == ("/var/lib/app x.db", "cache")
    for url in ["sqlite://:memory:", "sqlite://", "sqlite:///:memory:"]:
        memory = from_url(url)
        assert isinstance(memory, SQLiteDriver) and memory.path == ":memory:"
    for bad in ["sqlite://host/app.db", "sqlite:///app.db?tabel=x", "sqlite:///x.db?table=a;b"]:
        with pytest.raises(ValueError):
            from_url(bad)


async def test_memory_database_via_url() -> None:
    store = create_storage("sqlite://:memory:")
    await store.set_items({"a:1": 1, "a:2": 2})
    assert sorted(await store.get_keys("a")) == ["a:1", "a:2"]
    await store.dispose()


# -- several connections -----------------------------------------------------------------


async def test_conditions_are_atomic_across_connections(db_path: Path) -> None:
    stores = [create_storage(SQLiteDriver(db_path)) for _ in range(4)]
    winners = []

    async def claim(i: int) -> None:
        try:
            await stores[i % 4].set_item("lock", i, if_absent=True)
        except ConditionFailedError:
            return
        winners.append(i)

    async def increment(i: int) -> None:
        await stores[i % 4].update_item("n", lambda n: (n or 0) + 1, retries=1000)

    async with anyio.create_task_group() as group:
        for i in range(40):
            group.start_soon(claim, i)
            group.start_soon(increment, i)
    assert len(winners) == 1
    assert await stores[0].get_item("lock") == winners[0]
    assert await stores[1].get_item("n") == 40
    for store in stores:
        await store.dispose()


async def test_batches_interleave_safely_with_single_operations(db_path: Path) -> None:
    store = create_storage(SQLiteDriver(db_path))

    async def batch(n: int) -> None:
        await store.set_items({f"batch:{n}:{i}": i for i in range(300)})

    async def single(n: int) -> None:
        await store.set_item(f"single:{n}", n)
        assert await store.get_item(f"single:{n}") == n

    async with anyio.create_task_group() as group:
        for n in range(10):
            group.start_soon(batch, n)
            group.start_soon(single, n)
    assert len(await store.get_keys("batch")) == 3000
    assert len(await store.get_keys("single")) == 10
    await store.dispose()


async def test_a_cancelled_batch_leaves_no_transaction_open(db_path: Path) -> None:
    driver = SQLiteDriver(db_path)
    store = create_storage(driver)
    other = create_storage(SQLiteDriver(db_path, busy_timeout=2))
    items = {f"c:{i}": "x" * 100 for i in range(20_000)}
    for delay in [0, 0.001, 0.005, 0.02]:
        with anyio.move_on_after(delay):
            await store.set_items(items)
        await store.set_item("after", delay)  # the connection is usable ...
        await other.set_item("other", delay)  # ... and holds no write lock
        assert await other.get_item("after") == delay
        assert len(await store.get_keys("c")) in (0, len(items))  # all or nothing
        await store.clear("c")
    await store.dispose()
    await other.dispose()


# -- other processes ---------------------------------------------------------------------

CRASH_CHILD = """
import asyncio, sys
from kvstorage import create_storage
from kvstorage.drivers import SQLiteDriver

async def main() -> None:
    store = create_storage(SQLiteDriver(sys.argv[1]))
    values = [bytes(range(256)) * 4096, bytes(range(255, -1, -1)) * 4096]
    await store.set_item_raw("blob", values[0])
    print("started", flush=True)
    i = 0
    while True:
        i += 1
        await store.set_item_raw("blob", values[i % 2])

asyncio.run(main())
"""


@pytest.mark.slow
async def test_killed_writer_never_leaves_a_torn_value(db_path: Path) -> None:
    values = (bytes(range(256)) * 4096, bytes(range(255, -1, -1)) * 4096)
    for _ in range(22):
        async with await spawn(CRASH_CHILD, str(db_path)) as child:
            with anyio.fail_after(30):
                assert await read_lines(child, 1) == ["started"]
            await anyio.sleep(random.uniform(0, 0.05))  # kill at a random moment
            child.send_signal(signal.SIGKILL)
            assert await child.wait() == -signal.SIGKILL
        driver = SQLiteDriver(db_path)
        record = await driver.get("blob")
        assert record is not None and record.value in values
        assert await driver.head("blob") is not None
        await driver.dispose()
        reliability.record("faults", "sqlite: SIGKILL during 1 MiB overwrites", kills=1, intact=1)
    assert query(db_path, "PRAGMA integrity_check") == [("ok",)]


@pytest.mark.slow
async def test_two_processes_increment_exactly(db_path: Path) -> None:
    store = create_storage(SQLiteDriver(db_path))
    await store.set_item("counter", 0)
    await run_counters(f"sqlite:///{db_path}", 200)
    assert await store.get_item("counter") == 400
    await store.dispose()


FORGETFUL_CHILD = """
import asyncio, sys
from kvstorage import create_storage

store = create_storage("sqlite:///" + sys.argv[1])  # never disposed

async def main() -> None:
    await store.set_item("left", "behind")

asyncio.run(main())
"""


async def test_a_storage_never_disposed_does_not_keep_the_process_alive(db_path: Path) -> None:
    with anyio.fail_after(30):
        child = await anyio.run_process(
            [sys.executable, "-c", FORGETFUL_CHILD, str(db_path)], cwd=ROOT, check=False
        )
    assert child.returncode == 0, child.stderr.decode()
    store = create_storage(SQLiteDriver(db_path))
    assert await store.get_item("left") == "behind"
    await store.dispose()
