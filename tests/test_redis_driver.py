"""RedisDriver specifics, against redis-server processes the tests start themselves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from kvstorage import DriverError, DriverUnavailableError, Storage, create_storage
from kvstorage.drivers import RedisDriver, from_url
from kvstorage.drivers._redis_wire import (
    POLL_GIVE_UP,
    POLL_RETRY,
    glob_escape,
    pack_command,
    pack_get,
    pack_set,
)
from kvstorage.drivers.redis import _pxat

from .backends import UVLOOP
from .backends.redis import unique_base
from .backends.redis_cluster import RedisCluster as ClusterProcesses
from .support import reliability
from .support.faults.tcp_proxy import TcpFaultProxy
from .support.helpers import assert_redacted, eventually, loop_stalls
from .support.servers import RedisServer, free_port

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """Every test here runs on asyncio and on uvloop (the driver writes and reads its
    connections itself: see ``_redis_wire.Lane``); conftest checks the loop."""
    return UVLOOP if request.param == "uvloop" else request.param


@pytest.fixture
def base() -> str:
    return unique_base()


@pytest.fixture
async def store(redis_server: RedisServer, base: str) -> AsyncIterator[Storage]:
    """A storage on the session's redis-server under ``base``; cleared afterwards."""
    store = create_storage(RedisDriver(redis_server.url, base=base))
    yield store
    await store.clear()
    await store.dispose()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def _raw_keys(raw: Redis, pattern: str) -> set[bytes]:
    return {key async for key in raw.scan_iter(match=pattern, count=1000)}


async def test_base_isolation(redis_server: RedisServer, raw: Redis) -> None:
    base = unique_base()
    outside = {
        base: b"the key equal to the base",
        base + "x": b"shares the prefix string",
        base + "x:a": b"under a longer base",
        "other:" + base + ":a": b"base in the middle",
    }
    await raw.mset(outside)
    store = create_storage(RedisDriver(redis_server.url, base=base))
    try:
        await store.set_items({"a": 1, "b:c": 2})
        assert await raw.exists(base + ":a", base + ":b:c") == 2
        assert sorted(await store.get_keys()) == ["a", "b:c"]
        assert await store.get_item("x:a") is None
        await store.clear()
        assert await store.get_keys() == []
        assert await raw.mget(list(outside)) == list(outside.values())
    finally:
        await store.dispose()
        await raw.delete(*outside)


async def test_glob_characters_are_escaped(redis_server: RedisServer, raw: Redis) -> None:
    stem = unique_base()
    globby = RedisDriver(redis_server.url, base=stem + "?[ab]*")
    # Keys an unescaped pattern "<stem>?[ab]*:*" would match:
    lookalikes = [RedisDriver(redis_server.url, base=stem + name) for name in ("1a", "1azz")]
    store = create_storage(globby)
    try:
        for other in lookalikes:
            await create_storage(other).set_item("victim", 1)
        await store.set_items({"k*": 1, "k?": 2, "[k]:x": 3, "k:x": 4, "kk:x": 5})
        assert sorted(await store.get_keys()) == ["[k]:x", "k*", "k:x", "k?", "kk:x"]
        assert await store.get_keys("[k]") == ["[k]:x"]
        assert await store.get_keys("k") == ["k:x"]
        assert await store.get_keys("k*") == []
        await store.clear("[k]")
        assert sorted(await store.get_keys()) == ["k*", "k:x", "k?", "kk:x"]
        await store.clear()
        assert await store.get_keys() == []
        for other in lookalikes:
            assert await create_storage(other).get_item("victim") == 1
        # the keyspace-notification pattern is escaped too
        events: list[tuple[str, str]] = []
        unwatch = await store.watch(lambda event, key: events.append((event, key)))
        await create_storage(lookalikes[0]).set_item("victim", 2)
        await store.set_item("mine", 1)  # notifications arrive in order: this one comes last
        await eventually(lambda: _contains(events, ("update", "mine")))
        assert events == [("update", "mine")]
        await unwatch()
    finally:
        for other in lookalikes:
            await other.clear()
            await other.dispose()
        await store.dispose()


async def _contains(events: list[tuple[str, str]], event: tuple[str, str]) -> bool:
    return event in events


def test_glob_escape() -> None:
    assert glob_escape("a*b?c[d]e\\f") == "a\\*b\\?c\\[d\\]e\\\\f"
    assert glob_escape("plain:key") == "plain:key"


