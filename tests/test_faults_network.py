"""Network faults against the Redis, S3 and PostgreSQL drivers, through real proxies on
loopback.

* Redis behind a TCP proxy that stalls (a black hole) and then cuts (resets) connections,
  and a Redis server stopped and restarted, each under concurrent load: every call fails
  with ``DriverError`` within a bounded time, none hangs, the same ``Storage`` works again
  once the fault ends, and no acknowledged write is lost. Resetting connections while
  ``update_item`` runs must never apply an update twice, on a standalone server or on a
  3-node cluster with a proxy in front of each node.
* S3 (moto) behind an HTTP proxy answering 500/503 for a seeded fifth of the requests
  (before or after forwarding them) and delaying others: batches and listing succeed
  through botocore's retries, and listing returns every key exactly once.
* PostgreSQL stopped and restarted under the same load, and behind a TCP proxy resetting
  connections while ``update_item`` runs (never applied twice).

The figures go to RELIABILITY.md (section "faults").
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from kvstorage import DriverError, Storage, create_storage
from kvstorage.drivers import RedisDriver

from .backends.postgres import drop_tables, require_postgres, unique_table
from .backends.redis import unique_base
from .backends.redis_cluster import NODES, RedisCluster, require_redis_cluster, start_cluster
from .backends.s3 import REGION
from .support import reliability
from .support.faults.http_proxy import HttpFaultProxy
from .support.faults.tcp_proxy import Mode, TcpFaultProxy
from .support.helpers import Stalls, loop_stalls
from .support.servers import PostgresServer, RedisServer, free_port

pytestmark = pytest.mark.anyio

TIMEOUT = 1.0  # the drivers' timeout in these tests
BOUND = 3.0  # no call may take longer (3 x TIMEOUT)
HUNG = 10.0  # a call still running after this long counts as hung and is cancelled
WORKERS = 8
KEYS_PER_WORKER = 4


@dataclass
class Call:
    """One storage call made by the load."""

    op: str
    started: float
    ended: float
    error: BaseException | None
    stalled: float = 0.0  # of its seconds, those the machine stalled (see loop_stalls)

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    @property
    def own(self) -> float:
        """Its seconds less those the machine stalled: the driver's own time."""
        return self.seconds - self.stalled


@dataclass
class Write:
    """One ``set_item`` of ``value``; ``acked`` when it returned normally."""

    value: int
    started: float
    acked: bool


