"""TieredDriver beyond the conformance suite (which runs it over memory, fs, sqlite and
redis): what near holds, how writes made elsewhere reach it, and its bound.

"Elsewhere" is a second driver on the same data (its own connections, as another process
would have) or a real child process.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import anyio
import pytest

from kvstorage import Driver, Record, Stat, Storage, create_storage
from kvstorage.cache import TieredDriver
from kvstorage.drivers import FSDriver, MemoryDriver, PostgresDriver, RedisDriver, SQLiteDriver
from kvstorage.errors import DriverUnavailableError
from kvstorage.wrappers import WrapperDriver

from .backends.postgres import drop_tables, unique_table
from .backends.redis import require_redis, unique_base
from .support.children import read_lines, spawn
from .support.helpers import assert_redacted, eventually
from .support.servers import RedisServer, free_port

pytestmark = pytest.mark.anyio


class CountingDriver(WrapperDriver):
    """Counts the reads that reach the driver inside (a real driver, not a mock)."""

    def __init__(self, inner: Driver) -> None:
        super().__init__(inner)
        self.reads = 0

    async def get(self, key: str) -> Record | None:
        self.reads += 1
        return await self.inner.get(key)

    async def get_many(self, keys: Sequence[str]) -> list[Record | None]:
        self.reads += len(keys)
        return await self.inner.get_many(keys)

    async def head(self, key: str) -> Stat | None:
        self.reads += 1
        return await self.inner.head(key)


class GatedDriver(WrapperDriver):
    """Holds the next ``get`` or ``set``, once the driver inside has done it (the moment a
    reply is on its way back), or before (``"set-before"``: a request on its way there),
    until the test releases it."""

    def __init__(self, inner: Driver) -> None:
        super().__init__(inner)
        self._gates: dict[str, tuple[anyio.Event, anyio.Event]] = {}

    def hold(self, operation: str) -> tuple[anyio.Event, anyio.Event]:
        """(reached, release) for the next ``operation``."""
        gate = self._gates[operation] = (anyio.Event(), anyio.Event())
        return gate

    async def _pass(self, operation: str) -> None:
        gate = self._gates.pop(operation, None)
        if gate is not None:
            gate[0].set()
            await gate[1].wait()

    async def get(self, key: str) -> Record | None:
        record = await self.inner.get(key)
        await self._pass("get")
        return record

    async def set(
        self,
        key: str,
        value: bytes,
        *,
        expires_at: float | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> str | None:
        await self._pass("set-before")
        etag = await self.inner.set(
            key, value, expires_at=expires_at, if_absent=if_absent, if_match=if_match
        )
        await self._pass("set")
        return etag


SharedFar = Callable[[], Driver]


@pytest.fixture(params=["redis", "postgres", "fs", "sqlite"])
async def shared_far(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SharedFar]:
    """A factory of drivers that all hold the same data (as other processes' would)."""
    made: list[Driver] = []
    kind = request.param
    if kind == "redis":
        url, base = request.getfixturevalue("redis_server").url, unique_base()
        make: SharedFar = lambda: RedisDriver(url, base=base)  # noqa: E731
    elif kind == "postgres":
        url, table = request.getfixturevalue("postgres_server").url, unique_table()
        make = lambda: PostgresDriver(url, table=table)  # noqa: E731
    elif kind == "fs":
        make = lambda: FSDriver(tmp_path / "shared")  # noqa: E731
    else:
        make = lambda: SQLiteDriver(tmp_path / "shared.db")  # noqa: E731

    def tracked() -> Driver:
        driver = make()
        made.append(driver)
        return driver

    yield tracked
    if kind == "redis":
        await made[0].clear()
    for driver in made:
        await driver.dispose()
    if kind == "postgres":
        await drop_tables(url, [table])


def test_arguments_are_checked() -> None:
    with pytest.raises(TypeError):
        TieredDriver(near=FSDriver("/tmp/x"), far=MemoryDriver())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        TieredDriver(far="redis://")  # type: ignore[arg-type]
    for bad in (0, -1, float("inf"), True):
        with pytest.raises(ValueError):
            TieredDriver(far=MemoryDriver(), max_stale=bad)
    memory = MemoryDriver()
    with pytest.raises(ValueError):
        TieredDriver(near=memory, far=memory)


def test_repr_hides_the_far_drivers_secrets() -> None:
    tiered = TieredDriver(far=RedisDriver("redis://:s3cret@127.0.0.1:1/0"))
    assert_redacted(repr(tiered))


async def test_near_is_bounded_by_max_entries() -> None:
    near = MemoryDriver(max_entries=16)
    storage = create_storage(TieredDriver(near=near, far=MemoryDriver()))
    await storage.set_items({f"k:{i}": i for i in range(200)})
    for i in range(200):
        assert await storage.get_item(f"k:{i}") == i
        assert len([key async for key in near.scan()]) <= 16
    await storage.get_item("k:184")  # the oldest, now used last
    await storage.get_item("k:0")  # evicts the least recently used: k:185
    kept = {key async for key in near.scan()}
    assert kept == {f"k:{i}" for i in (184, *range(186, 200), 0)}
    await storage.dispose()


async def test_reads_of_written_and_read_keys_stay_in_this_process(
    redis_server: RedisServer,
) -> None:
    """Over Redis: a write is kept in near (its own keyspace event does not drop it), a
    read fills near; neither costs another round trip until someone else writes."""
    base = unique_base()
    far = CountingDriver(RedisDriver(redis_server.url, base=base))
    storage = create_storage(TieredDriver(near=MemoryDriver(max_entries=100), far=far))
    events: list[tuple[str, str]] = []
    unwatch = await storage.watch(lambda event, key: events.append((event, key)))
    other = create_storage(RedisDriver(redis_server.url, base=base))
    try:
        await storage.set_item("mine", {"v": 1})
        await other.set_item("theirs", 1)

        async def echoed() -> bool:  # the events of both writes have been handled
            return {("update", "mine"), ("update", "theirs")} <= set(events)

        await eventually(echoed)
        for _ in range(50):
            assert await storage.get_item("mine") == {"v": 1}
            assert await storage.get_item("theirs") == 1
        entry = await storage.get_entry("mine")
        assert entry is not None and entry.etag == (await other.get_entry("mine")).etag  # type: ignore[union-attr]
        assert far.reads == 1  # "theirs", once

        await other.set_item("mine", {"v": 2})

        async def seen() -> bool:
            return await storage.get_item("mine") == {"v": 2}

        await eventually(seen)
        assert await storage.get_item("mine") == {"v": 2}
        assert far.reads >= 2  # the new value came from Redis
    finally:
        await unwatch()
        await other.clear()
        await other.dispose()
        await storage.dispose()


async def test_writers_on_both_sides_leave_no_stale_entry(shared_far: SharedFar) -> None:
    """Two tiered drivers on the same data write, read and update the same few keys at
    once; when they stop, both read what the far store holds -- within the event delay
    (watching far) or max_stale (SQLite) -- and no increment was lost."""
    stores = [
        create_storage(
            TieredDriver(near=MemoryDriver(max_entries=8), far=shared_far(), max_stale=0.5)
        )
        for _ in range(2)
    ]
    plain = create_storage(shared_far())
    keys = [f"r:{i}" for i in range(4)]
    rng = random.Random(7)

    async def work(storage_index: int) -> None:
        storage = stores[storage_index]
        for step in range(60):
            key = rng.choice(keys)
            action = rng.random()
            if action < 0.4:
                await storage.get_item(key)
            elif action < 0.8:
                await storage.set_item(key, [storage_index, step])
            elif action < 0.9:
                await storage.remove_item(key)
            else:
                await storage.get_items(keys)
            await storage.update_item("counter", lambda n: (n or 0) + 1)

    try:
        async with anyio.create_task_group() as group:
            for index in range(2):
                for _ in range(3):
                    group.start_soon(work, index)

        async def agree() -> bool:
            truth = await plain.get_items(keys)
            for storage in stores:
                if await storage.get_items(keys) != truth:
                    return False
                for key in keys:  # single reads too (near hits)
                    if await storage.get_item(key) != truth[key]:
                        return False
            return True

        await eventually(agree, within=5.0)
        assert await plain.get_item("counter") == 2 * 3 * 60
    finally:
        for storage in stores:
            await storage.dispose()
        await plain.dispose()


class Racing:
    """``mine``: a tiered driver whose far driver is gated; ``other``: a plain driver on the
    same data (another process); ``updates(key)``: the events mine has handled."""

    def __init__(self, shared_far: SharedFar) -> None:
        self.gated = GatedDriver(shared_far())
        self.tiered = TieredDriver(near=MemoryDriver(max_entries=8), far=self.gated)
        self.mine = create_storage(self.tiered)
        self.other = create_storage(shared_far())
        self.events: list[tuple[str, str]] = []

    async def __aenter__(self) -> Racing:
        self._unwatch = await self.mine.watch(lambda e, key: self.events.append((e, key)))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._unwatch()
        await self.mine.dispose()
        await self.other.dispose()

    async def handled(self, key: str, count: int) -> None:
        """Wait until mine has handled ``count`` update events of ``key``."""

        async def done() -> bool:
            return self.events.count(("update", key)) >= count

        await eventually(done)

    async def overtaken(self, operation: str, mine: Awaitable[object], events: int) -> None:
        """Run ``mine`` with its far ``operation`` held once far has done it; meanwhile the
        other writer sets ``k`` to "theirs"; release it once mine has handled ``events``
        update events of ``k``."""
        reached, release = self.gated.hold(operation)
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: mine)
            await reached.wait()  # done by far, the reply not yet back
            await self.other.set_item("k", "theirs")
            await self.handled("k", events)
            release.set()


