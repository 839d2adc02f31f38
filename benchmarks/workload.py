"""The standard workload (the same on every target) and the listing scaling run."""

from __future__ import annotations

import asyncio
import gc
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .targets import Target

OPERATIONS = [
    "set_item",
    "get_item",
    "get_keys",
    "get_items x100",
    "100 concurrent get_item",
    "remove_item",
]


@dataclass
class Row:
    """One measurement: ``ops`` operations per second (keys per second for batches and
    listing) of ``target`` doing ``operation`` on ``driver``; ``lag_ms``: the longest the
    event loop kept a callback waiting meanwhile (see :class:`LoopLag`; None for targets in
    another process)."""

    driver: str
    operation: str
    target: str
    kind: str
    ops: float
    seconds: float
    count: int
    peak_mb: float | None = None
    lag_ms: float | None = None
    lag_p99_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The row as plain JSON-able data."""
        return asdict(self)


class LoopLag:
    """Measures how long the event loop is blocked: the time from one poll of its selector
    to the next, i.e. one loop iteration with every callback it runs (and any wait for the
    GIL), less the garbage collector's pauses meanwhile (a full collection of this
    process's heap takes tens of ms, whoever allocates). File I/O done on the loop, or a
    thread hogging the GIL, shows up as a long iteration; an idle loop or one waiting for a
    thread does not. An iteration during which the system preempted the loop thread (its
    involuntary context switches grew: another process took the core) is left out on Linux:
    that wait says nothing about the code measured, and on a busy machine it reaches a few
    ms even for a loop running no threads at all. (Waiting for the GIL or for a blocking
    system call is a voluntary switch, so it still counts.) The iteration in which
    :meth:`take` is called is left out too: it holds the benchmark's own bookkeeping (sorting
    the figures of ten thousand iterations takes a millisecond), not the code measured."""

    def __init__(self) -> None:
        self._iterations: list[float] = []
        self._taken = False  # take() ran in the current iteration
        self._collecting = 0.0  # gc pauses so far, in seconds
        self._collection_started = 0.0

    def take(self) -> tuple[float | None, float | None]:
        """(longest, 99th percentile) of the iterations since the last call, in ms; Nones
        when the loop has no selector to measure (another event loop implementation)."""
        iterations = sorted(self._iterations)
        self._iterations.clear()
        self._taken = True
        if not iterations:
            return None, None
        return iterations[-1] * 1000, iterations[int(len(iterations) * 0.99)] * 1000

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._collection_started = time.perf_counter()
        else:
            self._collecting += time.perf_counter() - self._collection_started

    async def __aenter__(self) -> LoopLag:
        self._selector = getattr(asyncio.get_running_loop(), "_selector", None)
        if self._selector is None:
            return self
        select = self._selector.select
        clock = time.perf_counter
        returned, collected = clock(), 0.0
        preempted = _preemptions()

        def timed(timeout: float | None = None) -> Any:
            nonlocal returned, collected, preempted
            lag = clock() - returned - (self._collecting - collected)
            before, preempted = preempted, _preemptions()
            if preempted == before and not self._taken:
                self._iterations.append(lag)
            self._taken = False
            try:
                return select(timeout)
            finally:
                returned, collected = clock(), self._collecting

        self._selector.select = timed
        gc.callbacks.append(self._on_gc)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._selector is not None:
            gc.callbacks.remove(self._on_gc)
            del self._selector.select


def _preemptions() -> int:
    """How many times the system has preempted this thread (0 where it cannot tell)."""
    return resource.getrusage(_THREAD).ru_nivcsw if _THREAD is not None else 0


_THREAD: int | None = getattr(resource, "RUSAGE_THREAD", None)


def value(i: int) -> dict[str, Any]:
    """The value stored at ``bench:item:{i}``."""
    return {"n": i, "s": "x" * 100}


async def run_workload(
    driver: str, target: Target, n: int, advance: Callable[[], None]
) -> list[Row]:
    """Run the standard workload of ``n`` keys on ``target`` (measuring the event loop's
    lag meanwhile); ``advance`` is called after each operation (for the progress bar)."""
    async with LoopLag() as lag:
        return await _workload(driver, target, n, advance, lag)


async def _workload(
    driver: str, target: Target, n: int, advance: Callable[[], None], lag: LoopLag
) -> list[Row]:
    keys = [f"bench:item:{i}" for i in range(n)]
    rows: list[Row] = []

    def record(operation: str, started: float, count: int) -> None:
        seconds = time.perf_counter() - started
        row = Row(driver, operation, target.name, target.kind, count / seconds, seconds, n)
        row.lag_ms, row.lag_p99_ms = lag.take()
        rows.append(row)
        advance()

    await target.set("bench:warmup", value(-1))  # connect, create tables, warm caches
    await target.get("bench:warmup")
    if target.keys is not None:  # a first thread pool hop can take ms: not in a timing
        await target.keys("bench")
    await target.remove("bench:warmup")

    lag.take()
    started = time.perf_counter()
    for i, key in enumerate(keys):
        await target.set(key, value(i))
    record("set_item", started, n)

    started = time.perf_counter()
    for key in keys:
        got = await target.get(key)
    record("get_item", started, n)
    if got != value(n - 1):
        raise AssertionError(f"{target.name} returned {got!r} for {keys[-1]}")

    if target.keys is not None:
        started = time.perf_counter()
        listed = await target.keys("bench")
        record("get_keys", started, len(listed))
        if len(listed) != n:
            raise AssertionError(f"{target.name} listed {len(listed)} keys, expected {n}")
    else:
        advance()

    if target.get_many is not None:
        started = time.perf_counter()
        for start in range(0, n, 100):
            await target.get_many(keys[start : start + 100])
        record("get_items x100", started, n)
    else:
        advance()

    started = time.perf_counter()
    for start in range(0, n, 100):
        await asyncio.gather(*(target.get(key) for key in keys[start : start + 100]))
    record("100 concurrent get_item", started, n)

    started = time.perf_counter()
    for key in keys:
        await target.remove(key)
    record("remove_item", started, n)
    return rows


def best_rounds(rows: list[Row]) -> list[Row]:
    """One row per (driver, operation, target): the fastest of its rounds, with the
    worst loop lag of all its rounds."""
    best: dict[tuple[str, str, str], Row] = {}
    lags: dict[tuple[str, str, str], tuple[float, float]] = {}
    for row in rows:
        key = (row.driver, row.operation, row.target)
        if key not in best or row.ops > best[key].ops:
            best[key] = row
        if row.lag_ms is not None and row.lag_p99_ms is not None:
            worst = lags.get(key, (0.0, 0.0))
            lags[key] = (max(worst[0], row.lag_ms), max(worst[1], row.lag_p99_ms))
    for key, (longest, p99) in lags.items():
        best[key].lag_ms, best[key].lag_p99_ms = longest, p99
    return list(best.values())


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak_mb`` is the growth
    over the value at entry (so C allocations count too, and tracing costs nothing)."""

    def __init__(self, interval: float = 0.005) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self._base = self._peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._peak = max(self._peak, self._rss())

    def __enter__(self) -> PeakRSS:
        self._base = self._peak = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss())

    @property
    def peak_mb(self) -> float:
        """Peak growth in MiB."""
        return (self._peak - self._base) / 2**20