@dataclass
class Load:
    """Concurrent workers doing set/get/get_items on their own keys and update_item on a
    shared counter, recording every call and every write."""

    store: Storage
    calls: list[Call] = field(default_factory=list)
    writes: dict[str, list[Write]] = field(default_factory=lambda: defaultdict(list))
    increments: Counter[str] = field(default_factory=Counter)  # acked / failed
    stale_reads: list[tuple[str, Any]] = field(default_factory=list)
    since: float = 0.0  # reads and the final check only trust writes started after this
    stalls: Stalls = field(default_factory=Stalls)  # those of the last run()
    _stopping: anyio.Event = field(default_factory=anyio.Event)

    async def run(self, phases: list[tuple[float, Any]]) -> None:
        """Run the workers while calling each ``(seconds, action)`` phase in turn: the
        action (if any) runs first, then the load runs for ``seconds`` (not counting the
        time the machine stalled meanwhile)."""
        async with loop_stalls() as self.stalls, anyio.create_task_group() as group:
            for worker in range(WORKERS):
                group.start_soon(self._worker, worker)
            for seconds, action in phases:
                if action is not None:
                    await action()
                started = time.monotonic()
                while (left := seconds - self._own_time(started)) > 0:  # noqa: ASYNC110
                    # (a wait for the clock, less the stalls: no event to wait on)
                    await anyio.sleep(left)
            self._stopping.set()

    def _own_time(self, since: float) -> float:
        now = time.monotonic()
        return now - since - self.stalls.between(since, now)

    def allowed(self, key: str) -> set[Any] | None:
        """Values ``key`` may hold now: the last acknowledged write (started after
        ``since``) or any failed write after it; None when nothing is known."""
        allowed: set[Any] | None = None
        for write in self.writes[key]:
            if write.acked and write.started >= self.since:
                allowed = {write.value}
            elif not write.acked and allowed is not None:
                allowed.add(write.value)
        return allowed

    async def _call(self, op: str, call: Any) -> Any:
        started = time.monotonic()
        error: BaseException | None = None
        result = None
        try:
            with anyio.fail_after(HUNG):
                result = await call
        except Exception as exc:  # judged by the test: DriverError expected, never a hang
            error = exc
        ended = time.monotonic()
        self.calls.append(Call(op, started, ended, error, self.stalls.between(started, ended)))
        if error is not None:
            await anyio.sleep(0.02)  # like any client: no hot loop against a dead server
            raise error
        return result

    async def _worker(self, worker: int) -> None:
        rng = random.Random(worker)
        version = 0
        while not self._stopping.is_set():
            key = f"w{worker}:k{rng.randrange(KEYS_PER_WORKER)}"
            roll = rng.random()
            try:
                if roll < 0.4:
                    version += 1
                    write = Write(version, time.monotonic(), acked=False)
                    self.writes[key].append(write)
                    await self._call("set", self.store.set_item(key, version))
                    write.acked = True
                elif roll < 0.7:
                    started = time.monotonic()
                    value = await self._call("get", self.store.get_item(key))
                    self._check_read(key, value, started)
                elif roll < 0.85:
                    keys = [f"w{worker}:k{i}" for i in range(KEYS_PER_WORKER)]
                    started = time.monotonic()
                    values = await self._call("get_items", self.store.get_items(keys))
                    for name in keys:
                        self._check_read(name, values.get(name), started)
                else:
                    try:
                        await self._call(
                            "update_item", self.store.update_item("counter", _increment)
                        )
                    except Exception:
                        self.increments["failed"] += 1
                        raise
                    self.increments["acked"] += 1
            except Exception:
                continue

    def _check_read(self, key: str, value: Any, started: float) -> None:
        if started < self.since:
            return
        allowed = self.allowed(key)
        if allowed is not None and value not in allowed:
            self.stale_reads.append((key, value))

    async def lost_writes(self) -> list[tuple[str, Any, set[Any]]]:
        """Keys whose value is not what the acknowledged writes left (read with no fault)."""
        lost = []
        keys = list(self.writes)
        values = await self.store.get_items(keys)
        for key in keys:
            allowed = self.allowed(key)
            if allowed is not None and values.get(key) not in allowed:
                lost.append((key, values.get(key), allowed))
        return lost


def _increment(value: int | None) -> int:
    return (value or 0) + 1


def _window(load: Load, start: float, end: float) -> list[Call]:
    """Calls made entirely within a fault, once it has surely taken effect."""
    return [c for c in load.calls if c.started >= start + 0.1 and c.ended <= end]


def _check_calls(load: Load) -> None:
    unexpected = [c for c in load.calls if c.error and not isinstance(c.error, DriverError)]
    assert not unexpected, f"calls failed with something else than DriverError: {unexpected[:5]}"
    slowest = max(load.calls, key=lambda c: c.own)
    assert slowest.own < BOUND, f"a call took {slowest.own:.2f} s (stalls aside): {slowest}"
    assert not load.stale_reads, f"reads missed acknowledged writes: {load.stale_reads[:5]}"


def _fault_figures(load: Load, start: float, end: float, recovered_at: float) -> dict[str, Any]:
    """Assert the calls made during a fault all failed, the ones after it succeed, and
    return the figures to record."""
    during = _window(load, start, end)
    assert during, "no call was made during the fault"
    succeeded = [c for c in during if c.error is None]
    assert not succeeded, f"calls succeeded during the fault: {succeeded[:5]}"
    # The second after it, not counting stalls of the machine; a call a stall overlapped
    # may have timed out for it and tells nothing.
    until = recovered_at + 1 + load.stalls.between(recovered_at, math.inf)
    after = [
        c for c in load.calls if recovered_at <= c.started and c.ended <= until and not c.stalled
    ]
    assert after, "no call was made after the fault"
    failed = [c for c in after if c.error is not None]
    assert not failed, f"calls still failed after the fault: {failed[:5]}"
    return {
        "calls_during_fault": len(during),
        "failed_cleanly": len(during),
        "max_failure_s": round(max(c.seconds for c in during), 2),
        "calls_after_recovery": len(after),
        "recovered": True,
    }


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[TcpFaultProxy]:
    proxy = TcpFaultProxy(redis_server.port)
    yield proxy
    proxy.close()