EXACT = pytest.mark.parametrize("shared_far", ["redis", "postgres"], indirect=True)


@EXACT
async def test_a_write_overtaken_by_another_writer_is_not_kept(shared_far: SharedFar) -> None:
    async with Racing(shared_far) as race:
        await race.mine.set_item("k", "x")
        await race.handled("k", 1)
        await race.overtaken("set", race.mine.set_item("k", "mine"), 3)  # x, mine, theirs
        assert await race.mine.get_item("k") == "theirs"


@EXACT
async def test_a_read_overtaken_by_another_writer_is_not_kept(shared_far: SharedFar) -> None:
    async with Racing(shared_far) as race:
        await race.other.set_item("k", "old")
        await race.handled("k", 1)
        await race.overtaken("get", race.mine.get_item("k"), 2)  # far answered "old"
        assert await race.mine.get_item("k") == "theirs"


@EXACT
async def test_overlapping_writes_of_one_key_are_not_kept(shared_far: SharedFar) -> None:
    """Which of two concurrent writes far applied last is unknown here: neither is kept
    (their own events are recognized and drop nothing)."""
    async with Racing(shared_far) as race:
        reached, release = race.gated.hold("set")
        async with anyio.create_task_group() as group:
            group.start_soon(race.mine.set_item, "k", "first")
            await reached.wait()
            await race.mine.set_item("k", "second")
            await race.handled("k", 2)
            release.set()
        assert await race.mine.get_item("k") == "second"
        assert await race.other.get_item("k") == "second"

        reached, release = race.gated.hold("set-before")
        async with anyio.create_task_group() as group:
            group.start_soon(race.mine.set_item, "k", "third")
            await reached.wait()  # on its way: far applies it after the next one
            await race.mine.set_item("k", "fourth")
            release.set()
        await race.handled("k", 4)
        assert await race.other.get_item("k") == "third"
        assert await race.mine.get_item("k") == "third"