async def run_scaling(
    driver: str, targets: list[Target], size: int, advance: Callable[[], None]
) -> list[Row]:
    """On each target that can (``fill``, ``iter_keys``, ``clear``): fill ``size`` keys,
    then time ``iter_keys`` (counting, never materializing) and ``clear`` with their peak
    memory growth. ``advance`` is called twice per target."""
    batch = 1000
    payload = {"n": 0}
    rows = []
    for target in targets:
        if target.fill is None or target.iter_keys is None or target.clear is None:
            continue
        for start in range(0, size, batch):
            await target.fill([(f"scale:{i}", payload) for i in range(start, start + batch)])
        with PeakRSS() as memory:
            started = time.perf_counter()
            count = 0
            async for _ in target.iter_keys("scale"):
                count += 1
            seconds = time.perf_counter() - started
        if count != size:
            raise AssertionError(f"{driver}: {target.name} saw {count} keys, expected {size}")
        row = Row(
            driver, f"iter_keys {size:,}", target.name, target.kind, count / seconds, seconds, size
        )
        row.peak_mb = memory.peak_mb if target.kind == "ours" else None
        rows.append(row)
        advance()
        with PeakRSS() as memory:
            started = time.perf_counter()
            await target.clear("scale")
            seconds = time.perf_counter() - started
        row = Row(
            driver, f"clear {size:,}", target.name, target.kind, size / seconds, seconds, size
        )
        row.peak_mb = memory.peak_mb if target.kind == "ours" else None
        rows.append(row)
        advance()
        if target.keys is not None and await target.keys("scale"):
            raise AssertionError(f"{driver}: {target.name}'s clear left keys behind")
    return rows