@pytest.mark.slow
async def test_redis_through_a_proxy_that_stalls_then_cuts(proxy: TcpFaultProxy) -> None:
    store = create_storage(RedisDriver(proxy.url, base=unique_base(), timeout=TIMEOUT))
    load = Load(store)
    marks: dict[str, float] = {}

    def switch(mode: Mode, mark: str) -> Any:
        async def action() -> None:
            marks[mark + ":switch"] = time.monotonic()  # before: calls may still succeed
            await anyio.to_thread.run_sync(proxy.set_mode, mode)
            marks[mark] = time.monotonic()

        return action

    try:
        await load.run(
            [
                (0.5, None),
                (3.5, switch(Mode.STALL, "stall")),
                (1.5, switch(Mode.NORMAL, "unstall")),
                (1.5, switch(Mode.CUT, "cut")),
                (1.5, switch(Mode.NORMAL, "uncut")),
            ]
        )
        _check_calls(load)
        # A call waiting for a reply when the stall ends still times out: recovery is
        # judged on the calls started after the switch back.
        stall = _fault_figures(load, marks["stall"], marks["unstall:switch"], marks["unstall"])
        cut = _fault_figures(load, marks["cut"], marks["uncut:switch"], marks["uncut"])
        lost = await load.lost_writes()
        assert not lost, f"acknowledged writes lost: {lost[:5]}"
        counter = await store.get_item("counter")
        assert load.increments["acked"] <= counter <= sum(load.increments.values())
    finally:
        await store.clear()
        await store.dispose()
    acked = sum(w.acked for writes in load.writes.values() for w in writes)
    common = {"calls": len(load.calls), "acked_writes": acked, "lost_writes": 0, "hung": 0}
    reliability.record("faults", "redis: proxy stalls connections", **common, **stall)
    reliability.record("faults", "redis: proxy cuts connections", **common, **cut)


async def _restarted_under_load(
    store: Storage, stop: Any, start: Any, *, keeps_data: bool
) -> dict[str, Any]:
    """Run the load on ``store`` while its server is stopped (``stop``, blocking) and
    started again (``start``); assert that calls failed cleanly during the outage,
    succeeded after it, and that no acknowledged write was lost (only those made after
    the restart, unless the server ``keeps_data``). Return the figures to record."""
    load = Load(store)
    marks: dict[str, float] = {}

    async def down() -> None:
        marks["stop:switch"] = time.monotonic()
        await anyio.to_thread.run_sync(stop)
        marks["stop"] = time.monotonic()

    async def up() -> None:
        marks["restart:switch"] = time.monotonic()
        await anyio.to_thread.run_sync(start)
        marks["restart"] = time.monotonic()
        if not keeps_data:  # the new server starts empty: only writes from now on count
            load.since = marks["restart"]

    await load.run([(0.5, None), (1.5, down), (1.5, up)])
    _check_calls(load)
    figures = _fault_figures(load, marks["stop"], marks["restart:switch"], marks["restart"])
    lost = await load.lost_writes()
    assert not lost, f"acknowledged writes lost: {lost[:5]}"
    counter = await store.get_item("counter")
    counted = [c for c in load.calls if c.op == "update_item" and c.started >= load.since]
    assert sum(c.error is None for c in counted) <= counter <= sum(load.increments.values())
    acked = sum(w.acked and w.started >= load.since for ws in load.writes.values() for w in ws)
    return {
        "calls": len(load.calls),
        "acked_writes": acked,
        "lost_writes": 0,
        "hung": 0,
        **figures,
    }


@pytest.mark.slow
async def test_redis_killed_and_restarted_under_load(tmp_path: Path) -> None:
    server = RedisServer(free_port(), tmp_path / "restart")
    server.start()
    store = create_storage(RedisDriver(server.url, base=unique_base(), timeout=TIMEOUT))
    try:
        figures = await _restarted_under_load(store, server.stop, server.start, keeps_data=False)
    finally:
        await store.dispose()
        server.stop()
    reliability.record("faults", "redis: server killed and restarted under load", **figures)


# -- S3 -------------------------------------------------------------------------------------

BULK = 250  # in pages of 100 (the proxy asks for them; S3 may return short pages)
PAGE = 100
WRITES = 200  # single writes with the default retries
FAIL_BEFORE = 0.1  # answered 500/503 without reaching moto
FAIL_AFTER = 0.1  # reached moto (took effect), answered 500/503 all the same
DELAYED = 0.1  # held 200 ms first


