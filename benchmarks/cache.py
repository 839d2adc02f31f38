"""The cache workload (``python -m benchmarks --cache``), on a Redis server of its own:

1. **Zipf** -- reads of keys drawn from a Zipf distribution (s = 1.1) over 10^5 keys,
   with 5% writes, one operation at a time: Redis alone vs ``TieredDriver(memory, redis)``
   in the same run. Round trips are counted by the server (``total_commands_processed``).
   The tiered driver runs warm (its near cache, sized for the key set, has seen every
   key once: a long-running process), cold (empty at the start of the measured run) and
   with a near cache of 10^4 entries (warmed by the same workload).
2. **Hot key** -- ``get_item`` of the hottest key through the warm tiered driver against
   the memory driver, measured paired (chunks of 1,000 reads taking turns, shuffled, no
   garbage collection while timing; the median ratio over the chunks).
3. **Staleness** -- two processes over one Redis: a child writes a key that this
   process's tiered driver holds in near; the window is from the write returning in the
   child to the key leaving near here (``CLOCK_MONOTONIC`` is shared by processes).
4. **cached** -- ``kvstorage.cache.cached`` over Redis (and over the tiered driver) vs
   aiocache's ``cached`` and ``cached_stampede`` on the same server: hits, misses, and
   100 concurrent callers of one missing key (how many times the function runs).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from rich.console import Console
from rich.table import Table

from kvstorage import Storage, create_storage
from kvstorage.cache import TieredDriver, cached
from kvstorage.drivers import MemoryDriver, RedisDriver
from tests.support.children import read_lines, spawn

from .workload import value

KEYS = 100_000
ZIPF_S = 1.1
WRITES = 0.05


@dataclass
class CacheReport:
    """Every figure of the cache workload, for the tables and ``--json``."""

    zipf: list[dict[str, Any]] = field(default_factory=list)
    hot_key: dict[str, float] = field(default_factory=dict)
    staleness_ms: dict[str, float] = field(default_factory=dict)
    decorator: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON-able data."""
        return {
            "zipf": self.zipf,
            "hot_key": self.hot_key,
            "staleness_ms": self.staleness_ms,
            "cached": self.decorator,
        }


class ServerCommands:
    """Commands the Redis server has processed (its own count)."""

    def __init__(self, url: str) -> None:
        from redis.asyncio import Redis

        self._client = Redis.from_url(url)

    async def count(self) -> int:
        info = await self._client.info("stats")
        return int(info["total_commands_processed"])

    async def close(self) -> None:
        await self._client.aclose()


def zipf_operations(count: int, seed: int) -> list[tuple[bool, int]]:
    """``count`` operations (is a write, key index), key ranks drawn with weights 1/r^s."""
    cum = list(itertools.accumulate(1 / (rank**ZIPF_S) for rank in range(1, KEYS + 1)))
    rng = random.Random(seed)
    indexes = rng.choices(range(KEYS), cum_weights=cum, k=count)
    return [(rng.random() < WRITES, index) for index in indexes]


async def run_operations(storage: Storage, operations: list[tuple[bool, int]]) -> float:
    """Run the operations one at a time; return the seconds taken."""
    started = time.perf_counter()
    for write, index in operations:
        if write:
            await storage.set_item(f"zipf:{index}", value(index))
        else:
            await storage.get_item(f"zipf:{index}")
    return time.perf_counter() - started


async def bench_zipf(url: str, operations: int, report: CacheReport, console: Console) -> Storage:
    """Redis alone vs the tiered driver on the Zipf workload; returns the warm tiered
    storage (for the hot-key run)."""
    base = uuid.uuid4().hex[:8]
    counter = ServerCommands(url)
    plain = create_storage(RedisDriver(url, base=base))
    for start in range(0, KEYS, 1000):
        await plain.set_items({f"zipf:{i}": value(i) for i in range(start, start + 1000)})
    measured = zipf_operations(operations, seed=1)
    warm_up = zipf_operations(operations, seed=2)

    def tiered(near: int) -> Storage:
        driver = TieredDriver(near=MemoryDriver(max_entries=near), far=RedisDriver(url, base=base))
        return create_storage(driver)

    async def whole_pass(storage: Storage) -> None:
        for start in range(0, KEYS, 1000):
            await storage.get_items([f"zipf:{i}" for i in range(start, start + 1000)])

    warm = tiered(KEYS)
    setups: list[tuple[str, Storage, Callable[[Storage], Awaitable[object]] | None]] = [
        ("redis alone", plain, None),
        ("tiered, warm (near = 10^5)", warm, whole_pass),
        ("tiered, cold start (near = 10^5)", tiered(KEYS), None),
        ("tiered, warm (near = 10^4)", tiered(10_000), lambda s: run_operations(s, warm_up)),
    ]
    baseline = None
    for name, storage, prepare in setups:
        console.print(f"cache: zipf, {name} ...")
        await storage.get_item("zipf:0")  # connect (and, tiered, start watching)
        if prepare is not None:
            await prepare(storage)
        before = await counter.count()
        seconds = await run_operations(storage, measured)
        commands = await counter.count() - before - 1  # less the second INFO
        baseline = baseline or commands
        report.zipf.append(
            {
                "target": name,
                "operations": operations,
                "ops": operations / seconds,
                "round_trips": commands,
                "fewer_round_trips": 1 - commands / baseline,
            }
        )
    for _, storage, _ in setups[2:]:
        await storage.dispose()
    await counter.close()
    return warm