async def test_etag_survives_other_writers_and_if_match(redis_server: RedisServer) -> None:
    one = create_storage(RedisDriver(redis_server.url, base=(base := unique_base())))
    two = create_storage(RedisDriver(redis_server.url, base=base))
    try:
        await one.set_item("k", 1)
        entry = await two.get_entry("k")
        assert entry is not None
        await one.set_item("k", 1)  # same value, new etag: two's etag is stale
        with pytest.raises(Exception, match="etag"):
            await two.set_item("k", 2, if_match=entry.etag)
        with pytest.raises(Exception, match="etag"):
            await two.set_item("k", 2, if_match="not-an-etag")
        assert await one.get_item("k") == 1
    finally:
        await one.clear()
        await one.dispose()
        await two.dispose()


def _assert_pttl(pttl: int, ttl: float, since: float) -> None:
    """``pttl`` (Redis's PTTL, in ms) is what ``ttl`` seconds set at ``since`` (monotonic)
    leaves now: a bound that holds however long the machine stalled in between."""
    elapsed_ms = (time.monotonic() - since) * 1000
    assert ttl * 1000 - elapsed_ms - 2 <= pttl <= ttl * 1000, (pttl, elapsed_ms)


async def test_ttl_is_native_with_millisecond_precision(
    raw: Redis, base: str, store: Storage
) -> None:
    # Each TTL is a whole number of seconds plus a fraction, so a TTL rounded to seconds
    # falls outside the bound unless the test stalled for about that fraction.
    since = time.monotonic()
    await store.set_item("t", 1, ttl=0.75)
    _assert_pttl(await raw.pttl(base + ":t"), 0.75, since)
    meta = await store.get_meta("t")
    left = 0.75 - (time.monotonic() - since)
    if left > 0.01:  # otherwise the item may be gone already
        assert meta is not None and meta.ttl is not None and left - 0.01 <= meta.ttl <= 0.75
    since = time.monotonic()
    await store.set_items({"u": 1, "v": 2}, ttl=30.5)  # alive for the touches below
    _assert_pttl(await raw.pttl(base + ":u"), 30.5, since)
    since = time.monotonic()
    assert await store.touch("u", ttl=0.3)
    _assert_pttl(await raw.pttl(base + ":u"), 0.3, since)
    assert await store.touch("v", ttl=None)
    assert await raw.pttl(base + ":v") == -1  # persisted
    assert await store.get_item("v") == 2
    # Redis itself deletes the keys: nothing to sweep, nothing left behind.
    await eventually(lambda: _gone(raw, base + ":t", base + ":u"), within=3)
    assert await store.sweep() == 0


@given(st.floats(min_value=1e9, max_value=4e9))
def test_redis_drops_a_key_no_later_than_its_header_says(expires_at: float) -> None:
    # Redis keeps a key while its clock, in whole milliseconds, is not past PXAT; at the
    # instant the header calls the item expired, Redis must already have let it go.
    redis_clock_at_expiry = math.floor(expires_at * 1000)
    pxat = _pxat(expires_at)
    assert pxat is not None and redis_clock_at_expiry > pxat
    assert expires_at - pxat / 1000 < 0.0021


async def _gone(raw: Redis, *names: str) -> bool:
    return await raw.exists(*names) == 0


async def test_values_not_written_by_kvstorage_are_reported(
    raw: Redis, base: str, store: Storage
) -> None:
    await raw.set(base + ":foreign", b"plain")
    with pytest.raises(DriverError, match="not written by kvstorage"):
        await store.get_item("foreign")
    with pytest.raises(DriverError, match="not written by kvstorage"):
        await store.get_items(["missing", "foreign"])
    assert await raw.get(base + ":foreign") == b"plain"


@pytest.mark.parametrize(
    "value",
    [b"plain", b"x" * 100, b"KVS\x01" + b"y" * 10, b""],
    ids=["short", "header-sized", "magic-but-short", "empty"],
)
async def test_touch_treats_foreign_values_as_get_does(
    raw: Redis, base: str, store: Storage, value: bytes
) -> None:
    name = base + ":foreign"
    await raw.set(name, value)
    with pytest.raises(DriverError, match="not written by kvstorage") as read:
        await store.get_item("foreign")
    for ttl in (10, None):
        with pytest.raises(DriverError, match="not written by kvstorage") as touched:
            await store.touch("foreign", ttl=ttl)
        assert str(touched.value) == str(read.value)
        assert await raw.get(name) == value  # neither rewritten nor expiring
        assert await raw.pttl(name) == -1
    assert await store.touch("missing", ttl=10) is False