@pytest.fixture
def s3_proxy(s3_endpoint: str) -> Iterator[HttpFaultProxy]:
    proxy = HttpFaultProxy(
        s3_endpoint,
        seed=7,
        fail_before=FAIL_BEFORE,
        fail_after=FAIL_AFTER,
        delay_rate=DELAYED,
        max_keys=PAGE,
    )
    yield proxy
    proxy.close()


def _s3_storage(bucket: str, endpoint: str, **options: Any) -> Storage:
    from kvstorage.drivers import S3Driver

    return create_storage(
        S3Driver(bucket, prefix=unique_base(), endpoint_url=endpoint, region=REGION, **options)
    )


@pytest.mark.slow
async def test_s3_batches_and_listing_survive_failing_and_slow_requests(
    s3_proxy: HttpFaultProxy, s3_bucket: str
) -> None:
    from aiobotocore.config import AioConfig

    # 10 attempts: with a fifth of the requests failing, 1 in 10^7 requests exhausts them
    # (1 in 125 with the default 3, see the next test).
    retries = AioConfig(retries={"mode": "standard", "max_attempts": 10})
    store = _s3_storage(
        s3_bucket, s3_proxy.url, max_concurrency=32, client_options={"config": retries}
    )
    keys = [f"bulk:{i:05d}" for i in range(BULK)]
    try:
        with anyio.fail_after(120):  # generous: moto is slow and retries back off
            await store.set_items([(key, i) for i, key in enumerate(keys)])
            listed = await store.get_keys("bulk")
            duplicates = sum(n - 1 for n in Counter(listed).values())
            assert duplicates == 0
            assert sorted(listed) == keys
            sample = keys[::5]
            assert await store.get_items(sample) == {key: keys.index(key) for key in sample}

            async def one(i: int) -> None:
                await store.set_item(f"single:{i}", {"n": i})
                assert await store.get_item(f"single:{i}") == {"n": i}

            async with anyio.create_task_group() as group:
                for i in range(20):
                    group.start_soon(one, i)
            removed = keys[:120]
            assert await store.remove_items(removed) == len(removed)
            relisted = await store.get_keys("bulk")
            assert sorted(relisted) == keys[120:]
            assert len(await store.get_keys("single")) == 20
    finally:
        s3_proxy.delay_rate = s3_proxy.fail_before = s3_proxy.fail_after = 0.0
        await store.clear()
        await store.dispose()
    counters = s3_proxy.counters
    assert counters.failed_before and counters.failed_after and counters.delayed
    reliability.record(
        "faults",
        "s3: proxy fails 20% of requests (500/503), delays 10% by 200 ms",
        requests=counters.requests,
        injected_failures=counters.failed,
        failed_after_forwarding=counters.failed_after,
        injected_delays=counters.delayed,
        keys_listed=len(listed) + len(relisted),
        pages_requested=counters.pages,
        duplicates=duplicates,
        failed_calls=0,
    )


@pytest.mark.slow
async def test_s3_default_retries_fail_cleanly_when_exhausted(
    s3_proxy: HttpFaultProxy, s3_bucket: str
) -> None:
    # The driver's default, botocore standard mode with 3 attempts (as in AWS's SDKs), is
    # meant for the rare 5xx of a healthy S3; at 20% failures some calls exhaust it: they
    # must raise DriverError and leave the key with its old or its new value.
    store = _s3_storage(s3_bucket, s3_proxy.url)
    outcomes: Counter[str] = Counter()
    failures: list[BaseException] = []

    async def write(i: int) -> None:
        try:
            await store.set_item(f"k{i}", i)
        except DriverError as exc:
            failures.append(exc)
            outcomes["failed"] += 1
            return
        outcomes["acked"] += 1

    try:
        with anyio.fail_after(120):  # generous: moto is slow and retries back off
            async with anyio.create_task_group() as group:
                for i in range(WRITES):
                    group.start_soon(write, i)
        s3_proxy.delay_rate = s3_proxy.fail_before = s3_proxy.fail_after = 0.0
        values = await store.get_items([f"k{i}" for i in range(WRITES)])
        assert all(values[f"k{i}"] in (None, i) for i in range(WRITES))
        acked = sum(value is not None for value in values.values())
        assert acked >= outcomes["acked"]
        assert all("S3 " in str(exc) for exc in failures)
    finally:
        await store.clear()
        await store.dispose()
    reliability.record(
        "faults",
        "s3: 20% failures with the default 3 attempts",
        calls=WRITES,
        failed_cleanly=outcomes["failed"],
        lost_writes=0,
    )