async def bench_hot_key(warm: Storage, report: CacheReport, chunks: int) -> None:
    """The hottest key through the warm tiered driver vs the memory driver, paired."""
    memory = create_storage(MemoryDriver())
    await memory.set_item("zipf:0", value(0))
    targets = {"memory": memory, "tiered": warm}
    times: dict[str, list[float]] = {name: [] for name in targets}
    names = list(targets)
    shuffle = random.Random(0).shuffle
    gc.collect()
    gc.disable()
    try:
        for _ in range(chunks):
            shuffle(names)
            for name in names:
                storage = targets[name]
                started = time.perf_counter()
                for _ in range(1000):
                    await storage.get_item("zipf:0")
                times[name].append(time.perf_counter() - started)
    finally:
        gc.enable()
    ratio = statistics.median(m / t for t, m in zip(times["tiered"], times["memory"], strict=True))
    report.hot_key = {
        "memory_ops": 1000 / statistics.median(times["memory"]),
        "tiered_ops": 1000 / statistics.median(times["tiered"]),
        "ratio": ratio,
    }
    await memory.dispose()


#: ``python -c WRITER <redis url> <base>``: prints "ready", then for each line on stdin
#: writes that number at "k" and prints the monotonic times at which the write was sent
#: and returned.
WRITER = """
import asyncio, sys, time
from kvstorage import create_storage
from kvstorage.drivers import RedisDriver

async def main() -> None:
    storage = create_storage(RedisDriver(sys.argv[1], base=sys.argv[2]))
    await storage.has_item("k")
    print("ready", flush=True)
    for line in sys.stdin:
        sent = time.monotonic()
        await storage.set_item("k", int(line))
        print(repr(sent), repr(time.monotonic()), flush=True)
    await storage.dispose()

asyncio.run(main())
"""


async def bench_staleness(url: str, writes: int, report: CacheReport) -> None:
    """How long a write in another process stays invisible to this one's near cache."""
    base = uuid.uuid4().hex[:8]
    storage = create_storage(TieredDriver(far=RedisDriver(url, base=base)))
    dropped: list[float] = []
    signal = asyncio.Event()

    def changed(event: str, key: str) -> None:  # runs right after near dropped the key
        dropped.append(time.monotonic())
        signal.set()

    unwatch = await storage.watch(changed)
    await storage.set_item("k", -1)
    await asyncio.wait_for(signal.wait(), 5)  # our own write's event: gone by
    child = await spawn(WRITER, url, base)
    windows, since_sent = [], []
    try:
        assert await read_lines(child, 1) == ["ready"]
        assert child.stdin is not None
        for i in range(writes):
            assert await storage.get_item("k") == i - 1  # held in near
            signal.clear()
            await child.stdin.send(f"{i}\n".encode())
            sent, written = map(float, (await read_lines(child, 1))[0].split())
            await asyncio.wait_for(signal.wait(), 5)
            windows.append(max(0.0, dropped[-1] - written))
            since_sent.append(dropped[-1] - sent)
        await child.stdin.aclose()
        await child.wait()
    finally:
        if child.returncode is None:
            child.kill()
        await child.aclose()
        await unwatch()
        await storage.clear()
        await storage.dispose()
    report.staleness_ms = {
        "writes": writes,
        **percentiles("", windows),
        **percentiles("since_sent_", since_sent),
    }


def percentiles(prefix: str, seconds: list[float]) -> dict[str, float]:
    """p50, p99 and max of ``seconds``, in milliseconds."""
    ordered = sorted(seconds)
    at = lambda q: 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * q))]  # noqa: E731
    return {f"{prefix}p50": at(0.5), f"{prefix}p99": at(0.99), f"{prefix}max": 1000 * ordered[-1]}