async def test_given_client_is_used_and_not_closed(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url)
    store = create_storage(RedisDriver(client=client, base=unique_base()))
    await store.set_item("k", 1)
    assert await store.get_item("k") == 1
    await store.clear()
    await store.dispose()
    assert await client.ping() is True
    await client.aclose()
    with pytest.raises(ValueError, match="url or client"):
        RedisDriver("redis://127.0.0.1:1/0", client=client)


async def test_decoding_client_is_rejected(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    with pytest.raises(ValueError, match="decode"):
        RedisDriver(client=client, base=unique_base())
    await client.aclose()


async def test_from_url(redis_server: RedisServer) -> None:
    base = unique_base()
    driver = from_url(f"{redis_server.url}?base={base}&socket_keepalive=true")
    assert isinstance(driver, RedisDriver)
    assert driver.base == base
    assert driver.capabilities.watch and driver.capabilities.ttl
    store = create_storage(driver)
    await store.set_item("k", 1)
    assert await RedisDriver(redis_server.url, base=base).get("k") is not None
    assert base in repr(driver)
    await store.clear()
    await store.dispose()
    with pytest.raises(ValueError, match="not a redis URL"):
        RedisDriver("http://127.0.0.1/")
    assert "secret" not in repr(RedisDriver("redis://user:secret@127.0.0.1:1/0"))


def test_url_forms_choose_the_client() -> None:
    from redis.asyncio.connection import SSLConnection

    tls = RedisDriver("rediss://127.0.0.1:1/0?base=x")._open()
    assert isinstance(tls, Redis) and tls.connection_pool.connection_class is SSLConnection
    cluster = RedisDriver("redis+cluster://u:p@127.0.0.1:1,127.0.0.1:2?base=x&socket_timeout=2")
    assert cluster.base == "x" and not cluster.capabilities.watch
    client = cluster._open()
    assert isinstance(client, RedisCluster)
    assert sorted(node.port for node in client.startup_nodes) == [1, 2]
    kwargs = client.startup_nodes[0].connection_kwargs
    assert kwargs["password"] == "p" and kwargs["socket_timeout"] == 2.0
    assert RedisDriver("redis://127.0.0.1:1/0", cluster=True)._open().__class__ is RedisCluster
    portless = RedisDriver("redis+cluster://127.0.0.1,127.0.0.2")._open()
    assert isinstance(portless, RedisCluster)
    assert sorted((n.host, n.port) for n in portless.startup_nodes) == [
        ("127.0.0.1", 6379),
        ("127.0.0.2", 6379),
    ]


async def test_cluster_batches_across_slots(redis_cluster: ClusterProcesses) -> None:
    base = unique_base()
    driver = RedisDriver(redis_cluster.url, base=base)
    assert not driver.capabilities.watch  # per-node notifications: the core reports events
    store = create_storage(driver)
    keys = [f"item:{i}" for i in range(600)]
    slots = {key_slot(f"{base}:{key}".encode()) for key in keys}
    assert len(slots) > 400  # spread over many slots, hence over all three nodes
    try:
        await store.set_items({key: i for i, key in enumerate(keys)})
        assert await store.get_items(keys) == {key: i for i, key in enumerate(keys)}
        await store.set_items({key: -i for i, key in enumerate(keys[:300])}, ttl=60)
        meta = await store.get_meta(keys[0])
        assert meta is not None and meta.ttl is not None and meta.ttl > 50
        assert (await store.get_items(keys[:300]))[keys[299]] == -299
        assert sorted(await store.get_keys("item")) == sorted(keys)
        assert await store.remove_items([*keys[:500], "item:nope"]) == 500
        assert sorted(await store.get_keys()) == sorted(keys[500:])
        await store.clear()
        assert await store.get_keys() == []
    finally:
        await store.clear()
        await store.dispose()


async def test_cluster_given_client_and_scan_every_node(redis_cluster: ClusterProcesses) -> None:
    nodes = [ClusterNode("127.0.0.1", node.port) for node in redis_cluster.nodes]
    client = RedisCluster(startup_nodes=nodes)
    base = unique_base()
    store = create_storage(RedisDriver(client=client, base=base))
    try:
        await store.set_items({f"n:{i}": i for i in range(200)})
        per_node = []
        for node in redis_cluster.nodes:
            direct = Redis(port=node.port)
            per_node.append(len(await _raw_keys(direct, f"{base}:*")))
            await direct.aclose()
        assert all(count > 0 for count in per_node) and sum(per_node) == 200
        assert len(await store.get_keys("n")) == 200
        await store.clear()
        await store.dispose()
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_outage_and_restart(tmp_path: Path) -> None:
    server = RedisServer(free_port(), tmp_path / "outage")
    server.start()
    store: Storage = create_storage(RedisDriver(server.url, base="app"))
    events: list[tuple[str, str]] = []
    await store.watch(lambda event, key: events.append((event, key)))
    try:
        await store.set_item("k", 1)
        server.stop()
        slowest = 0.0
        for call in (store.get_item("k"), store.set_item("k", 2), store.get_keys()):
            started = time.monotonic()
            with pytest.raises(DriverUnavailableError, match=f"127.0.0.1:{server.port}"):
                await call
            slowest = max(slowest, time.monotonic() - started)
            assert time.monotonic() - started < 5
        server.start()  # same port, empty database
        assert await store.get_item("k") is None
        await store.set_item("k", 3)
        assert await store.get_item("k") == 3
        assert await store.get_items(["k"]) == {"k": 3}

        async def watching_again() -> bool:  # the watcher reconnects and re-enables events
            await store.set_item("again", 1)
            return ("update", "again") in events

        await eventually(watching_again, within=5)
        reliability.record(
            "faults",
            "redis: server stopped and restarted under a running storage",
            calls_while_down=3,
            failed_cleanly=3,
            slowest_failure_s=round(slowest, 2),
            recovered_without_new_storage=True,
        )
    finally:
        await store.dispose()
        server.stop()


async def test_hung_server_fails_within_the_timeout() -> None:
    import socket

    with socket.socket() as listener:  # accepts connections (backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        store = create_storage(RedisDriver(f"redis://127.0.0.1:{port}/0", timeout=0.5))
        async with loop_stalls() as stalls:  # the time the machine stalled is not the driver's
            started = time.monotonic()
            with pytest.raises(DriverUnavailableError, match=f"127.0.0.1:{port}"):
                await store.get_item("k")
            elapsed = time.monotonic() - started
            assert elapsed - stalls.between(started, started + elapsed) < 2
        reliability.record(
            "faults", "redis: server accepts but never answers", failed_after_s=round(elapsed, 2)
        )
        await store.dispose()


async def test_unreachable_cluster_is_reported() -> None:
    port = free_port()
    driver = RedisDriver(f"redis+cluster://127.0.0.1:{port}?socket_connect_timeout=1")
    store = create_storage(driver)
    started = time.monotonic()
    with pytest.raises(DriverUnavailableError, match=f"127.0.0.1:{port}"):
        await store.get_item("k")
    assert time.monotonic() - started < 5
    await store.dispose()


async def test_watch_reports_other_writers_and_expiry(
    redis_server: RedisServer, raw: Redis
) -> None:
    base = unique_base()
    store = create_storage(RedisDriver(redis_server.url, base=base))
    events: list[tuple[str, str]] = []
    unwatch = await store.watch(lambda event, key: events.append((event, key)))

    async def seen(*expected: tuple[str, str]) -> bool:
        return all(e in events for e in expected)

    try:
        await raw.set(base + "x:a", b"outside the base")
        other = create_storage(RedisDriver(redis_server.url, base=base))
        await other.set_item("from:other", 1)  # another client: only Redis can tell us
        await store.set_item("short", 1, ttl=0.2)
        await eventually(lambda: seen(("update", "from:other"), ("update", "short")))
        # expiry is reported without anyone reading the key
        await eventually(lambda: seen(("remove", "short")), within=5)
        await other.remove_item("from:other")
        await eventually(lambda: seen(("remove", "from:other")))
        assert all(not key.startswith("x:") and base not in key for _, key in events)
        await other.dispose()
    finally:
        await unwatch()
        await raw.delete(base + "x:a")
        await store.clear()
        await store.dispose()


async def test_watch_needs_keyspace_events(redis_server: RedisServer, raw: Redis) -> None:
    store = create_storage(RedisDriver(redis_server.url, base=unique_base()))
    flags = (await raw.config_get("notify-keyspace-events"))["notify-keyspace-events"]
    await raw.config_set("notify-keyspace-events", "")
    await raw.acl_setuser(
        "noconfig",
        enabled=True,
        nopass=True,
        commands=["+@all", "-config|set"],
        keys=["*"],
        channels=["*"],
    )
    limited = create_storage(
        RedisDriver(f"redis://noconfig@127.0.0.1:{redis_server.port}/0", base=unique_base())
    )
    try:
        with pytest.raises(DriverError, match=r"notify-keyspace-events Kg\$xe"):
            await limited.watch(lambda event, key: None)
        events: list[tuple[str, str]] = []
        await store.watch(lambda event, key: events.append((event, key)))  # turns them on
        enabled = (await raw.config_get("notify-keyspace-events"))["notify-keyspace-events"]
        assert set("Kg$xe") <= set(enabled)
        await store.set_item("k", 1)
        await eventually(lambda: _contains(events, ("update", "k")))
    finally:
        await limited.dispose()
        await store.dispose()
        await raw.acl_deluser("noconfig")
        await raw.config_set("notify-keyspace-events", flags)


async def test_watch_with_config_disabled_trusts_the_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    args = ("--rename-command", "CONFIG", "", "--notify-keyspace-events", "KEA")
    # a user with a password: the warning about CONFIG must not show it
    args += ("--user", "alice", "on", ">s3cret", "~*", "&*", "+@all")
    server = RedisServer(free_port(), tmp_path / "noconfig", args)
    server.start()
    url = f"redis://alice:s3cret@127.0.0.1:{server.port}/0"
    store = create_storage(RedisDriver(url, base="app"))
    events: list[tuple[str, str]] = []
    try:
        with caplog.at_level(logging.WARNING, logger="kvstorage"):
            await store.watch(lambda event, key: events.append((event, key)))
        warnings = [r.getMessage() for r in caplog.records if "notify-keyspace" in r.message]
        assert len(warnings) == 1
        assert_redacted(warnings[0])
        await store.set_item("k", 1)
        await eventually(lambda: _contains(events, ("update", "k")))
    finally:
        await store.dispose()
        server.stop()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_is_refused_clearly(redis_server: RedisServer) -> None:
    store = create_storage(RedisDriver(redis_server.url, base=unique_base()))
    with pytest.raises(DriverError, match="only on asyncio"):
        await store.get_item("k")
    await store.dispose()


async def _calls(raw: Redis, command: str) -> int:
    stats = await raw.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_concurrent_reads_are_pipelined(raw: Redis, base: str, store: Storage) -> None:
    await store.set_items({f"c:{i}": i for i in range(200)})
    results: list[object] = [None] * 201
    gets, mgets = await _calls(raw, "get"), await _calls(raw, "mget")

    async def read(i: int) -> None:
        results[i] = await store.get_item(f"c:{i}")

    async with anyio.create_task_group() as group:
        for i in range(201):
            group.start_soon(read, i)
    assert results == [*range(200), None]
    # a few GETs went out alone; the rest shared MGETs
    assert await _calls(raw, "get") - gets < 20
    assert await _calls(raw, "mget") - mgets >= 1


async def test_a_cancelled_call_never_leaves_its_reply_to_the_next(
    raw: Redis, store: Storage
) -> None:
    # The driver sends GET/SET/MGET on pooled connections itself: a call cancelled after
    # its command went out must not return the connection to the pool with the reply
    # still to come, or the next call would read that reply as its own (redis-py had
    # this bug: CVE-2023-28858).
    await store.set_items({"a": "A", "b": "B"})
    calls = [
        lambda: store.get_item("a"),
        lambda: store.get_items(["a"]),
        lambda: store.set_item("a", "A"),
    ]
    for call in calls:
        before = time.monotonic()
        await raw.execute_command("CLIENT", "PAUSE", 200, "ALL")
        with anyio.move_on_after(0.05) as scope:
            await call()
        # cancelled while the server held the reply (unless a stall outlasted the pause)
        assert scope.cancelled_caught or time.monotonic() - before >= 0.2
        for _ in range(3):  # the first waits for the pause to end
            assert await store.get_item("b") == "B"
            assert await store.get_items(["b", "a"]) == {"b": "B", "a": "A"}


async def test_a_stalled_reply_times_out_on_the_lane(redis_server: RedisServer, raw: Redis) -> None:
    # Sequential calls go on the driver's lane, whose socket timeout is kept by one
    # watchdog timer (ticking every half timeout): a reply that does not come fails the
    # call after 1 to 1.5 times the timeout, and the next call works on a new connection.
    # (The time the machine stalled meanwhile is not the driver's.)
    store = create_storage(RedisDriver(redis_server.url, base=unique_base(), timeout=0.4))
    try:
        await store.set_item("k", "v")
        for call in (lambda: store.get_item("k"), lambda: store.set_item("k", "w")):
            before = time.monotonic()
            await raw.execute_command("CLIENT", "PAUSE", 2000, "ALL")
            async with loop_stalls() as stalls:
                started = time.monotonic()
                try:
                    await call()
                except DriverUnavailableError as exc:
                    assert "Timeout" in str(exc)
                    ended = time.monotonic()
                    assert ended - started > 0.35
                    assert ended - started - stalls.between(started, ended) < 1.2
                else:  # the reply came: only once a stall outlasted the pause
                    assert time.monotonic() - before >= 2
            await raw.execute_command("CLIENT", "UNPAUSE")
            assert await store.get_item("k") in {"v", "w"}
    finally:
        await raw.execute_command("CLIENT", "UNPAUSE")
        await store.clear()
        await store.dispose()


async def test_values_around_the_inline_argument_size(store: Storage) -> None:
    # Command arguments up to 4,096 bytes are copied into one buffer, larger ones sent as
    # they are: both must arrive intact (the stored form adds a 32-byte header).
    values = {f"v{size}": bytes([size % 251]) * size for size in range(4056, 4072)}
    for key, value in values.items():
        await store.set_item_raw(key, value)
        assert await store.get_item_raw(key) == value


@given(
    st.lists(
        st.one_of(st.text(), st.binary(max_size=5000), st.integers()),
        max_size=8,
    )
)
@settings(max_examples=200, deadline=None)
def test_commands_are_packed_as_redis_py_packs_them(args: list[str | bytes | int]) -> None:
    from redis.asyncio.connection import Connection

    command = ["MGET", *args]
    try:
        expected = b"".join(Connection().pack_command(*command))
    except UnicodeEncodeError:  # lone surrogates: keys never hold them (InvalidKeyError)
        return
    assert b"".join(pack_command(command)) == expected


@given(
    st.text(min_size=1),
    st.binary(max_size=5000),
    st.one_of(st.none(), st.integers(min_value=0, max_value=2**53)),
)
@settings(max_examples=200, deadline=None)
def test_get_and_set_are_packed_as_redis_py_packs_them(
    name: str, value: bytes, pxat: int | None
) -> None:
    from redis.asyncio.connection import Connection

    try:
        name.encode()
    except UnicodeEncodeError:  # lone surrogates: keys never hold them (InvalidKeyError)
        return
    pack = Connection().pack_command
    assert b"".join(pack_get(name)) == b"".join(pack("GET", name))
    expiry = () if pxat is None else ("PXAT", pxat)
    assert b"".join(pack_set(name, value, pxat)) == b"".join(pack("SET", name, value, *expiry))


# -- secrets in URLs ----------------------------------------------------------------------

_SECRET_URLS = [
    "redis://:s3cret@127.0.0.1:{port}/0",
    "redis://user:s3cret@127.0.0.1:{port}/0",
    "redis://127.0.0.1:{port}/0?password=s3cret",
    "redis+cluster://:s3cret@127.0.0.1:{port},127.0.0.1:{port}",
]


@pytest.mark.parametrize("url", _SECRET_URLS)
def test_repr_hides_the_password(url: str) -> None:
    port = free_port()
    text = repr(RedisDriver(url.format(port=port)))
    assert_redacted(text)
    assert f"127.0.0.1:{port}" in text


@pytest.mark.parametrize("url", _SECRET_URLS)
async def test_unreachable_error_hides_the_password(url: str) -> None:
    port = free_port()  # closed: nothing listens there
    store = create_storage(RedisDriver(url.format(port=port), timeout=1))
    try:
        with pytest.raises(DriverUnavailableError, match=f"127.0.0.1:{port}") as caught:
            await store.get_item("k")
        assert_redacted(str(caught.value))
    finally:
        await store.dispose()


@pytest.mark.parametrize(
    "url",
    [
        "http://:s3cret@127.0.0.1:6379/0",  # not a redis scheme
        "redis://user:s3cret@127.0.0.1:6379/zero",  # database not a number
        "rediss://:s3cret@127.0.0.1:port/0",  # port not a number
        "redis+cluster://:s3cret@127.0.0.1:6379,127.0.0.1:two",  # cluster port
    ],
)
def test_bad_url_errors_hide_the_password(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        RedisDriver(url)
    assert_redacted(str(caught.value))


@pytest.fixture
async def own_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server of this test alone (it kills clients and changes settings)."""
    server = RedisServer(free_port(), tmp_path / "own")
    server.start()
    yield server
    server.stop()


async def _kill_clients(admin: Redis) -> None:
    await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")


async def test_a_connection_closed_while_idle_is_replaced_before_a_write(
    own_server: RedisServer,
) -> None:
    # The server drops idle connections (CLIENT KILL, its `timeout`, a restart): the next
    # call must reconnect before writing -- a conditional write cannot be retried after.
    admin = Redis.from_url(own_server.url)
    driver = RedisDriver(own_server.url, base="t")
    given = RedisDriver(client=Redis.from_url(own_server.url), base="t")  # no retries
    try:
        await driver.set("a", b"1")
        assert await given.get("a") is not None
        await _kill_clients(admin)
        assert await driver.set("nx", b"x", if_absent=True)
        assert (record := await given.get("a")) is not None and record.value == b"1"
        etag = await driver.set("b", b"1")
        await _kill_clients(admin)
        assert await driver.set("b", b"2", if_match=etag)
        assert (record := await driver.get("b")) is not None and record.value == b"2"
    finally:
        await driver.dispose()
        await given.dispose()
        await admin.aclose()


async def test_a_cancelled_large_write_never_lands_after_a_newer_one(
    own_server: RedisServer,
) -> None:
    # Closing a connection gracefully would still flush the rest of a cancelled SET, and
    # the server would apply it after the newer write made on another connection.
    admin = Redis.from_url(own_server.url)
    driver = RedisDriver(own_server.url, base="t")
    big = os.urandom(32 << 20)
    cancelled = 0
    try:
        await driver.get("warm-up")
        for attempt in range(12):
            with anyio.move_on_after(0.002 * (attempt % 4)) as scope:
                await driver.set("k", big)
            if not scope.cancelled_caught:
                continue
            cancelled += 1
            await driver.set("k", b"newer")

            async def only_live_connections_left() -> bool:
                # Once the cancelled call's connection is gone from the server, all it
                # had sent has been applied.
                listed = await admin.execute_command("CLIENT", "LIST")
                text = listed.decode() if isinstance(listed, bytes) else str(listed)
                return text.count("\n") <= 3  # admin, the driver's lane and its pool

            await eventually(only_live_connections_left, within=10)
            record = await driver.get("k")
            assert record is not None and record.value == b"newer", f"attempt {attempt}"
        assert cancelled > 0
    finally:
        await driver.dispose()
        await admin.aclose()


async def test_a_reply_that_beats_the_watchdog_leaves_no_timeout_for_the_next_call(
    own_server: RedisServer,
) -> None:
    # The reply arrives in the loop iteration where the watchdog strikes: the call gets
    # its value, and the timeout the watchdog left on the stream must not fail the next.
    timeout = 0.5
    admin = Redis.from_url(own_server.url)
    driver = RedisDriver(own_server.url, base="t", timeout=timeout)
    try:
        await driver.set("k", b"v")
        await anyio.sleep(timeout)  # the watchdog goes idle
        await admin.execute_command("CLIENT", "PAUSE", str(int(timeout * 900)), "ALL")

        async def hold_the_loop() -> None:  # busy from 0.8 to 1.3 timeouts: CPU work
            await anyio.sleep(0.8 * timeout)
            until = time.monotonic() + 0.5 * timeout
            while time.monotonic() < until:
                pass

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(hold_the_loop)
            # On a loaded machine the watchdog may win outright: a clean timeout is fine
            # here; what must never happen is a failure of the calls after it.
            with contextlib.suppress(DriverUnavailableError):
                first = await driver.get("k")
                assert first is not None and first.value == b"v"
        for _ in range(3):
            record = await driver.get("k")
            assert record is not None and record.value == b"v"
    finally:
        await driver.dispose()
        await admin.aclose()


async def test_a_lane_stops_polling_for_the_replies_of_a_distant_server(
    own_server: RedisServer,
) -> None:
    # Polling for a reply only pays when it comes within POLL_SECONDS; a server 2 ms away
    # must not cost a spinning loop on every call, only on the periodic retries.
    proxy = TcpFaultProxy(own_server.port)
    proxy.delay = 0.002
    driver = RedisDriver(proxy.url, base="t")
    try:
        await driver.set("k", b"1")
        lane = driver._lane
        assert lane is not None
        for _ in range(POLL_GIVE_UP + 3):
            assert (record := await driver.get("k")) is not None and record.value == b"1"
        assert lane._late == POLL_GIVE_UP  # gave up: the calls after it were not polled
        while lane._calls % POLL_RETRY:
            assert await driver.get("k") is not None
        assert lane._late == POLL_GIVE_UP + 1  # the retry polled, and the reply was late
    finally:
        await driver.dispose()
        proxy.close()


@pytest.mark.parametrize("cluster", [False, True], ids=["server", "cluster"])
@pytest.mark.parametrize("given", [False, True], ids=["url", "given-client"])
def test_a_driver_works_on_the_next_event_loop_from_its_first_call(
    request: pytest.FixtureRequest, base: str, given: bool, cluster: bool
) -> None:
    # One asyncio.run after another (scripts, tests with a loop each): the connections of
    # the first loop cannot serve the second, and its first call must not fail for it.
    client: Redis | RedisCluster | None = None
    if cluster:
        url = request.getfixturevalue("redis_cluster").url
        if given:
            ports = [node.port for node in request.getfixturevalue("redis_cluster").nodes]
            client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in ports])
    else:
        url = request.getfixturevalue("redis_server").url
        client = Redis.from_url(url) if given else None
    driver = RedisDriver(url if client is None else None, client=client, base=base)
    storage = create_storage(driver)

    async def first() -> str:
        await storage.set_item("a", 1)
        await storage.set_items({"b": 2, "c": 3})
        entry = await storage.get_entry("a")
        assert entry is not None
        return entry.etag

    async def second(etag: str, value: int) -> str:
        assert await storage.get_item("a") == value  # the lane
        await storage.set_item("a", value + 1, if_match=etag)  # a script, on the lane
        assert await storage.get_items(["a", "b", "c"]) == {"a": value + 1, "b": 2, "c": 3}
        reads = [storage.get_item(key) for key in ("a", "b", "c", "missing")]
        assert await asyncio.gather(*reads) == [value + 1, 2, 3, None]  # batcher and pool
        assert sorted(await storage.get_keys()) == ["a", "b", "c"]
        entry = await storage.get_entry("a")
        assert entry is not None
        return entry.etag

    etag = asyncio.run(first())
    etag = asyncio.run(second(etag, 1))
    asyncio.run(second(etag, 2))

    async def last() -> None:
        await storage.clear()
        await storage.dispose()
        if client is not None:
            await client.aclose()

    asyncio.run(last())


def test_a_watch_keeps_reporting_on_the_next_event_loop(
    redis_server: RedisServer, base: str
) -> None:
    # The listener of a watch started under one asyncio.run dies with that loop; the
    # watch must not go quiet under the next one.
    storage = create_storage(RedisDriver(redis_server.url, base=base))
    events: list[tuple[str, str]] = []
    stops: list[Callable[[], Awaitable[None]]] = []

    async def reported(event: tuple[str, str]) -> None:
        await eventually(lambda: _contains(events, event))

    async def first() -> None:
        stops.append(await storage.watch(lambda event, key: events.append((event, key))))
        await storage.set_item("a", 1)
        await reported(("update", "a"))

    async def second() -> None:
        await storage.set_item("b", 2)  # reported: the watch resumes before the write
        await reported(("update", "b"))
        other = create_storage(RedisDriver(redis_server.url, base=base))
        await other.remove_item("a")  # another client: only Redis can tell us
        await reported(("remove", "a"))
        await other.dispose()
        raw = Redis.from_url(redis_server.url)
        subscribed = await raw.pubsub_numpat()
        await stops[0]()  # the handle of the first loop stops the watch of this one
        assert await raw.pubsub_numpat() == subscribed - 1
        await raw.aclose()
        stops[0] = await storage.watch(lambda event, key: events.append((event, key)))

    async def last() -> None:
        await stops[0]()  # before any call on this loop: nothing of the last one to close
        await storage.clear()
        await storage.dispose()

    asyncio.run(first())
    asyncio.run(second())
    asyncio.run(last())


def test_a_watch_that_cannot_resume_on_the_next_loop_fails_the_call_until_it_can(
    tmp_path: Path,
) -> None:
    # Not a silent watch: the first call on the new loop raises while the subscription
    # cannot be made again, and a later call makes it.
    server = RedisServer(free_port(), tmp_path / "resume")
    server.start()
    storage = create_storage(RedisDriver(server.url, base="app", timeout=1))
    events: list[tuple[str, str]] = []

    async def first() -> None:
        await storage.watch(lambda event, key: events.append((event, key)))

    async def second() -> None:
        with pytest.raises(DriverUnavailableError):
            await storage.get_item("k")
        server.start()  # same port, empty database, no notification flags
        await storage.set_item("k", 1)
        await eventually(lambda: _contains(events, ("update", "k")))
        await storage.dispose()

    try:
        asyncio.run(first())
        server.stop()
        asyncio.run(second())
    finally:
        server.stop()