async def _update_item_under_resets(
    store: Storage, proxies: list[TcpFaultProxy], logs: list[str], *, every: float = 0.01
) -> dict[str, Any]:
    """WORKERS tasks append unique tokens to ``logs`` with ``update_item`` (worker ``i`` to
    ``logs[i % len(logs)]``) for about 3 s while every proxy resets its connections
    ``every`` seconds. Assert that no token was applied twice, every acknowledged one is
    there and the resets did hit writes in flight; return the figures to record."""
    acked: dict[str, list[int]] = defaultdict(list)
    failed = resets = 0
    tokens = iter(range(10**9))
    stopping = anyio.Event()

    async def append(key: str) -> None:
        nonlocal failed
        while not stopping.is_set():
            token = next(tokens)
            try:
                with anyio.fail_after(HUNG):
                    await store.update_item(key, lambda log, token=token: [*(log or []), token])
            except DriverError:
                failed += 1
            else:
                acked[key].append(token)

    def reset_all() -> int:
        return sum(proxy.reset_connections() for proxy in proxies)

    async with anyio.create_task_group() as group:
        for worker in range(WORKERS):
            group.start_soon(append, logs[worker % len(logs)])
        for _ in range(round(3 / every)):  # reset whatever is in flight
            await anyio.sleep(every)
            resets += await anyio.to_thread.run_sync(reset_all)
        stopping.set()
    for key in logs:
        log = await store.get_item(key) or []
        twice = [token for token, n in Counter(log).items() if n > 1]
        assert not twice, f"updates of {key!r} applied twice: {twice}"
        lost = set(acked[key]) - set(log)
        assert not lost, f"acknowledged updates of {key!r} lost: {sorted(lost)}"
    assert resets > 0 and failed > 0  # the fault did hit writes in flight
    return {
        "calls": sum(map(len, acked.values())) + failed,
        "connections_reset": resets,
        "failed_cleanly": failed,
        "applied_twice": 0,
        "lost_writes": 0,
    }


async def test_redis_conditional_writes_are_not_resent_after_a_reset(
    proxy: TcpFaultProxy,
) -> None:
    # Regression: redis-py's retry resent a conditional write whose connection broke after
    # Redis had applied it; the resent write failed its own condition, and update_item
    # applied its function a second time. Each update appends a unique token: none may
    # appear twice, and every acknowledged one must be there.
    store = create_storage(RedisDriver(proxy.url, base=unique_base(), timeout=TIMEOUT))
    try:
        figures = await _update_item_under_resets(store, [proxy], ["log"])
    finally:
        await store.clear()
        await store.dispose()
    reliability.record("faults", "redis: proxy resets connections during update_item", **figures)


@dataclass
class ProxiedCluster:
    """A Redis Cluster whose nodes announce, and are reached through, one proxy each."""

    cluster: RedisCluster
    proxies: list[TcpFaultProxy]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p.port}" for p in self.proxies)


@pytest.fixture
def proxied_cluster(tmp_path: Path) -> Iterator[ProxiedCluster]:
    """A 3-node cluster of its own, each node behind a :class:`TcpFaultProxy`: CLUSTER SLOTS
    and MOVED send clients to the proxies, the cluster bus stays direct."""
    require_redis_cluster()
    with contextlib.ExitStack() as stack:
        proxies = []
        for _ in range(NODES):  # first, for the nodes to announce their ports
            proxies.append(TcpFaultProxy())
            stack.callback(proxies[-1].close)
        cluster = start_cluster(tmp_path, [proxy.port for proxy in proxies])
        stack.callback(cluster.stop)
        for proxy, node in zip(proxies, cluster.nodes, strict=True):
            proxy.target_port = node.port
        yield ProxiedCluster(cluster, proxies)