async def bench_decorator(url: str, n: int, report: CacheReport, console: Console) -> None:
    """cached over Redis (and over the tiered driver) vs aiocache on the same server."""
    from aiocache import Cache
    from aiocache import cached as aio_cached
    from aiocache import cached_stampede as aio_cached_stampede
    from aiocache.serializers import JsonSerializer

    parts = urlsplit(url)
    calls = {"count": 0}

    async def compute(i: int, pause: float = 0.0) -> dict[str, Any]:
        calls["count"] += 1
        if pause:
            await asyncio.sleep(pause)
        return value(i)

    closers: list[Callable[[], Awaitable[object]]] = []
    targets: dict[str, Callable[..., Awaitable[Any]]] = {}
    for name, driver in (
        ("kvstorage cached, redis", RedisDriver(url, base=uuid.uuid4().hex[:8])),
        ("kvstorage cached, tiered", TieredDriver(far=RedisDriver(url, base=uuid.uuid4().hex))),
    ):
        storage = create_storage(driver)
        targets[name] = cached(storage, ttl=600, key=lambda i, pause=0.0: f"c:{i}")(compute)
        closers.append(storage.dispose)
    for name, decorator in (
        ("aiocache cached", aio_cached),
        ("aiocache cached_stampede", aio_cached_stampede),
    ):
        made = decorator(
            ttl=600,
            cache=Cache.REDIS,
            endpoint=parts.hostname,
            port=parts.port,
            namespace=uuid.uuid4().hex[:8],
            serializer=JsonSerializer(),
            key_builder=lambda f, i, pause=0.0: f"c:{i}",
        )
        targets[name] = made(compute)
        closers.append(made.cache.close)

    for index, (name, call) in enumerate(targets.items()):
        console.print(f"cache: cached, {name} ...")
        first = 1_000_000 * (1 + index)
        started = time.perf_counter()
        for i in range(first, first + n):  # misses: the function runs every time
            await call(i)
        miss_seconds = time.perf_counter() - started
        started = time.perf_counter()
        for j in range(5 * n):  # hits on the keys just cached
            await call(first + j % n)
        hit_seconds = time.perf_counter() - started
        next_key = first + n
        per_stampede = []
        for round_ in range(10):
            before = calls["count"]
            await asyncio.gather(*(call(next_key + round_, 0.02) for _ in range(100)))
            per_stampede.append(calls["count"] - before)
        report.decorator.append(
            {
                "target": name,
                "hit_ops": 5 * n / hit_seconds,
                "miss_ops": n / miss_seconds,
                "calls_per_100_concurrent_misses": statistics.mean(per_stampede),
            }
        )
    for close in closers:
        await close()


async def run(url: str, *, quick: bool, console: Console) -> CacheReport:
    """Every part of the cache workload on the Redis server at ``url``."""
    report = CacheReport()
    warm = await bench_zipf(url, 20_000 if quick else 50_000, report, console)
    console.print("cache: hot key ...")
    await bench_hot_key(warm, report, 100 if quick else 300)
    await warm.dispose()
    console.print("cache: staleness across processes ...")
    await bench_staleness(url, 50 if quick else 200, report)
    await bench_decorator(url, 500 if quick else 2_000, report, console)
    return report


def render(report: CacheReport, console: Console) -> None:
    """The cache workload's tables."""
    console.print(
        _table(
            "Zipf reads (s = 1.1, 10^5 keys, 5% writes), one operation at a time",
            ("target", "ops/s", "Redis round trips", "fewer than Redis alone"),
            [
                (
                    row["target"],
                    f"{row['ops']:,.0f}",
                    f"{row['round_trips']:,} / {row['operations']:,} ops",
                    f"{row['fewer_round_trips']:.1%}",
                )
                for row in report.zipf
            ],
        )
    )
    hot = report.hot_key
    if hot:
        console.print(
            f"hot-key get_item: tiered {hot['tiered_ops']:,.0f} ops/s, memory driver "
            f"{hot['memory_ops']:,.0f} ops/s: {hot['ratio']:.2f}x (median of paired chunks)"
        )
    stale = report.staleness_ms
    if stale:
        console.print(
            f"a write in another process, invisible to near after it returned: p50 "
            f"{stale['p50']:.2f} ms, p99 {stale['p99']:.2f} ms, max {stale['max']:.2f} ms; "
            f"dropped from near after the write was sent: p50 {stale['since_sent_p50']:.2f} "
            f"ms, p99 {stale['since_sent_p99']:.2f} ms ({stale['writes']} writes)"
        )
    console.print(
        _table(
            "read-through decorators on one Redis server",
            ("decorator", "hits/s", "misses/s", "calls per 100 concurrent misses"),
            [
                (
                    row["target"],
                    f"{row['hit_ops']:,.0f}",
                    f"{row['miss_ops']:,.0f}",
                    f"{row['calls_per_100_concurrent_misses']:.1f}",
                )
                for row in report.decorator
            ],
        )
    )


def _table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> Table:
    """A table whose first column is left-aligned and the others right-aligned."""
    table = Table(title=title)
    for index, column in enumerate(columns):
        table.add_column(column, justify="right" if index else "left")
    for row in rows:
        table.add_row(*row)
    return table