async def test_without_watching_far_never_staler_than_max_stale(tmp_path: Path) -> None:
    """SQLite cannot watch: another writer's value shows within max_stale, and until then
    the near entry is what is read."""
    path = tmp_path / "db.sqlite"
    max_stale = 0.4
    reader = create_storage(TieredDriver(far=SQLiteDriver(path), max_stale=max_stale))
    writer = create_storage(SQLiteDriver(path))
    try:
        for round_ in range(3):
            key = f"k{round_}"
            await writer.set_item(key, "old")
            loaded = time.monotonic()
            assert await reader.get_item(key) == "old"  # now in near
            loaded_by = time.monotonic()
            await writer.set_item(key, "new")
            first = await reader.get_item(key)
            if time.monotonic() - loaded < max_stale / 2:  # else the machine stalled
                assert first == "old"
            # never staler than max_stale: a read begun max_stale after the load is fresh
            # (however long the machine stalled before it began)
            while True:
                started = time.monotonic()
                if await reader.get_item(key) == "new":
                    break
                assert started - loaded_by <= max_stale + 0.1
                await anyio.sleep(0.005)
    finally:
        await reader.dispose()
        await writer.dispose()


WRITER_CHILD = """
import asyncio, sys, time
from kvstorage import create_storage
from kvstorage.cache import TieredDriver
from kvstorage.drivers import RedisDriver

async def main() -> None:
    storage = create_storage(TieredDriver(far=RedisDriver(sys.argv[1], base=sys.argv[2])))
    await storage.has_item("k")
    print("ready", flush=True)
    for line in sys.stdin:
        await storage.set_item("k", int(line))
        print("written", flush=True)
    await storage.dispose()

asyncio.run(main())
"""