async def test_redis_cluster_conditional_writes_are_not_resent_after_a_reset(
    proxied_cluster: ProxiedCluster,
) -> None:
    # As above for a cluster, whose client resends a command after a ConnectionError too:
    # RedisDriver._once sends conditional writes to the key's primary outside that retry.
    # Resets every 20 ms, not 10: redis-py's cluster pipeline (the batched GETs) answers a
    # ConnectionError by closing every connection of the client and sleeping 0.25 s, so at
    # 10 ms the load slows to ~100 updates in 3 s, too few for the resend to show every time
    # (1 run in 10 passed with it). At 20 ms: 400-1200 updates, ~50 failing cleanly; with
    # the resend, 10 runs in 10 failed, with several updates applied twice each.
    base = unique_base()
    store = create_storage(RedisDriver(proxied_cluster.url, base=base, timeout=TIMEOUT))
    logs = ["log{a}", "log{b}", "log{c}"]  # hash tags: slots 15495, 3300 and 7365
    try:
        figures = await _update_item_under_resets(store, proxied_cluster.proxies, logs, every=0.02)
        per_node = []  # read straight from the nodes, not through the proxies
        for node in proxied_cluster.cluster.nodes:
            async with Redis(host="127.0.0.1", port=node.port) as direct:
                per_node.append(len(await direct.keys(f"{base}:*")))
        assert per_node == [1, 1, 1], f"the logs are not one per primary: {per_node}"
    finally:
        await store.clear()
        await store.dispose()
    reliability.record(
        "faults", "redis cluster: proxies reset connections during update_item", **figures
    )


async def test_s3_conditional_writes_retried_after_a_lost_response(
    s3_endpoint: str, s3_bucket: str
) -> None:
    # Regression: a conditional PUT applied by the server whose response was lost (a 500
    # after the write) was retried by botocore, failed its own condition, and update_item
    # applied its function a second time. Each update appends a unique token.
    from aiobotocore.config import AioConfig

    proxy = HttpFaultProxy(s3_endpoint, seed=11, fail_after=0.2)
    retries = AioConfig(retries={"mode": "standard", "max_attempts": 10})
    store = _s3_storage(s3_bucket, proxy.url, client_options={"config": retries})
    acked: list[int] = []
    failed = 0
    tokens = iter(range(10**9))

    async def append() -> None:
        nonlocal failed
        for _ in range(12):
            token = next(tokens)
            try:
                await store.update_item("log", lambda log, token=token: [*(log or []), token])
            except DriverError:
                failed += 1
            else:
                acked.append(token)

    try:
        with anyio.fail_after(120):
            async with anyio.create_task_group() as group:
                for _ in range(4):
                    group.start_soon(append)
        proxy.fail_after = 0.0
        log = await store.get_item("log")
        twice = [token for token, n in Counter(log).items() if n > 1]
        assert not twice, f"updates applied twice: {twice}"
        assert set(acked) <= set(log)
    finally:
        proxy.fail_after = 0.0
        await store.clear()
        await store.dispose()
        proxy.close()
    assert proxy.counters.failed_after > 0
    reliability.record(
        "faults",
        "s3: 20% of responses lost after the write (500/503), update_item",
        calls=len(acked) + failed,
        responses_lost=proxy.counters.failed_after,
        failed_cleanly=failed,
        applied_twice=0,
        lost_writes=0,
    )


# -- PostgreSQL -----------------------------------------------------------------------------


def _postgres_url(server: PostgresServer, port: int) -> str:
    """The server's URL (with its password) through ``port``, a table of the test's own."""
    return (
        f"postgresql://{server.user}:{server.password}@127.0.0.1:{port}/postgres"
        f"?table={unique_table()}&timeout={TIMEOUT}"
    )


@pytest.mark.slow
async def test_postgres_conditional_writes_are_not_resent_after_a_reset(
    postgres_server: PostgresServer,
) -> None:
    # Connections cut while update_item runs: a write whose connection broke fails with
    # DriverUnavailableError and is never resent, so no update is applied twice.
    proxy = TcpFaultProxy(postgres_server.port)
    store = create_storage(_postgres_url(postgres_server, proxy.port))
    table = store.get_mount("").driver.table  # type: ignore[attr-defined]
    try:
        figures = await _update_item_under_resets(store, [proxy], ["log"])
    finally:
        await store.dispose()
        proxy.close()
        await drop_tables(postgres_server.url, [table])
    reliability.record("faults", "postgres: proxy resets connections during update_item", **figures)


@pytest.mark.slow
async def test_postgres_stopped_and_restarted_under_load() -> None:
    require_postgres()
    server = PostgresServer()
    server.start()
    store = create_storage(_postgres_url(server, server.port))
    try:
        figures = await _restarted_under_load(store, server.stop, server.start, keeps_data=True)
    finally:
        await store.dispose()
        server.destroy()
    reliability.record("faults", "postgres: server stopped and restarted under load", **figures)
