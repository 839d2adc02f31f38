"""Driver wrapper overhead: the standard workload on a bare driver and on each wrapper
around the same kind of driver, on memory and on Redis, in one run.

A difference of a few percent is below the noise of one run after another on a shared
machine, so the targets are measured *paired*: each operation runs in chunks of 100 keys,
every target doing the same chunk in turn (in a shuffled order, garbage collection paused).
Overhead is the extra time per operation against the bare driver: the median, over the
chunks, of the wrapper's time for a chunk divided by the bare driver's for the same chunk,
minus 1 (a wrapper's ops/s is the bare driver's median divided by that ratio).

Values are the workload's small JSON objects, below ``CompressedDriver``'s ``min_size``:
what is measured is the cost of a wrapper on every call, not of compressing.
``instrumented`` runs without an OpenTelemetry SDK set up (the free case);
``instrumented+SDK`` reports to an SDK that exports nowhere.
"""

from __future__ import annotations

import asyncio
import gc
import random
import statistics
import time
from collections.abc import Awaitable, Callable

from rich.console import Console
from rich.table import Table

from kvstorage import Driver, Storage, create_storage
from kvstorage.wrappers import CompressedDriver, EncryptedDriver, InstrumentedDriver

from .workload import OPERATIONS, Row, value

BARE = "bare driver"
CHUNK = 100
LISTINGS = 25  # listing is one call per target: it is repeated instead
KEY = EncryptedDriver.generate_key()


def _with_sdk(inner: Driver) -> Driver:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    return InstrumentedDriver(
        inner, name="bench", tracer_provider=TracerProvider(), meter_provider=MeterProvider()
    )


#: Name -> what wraps the bare driver.
WRAPPERS: dict[str, Callable[[Driver], Driver]] = {
    "instrumented": lambda inner: InstrumentedDriver(inner, name="bench"),
    "instrumented+SDK": _with_sdk,
    "compressed": CompressedDriver,
    "encrypted": lambda inner: EncryptedDriver(inner, keys=[KEY]),
    "compressed+encrypted": lambda inner: CompressedDriver(EncryptedDriver(inner, keys=[KEY])),
}

Chunk = Callable[[Storage, list[str], int], Awaitable[object]]


async def _set(storage: Storage, keys: list[str], first: int) -> None:
    for i, key in enumerate(keys, first):
        await storage.set_item(key, value(i))


async def _get(storage: Storage, keys: list[str], first: int) -> None:
    for key in keys:
        await storage.get_item(key)


async def _get_items(storage: Storage, keys: list[str], first: int) -> None:
    await storage.get_items(keys)


async def _concurrent(storage: Storage, keys: list[str], first: int) -> None:
    await asyncio.gather(*(storage.get_item(key) for key in keys))


async def _list(storage: Storage, keys: list[str], first: int) -> None:
    await storage.get_keys("bench")


async def _remove(storage: Storage, keys: list[str], first: int) -> None:
    for key in keys:
        await storage.remove_item(key)


#: The workload's operations, each as the work on one chunk of keys.
CHUNKS: dict[str, Chunk] = dict(
    zip(OPERATIONS, [_set, _get, _list, _get_items, _concurrent, _remove], strict=True)
)


async def run(drivers: dict[str, tuple[Callable[[], Driver], int]]) -> list[Row]:
    """Rows for every driver in ``drivers`` (name -> (factory of a new, empty driver, how
    many keys)), bare and wrapped."""
    rows: list[Row] = []
    for name, (make, n) in drivers.items():
        keys = [f"bench:item:{i}" for i in range(n)]
        storages = {BARE: create_storage(make())}
        storages |= {wrapper: create_storage(wrap(make())) for wrapper, wrap in WRAPPERS.items()}
        for storage in storages.values():  # connect, create, decide
            await storage.set_item("bench:warmup", 0)
            await storage.remove_item("bench:warmup")
        for operation, chunk in CHUNKS.items():
            starts = range(LISTINGS) if chunk is _list else range(0, n, CHUNK)
            times = await _paired(storages, chunk, keys, starts)
            bare = times[BARE]
            bare_ops = (n if chunk is _list else CHUNK) / statistics.median(bare)
            for target, seconds in times.items():
                ratio = statistics.median(t / b for t, b in zip(seconds, bare, strict=True))
                kind = "ours" if target == BARE else "wrapper"
                group = f"{name} + wrappers"
                rows.append(Row(group, operation, target, kind, bare_ops / ratio, sum(seconds), n))
        for storage in storages.values():
            await storage.dispose()
    return rows


async def _paired(
    storages: dict[str, Storage], chunk: Chunk, keys: list[str], starts: range
) -> dict[str, list[float]]:
    """Seconds of every chunk for every target, the targets taking turns on each chunk in
    a shuffled order (a fixed order would always time the same target right after a
    costly one, which leaves it cold caches), without garbage collection while timing (a
    collection would charge one target for the garbage of all)."""
    names = list(storages)
    times: dict[str, list[float]] = {name: [] for name in names}
    shuffle = random.Random(0).shuffle
    gc.collect()
    gc.disable()
    try:
        for start in starts:
            part = keys[start : start + CHUNK]
            shuffle(names)
            for name in names:
                started = time.perf_counter()
                await chunk(storages[name], part, start)
                times[name].append(time.perf_counter() - started)
    finally:
        gc.enable()
    return times


def overhead(bare: Row, wrapped: Row) -> float:
    """Extra time per operation of ``wrapped`` against ``bare``, as a fraction."""
    return bare.ops / wrapped.ops - 1


def render(rows: list[Row], console: Console) -> None:
    """One table per driver: the bare driver's ops/s, and each wrapper's overhead."""
    for group in dict.fromkeys(row.driver for row in rows):
        cells = {(row.operation, row.target): row for row in rows if row.driver == group}
        table = Table(title=f"{group}: extra time per operation against the bare driver")
        table.add_column("operation")
        table.add_column(f"{BARE} ops/s", justify="right")
        for wrapper in WRAPPERS:
            table.add_column(wrapper, justify="right")
        for operation in OPERATIONS:
            bare = cells[(operation, BARE)]
            line = [operation, f"{bare.ops:,.0f}"]
            line += [f"{overhead(bare, cells[(operation, w)]):+.1%}" for w in WRAPPERS]
            table.add_row(*line)
        seconds = {target: whole(rows, group, target) for target in (BARE, *WRAPPERS)}
        table.add_row(
            "whole workload",
            "",
            *[f"{seconds[w] / seconds[BARE] - 1:+.1%}" for w in WRAPPERS],
            end_section=True,
        )
        console.print(table)


def whole(rows: list[Row], group: str, target: str) -> float:
    """Seconds per key of the whole workload (every operation once per key) for ``target``."""
    return sum(1 / row.ops for row in rows if row.driver == group and row.target == target)