async def test_a_write_in_another_process_reaches_near_within_the_event_delay(
    redis_server: RedisServer,
) -> None:
    base = unique_base()
    tiered = TieredDriver(far=RedisDriver(redis_server.url, base=base))
    storage = create_storage(tiered)
    await storage.set_item("k", -1)
    child = await spawn(WRITER_CHILD, redis_server.url, base)
    delays = []
    try:
        with anyio.fail_after(60):
            assert await read_lines(child, 1) == ["ready"]
            assert child.stdin is not None
            for i in range(20):
                assert await storage.get_item("k") == i - 1
                assert tiered.near.peek("k") is not None  # served from near
                await child.stdin.send(f"{i}\n".encode())
                assert await read_lines(child, 1) == ["written"]
                written = time.monotonic()
                # the keyspace event is far quicker (a stall of the machine aside)
                await eventually(lambda i=i: _holds(storage, i), within=2, interval=0.001)
                delays.append(time.monotonic() - written)
            await child.stdin.aclose()
            assert await child.wait() == 0
    finally:
        if child.returncode is None:
            child.kill()
        await child.aclose()
        await storage.clear()
        await storage.dispose()
    assert len(delays) == 20


async def _holds(storage: Storage, value: int) -> bool:
    return bool(await storage.get_item("k") == value)


async def test_an_unreachable_far_empties_near(tmp_path: Path) -> None:
    """Events may be lost while Redis is away: the first failed call empties near (until
    then near still answers)."""
    require_redis()
    server = RedisServer(free_port(), tmp_path / "redis")
    server.start()
    tiered = TieredDriver(far=RedisDriver(server.url, base=uuid.uuid4().hex, timeout=1.0))
    storage = create_storage(tiered)
    try:
        await storage.set_item("a", 1)
        await storage.set_item("b", 2)
        assert tiered.near.peek("a") is not None
        server.stop()
        assert await storage.get_item("a") == 1  # near answers without Redis
        with pytest.raises(DriverUnavailableError):
            await storage.get_item("missing")
        assert tiered.near.peek("a") is None and tiered.near.peek("b") is None
        with pytest.raises(DriverUnavailableError):
            await storage.get_item("a")
    finally:
        server.stop()
        await storage.dispose()
