"""``kvstorage.cache.cached``: one call per missing value in a process and across
processes, stale-while-revalidate, invalidation, exceptions, and keys that never collide.
The in-process tests run on asyncio and trio."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstorage import Storage, create_storage, normalize_key
from kvstorage.cache import MAX_ARGUMENTS, Cached, TieredDriver, cached
from kvstorage.drivers import RedisDriver

from .backends.redis import unique_base
from .support.children import run_at_once
from .support.servers import RedisServer

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@pytest.fixture
async def storage() -> AsyncIterator[Storage]:
    store = create_storage()
    yield store
    await store.dispose()


class Calls:
    """The function under test: counts its calls and, while ``gate`` is set, waits for
    it to open."""

    def __init__(self) -> None:
        self.count = 0
        self.gate: anyio.Event | None = None
        self.fail_next = False

    async def __call__(self, n: int) -> dict[str, int]:
        self.count += 1
        call = self.count
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError(f"call {call} failed")
        return {"n": n, "call": call}


async def stored_envelope(storage: Storage, key: str) -> list[Any]:
    envelope: list[Any] = await storage.get_item(key)
    return envelope


async def called_once_then_due(storage: Storage, load: Cached[[int], Any], key: str) -> None:
    """Call ``load(1)`` (the function's first call), then wait until the stored value is
    past its ttl (a wait for the clock: there is no event for it)."""
    assert await load(1) == {"n": 1, "call": 1}
    fresh_until = (await stored_envelope(storage, key))[0]
    await anyio.sleep(max(fresh_until - time.time(), 0) + 0.01)


async def held_calls(
    calls: Calls,
    count: int,
    call: Callable[[], Awaitable[Any]],
    meanwhile: Callable[[], Awaitable[None]] | None = None,
) -> list[Any]:
    """Start ``count`` concurrent ``call()``s while the function is held; once every
    task waits, run ``meanwhile``, then let the function go on. Returns what each call
    returned or raised."""
    calls.gate = anyio.Event()
    outcomes: list[Any] = []

    async def one() -> None:
        try:
            outcomes.append(await call())
        except Exception as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as group:
        for _ in range(count):
            group.start_soon(one)
        await wait_all_tasks_blocked()
        if meanwhile is not None:
            await meanwhile()
        calls.gate.set()
    calls.gate = None
    return outcomes


# -- one call per missing value ------------------------------------------------------------


async def test_concurrent_misses_call_the_function_once(storage: Storage) -> None:
    calls = Calls()
    load = cached(storage, ttl=60)(calls)

    async def one_call_so_far() -> None:
        assert calls.count == 1

    results = await held_calls(calls, 100, lambda: load(7), one_call_so_far)
    assert calls.count == 1
    assert results == [{"n": 7, "call": 1}] * 100
    assert len({id(result) for result in results}) == 100  # each caller its own copy
    assert await load(7) == {"n": 7, "call": 1}
    assert await load(8) == {"n": 8, "call": 2}


async def test_a_value_is_computed_again_after_ttl(storage: Storage) -> None:
    calls = Calls()
    load = cached(storage, ttl=0.05)(calls)
    await called_once_then_due(storage, load, load.cache_key(1))
    assert await load(1) == {"n": 1, "call": 2}


async def test_without_ttl_a_value_stays_until_invalidated(storage: Storage) -> None:
    calls = Calls()
    load = cached(storage, ttl=None)(calls)
    assert await load(1) == await load(1) == {"n": 1, "call": 1}
    assert await storage.get_meta(load.cache_key(1)) is not None
    assert (await storage.get_meta(load.cache_key(1))).ttl is None  # type: ignore[union-attr]


# -- stale while revalidate --------------------------------------------------------------


async def test_stale_value_is_served_at_once_while_one_refresh_runs(storage: Storage) -> None:
    calls = Calls()
    load = cached(storage, ttl=0.05, stale_ttl=60)(calls)
    key = load.cache_key(1)
    await called_once_then_due(storage, load, key)  # now stale
    meta = await storage.get_meta(key)
    assert meta is not None and meta.ttl is not None and meta.ttl > 50  # kept for stale_ttl
    calls.gate = anyio.Event()
    results = []
    with anyio.fail_after(5):  # served at once: nobody waits for the refresh
        for _ in range(20):
            results.append(await load(1))
    assert results == [{"n": 1, "call": 1}] * 20
    await wait_all_tasks_blocked()
    assert calls.count == 2  # exactly one refresh, still running
    calls.gate.set()
    with anyio.fail_after(5):
        while (await stored_envelope(storage, key))[1]["call"] != 2:
            await wait_all_tasks_blocked()
    assert await load(1) == {"n": 1, "call": 2}
    assert calls.count == 2


async def test_a_failed_refresh_keeps_the_stale_value(storage: Storage) -> None:
    calls = Calls()
    load = cached(storage, ttl=0.05, stale_ttl=60)(calls)
    key = load.cache_key(1)
    await called_once_then_due(storage, load, key)
    calls.fail_next = True
    assert await load(1) == {"n": 1, "call": 1}
    await wait_all_tasks_blocked()  # the refresh ran (memory: nothing to wait for)
    assert calls.count == 2
    assert (await stored_envelope(storage, key))[1] == {"n": 1, "call": 1}
    assert await load(1) == {"n": 1, "call": 1}  # still served; another refresh starts
    await wait_all_tasks_blocked()
    assert (await stored_envelope(storage, key))[1] == {"n": 1, "call": 3}


# -- invalidation and exceptions ----------------------------------------------------------


async def test_invalidate(storage: Storage) -> None:
    calls = Calls()
    load = cached(storage, ttl=60, key=lambda n: f"profile:{n}")(calls)
    assert load.cache_key(3) == "profile:3"
    assert await load(3) == {"n": 3, "call": 1}
    assert await load.invalidate(3) is True
    assert await load.invalidate(3) is False
    assert await load(3) == {"n": 3, "call": 2}
    assert await load(3) == {"n": 3, "call": 2}


async def test_invalidate_during_a_call_keeps_its_result_out(storage: Storage) -> None:
    calls = Calls()
    load = cached(storage, ttl=60)(calls)

    async def invalidate() -> None:
        assert await load.invalidate(1) is False

    results = await held_calls(calls, 1, lambda: load(1), invalidate)
    assert results == [{"n": 1, "call": 1}]  # its caller gets it, the storage does not
    assert not await storage.has_item(load.cache_key(1))
    assert await load(1) == {"n": 1, "call": 2}


async def test_exceptions_are_not_cached(storage: Storage) -> None:
    calls = Calls()
    calls.fail_next = True
    load = cached(storage, ttl=60, lock_ttl=30)(calls)
    errors = await held_calls(calls, 10, lambda: load(1))
    assert calls.count == 1  # the waiters share the one failure
    assert len(errors) == 10 and all(isinstance(error, RuntimeError) for error in errors)
    assert not await storage.has_item(load.cache_key(1))
    with anyio.fail_after(5):  # the lock is gone: no wait for lock_ttl
        assert await load(1) == {"n": 1, "call": 2}


async def test_a_cancelled_caller_hands_over_to_the_waiters(storage: Storage) -> None:
    calls = Calls()
    calls.gate = anyio.Event()
    load = cached(storage, ttl=60)(calls)
    results = []
    leading = anyio.CancelScope()

    async def leader() -> None:
        with leading:
            await load(1)

    async def follower() -> None:
        results.append(await load(1))

    async with anyio.create_task_group() as group:
        group.start_soon(leader)
        await wait_all_tasks_blocked()
        for _ in range(3):
            group.start_soon(follower)
        await wait_all_tasks_blocked()
        assert calls.count == 1
        leading.cancel()
        await wait_all_tasks_blocked()
        assert calls.count == 2  # one follower took over (the lock was released)
        calls.gate.set()
    assert results == [{"n": 1, "call": 2}] * 3


# -- keys ----------------------------------------------------------------------------------


class Color(Enum):
    RED = 1


async def test_argument_lists_that_would_collide_when_joined_stay_apart(storage: Storage) -> None:
    async def parts(*args: Any, **kwargs: Any) -> None:
        return None

    load = cached(storage, ttl=60)(parts)
    calls = [
        ("a:b",),
        ("a", "b"),
        ("a/b",),
        ("a\\b",),
        ("a%3Ab",),
        ("a::b",),
        ("",),
        ("", ""),
        (),
        (1,),
        ("1",),
        (1.0,),
        (True,),
        (None,),
        ("null",),
        ([1, 2],),
        ((1, 2),),
        ({1, 2},),
        (frozenset({1, 2}),),
        ({"a": 1},),
        ({"a": "1"},),
        (b"a",),
        ("bytes(61)",),
        (Color.RED,),
        (datetime(2020, 1, 1, tzinfo=UTC),),
        (datetime(2020, 1, 1),),
        (date(2020, 1, 1),),
        (Decimal("1.0"),),
        (Decimal("1"),),
        (uuid.UUID(int=1),),
        (timedelta(1),),
        (math.nan,),
        ("x" * 1000,),
        ("x" * 1001,),
    ]
    keys = [load.cache_key(*args) for args in calls]
    assert len(set(keys)) == len(calls)
    assert load.cache_key("a", "b") != load.cache_key("a", b="b")  # *args vs **kwargs
    for key in keys:
        assert normalize_key(key) == key and len(key) < MAX_ARGUMENTS + 150
        await storage.set_item(key, 1)  # a valid key on every driver
    assert len(await storage.get_keys()) == len(calls)


async def test_equal_calls_share_a_key(storage: Storage) -> None:
    async def f(a: int, b: int = 2, *, c: dict[str, int] | None = None) -> None:
        return None

    load = cached(storage, ttl=60, key="profiles")(f)
    assert load.cache_key(1) == load.cache_key(1, 2) == load.cache_key(a=1, b=2)
    assert load.cache_key(1, c={"x": 1, "y": 2}) == load.cache_key(1, c={"y": 2, "x": 1})
    assert load.cache_key(1).startswith("profiles:")
    with pytest.raises(TypeError):
        load.cache_key(1, d=3)  # type: ignore[call-arg]


async def test_unkeyable_arguments_ask_for_a_key_function(storage: Storage) -> None:
    async def f(thing: object) -> None:
        return None

    with pytest.raises(TypeError, match="key="):
        await cached(storage, ttl=60)(f)(object())


def test_bad_options_are_rejected() -> None:
    storage = create_storage()

    async def f() -> None:
        return None

    with pytest.raises(ValueError):
        cached(storage, ttl=0)(f)
    with pytest.raises(ValueError):
        cached(storage, ttl=None, stale_ttl=5)(f)
    with pytest.raises(ValueError):
        cached(storage, ttl=5, lock_ttl=-1)(f)
    with pytest.raises(TypeError):
        cached("memory://", ttl=5)(f)  # type: ignore[arg-type]


def _strictly_equal(a: Any, b: Any) -> bool:
    """Equal values of the same types all the way down (1 and True, or [1] and (1,),
    differ)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(map(_strictly_equal, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_strictly_equal(a[k], b[k]) for k in a)
    return bool(a == b)


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(alphabet=st.sampled_from("ab:/\\%\"'.,()[]{}=~# \n\x00é"), max_size=6)
    | st.binary(max_size=4)
)
arguments = st.lists(
    st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.lists(inner, max_size=3).map(tuple)
            | st.dictionaries(st.text(alphabet="ab:", max_size=2), inner, max_size=2)
        ),
        max_leaves=6,
    ),
    max_size=3,
)


@settings(max_examples=300, deadline=None)
@given(first=arguments, second=arguments)
def test_different_argument_lists_never_share_a_key(first: list[Any], second: list[Any]) -> None:
    async def f(*args: Any) -> None:
        return None

    load = cached(create_storage(), ttl=60)(f)
    if load.cache_key(*first) == load.cache_key(*second):
        assert _strictly_equal(first, second)
    key = load.cache_key(*first)
    assert normalize_key(key) == key


# -- across processes ----------------------------------------------------------------------

CACHED_CHILD = """
import asyncio, sys
from kvstorage import create_storage
from kvstorage.cache import cached

async def main() -> None:
    storage = create_storage(sys.argv[1])
    await storage.has_item("connect")  # connect (and create tables) before "ready"

    @cached(storage, ttl=60, key=lambda n: f"value:{n}")
    async def compute(n: int) -> dict:
        print("call", flush=True)
        await asyncio.sleep(0.5)  # the computation takes a while: everyone misses it
        return {"n": n}

    print("ready", flush=True)
    sys.stdin.readline()
    results = await asyncio.gather(*(compute(7) for _ in range(25)))
    assert results == [{"n": 7}] * 25, results
    print("done", flush=True)
    await storage.dispose()

asyncio.run(main())
"""


async def _one_call_across_processes(url: str) -> None:
    outputs = await run_at_once(CACHED_CHILD, url, processes=4)
    assert all(lines[-1] == "done" for lines in outputs)
    assert sum(lines.count("call") for lines in outputs) == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_four_processes_on_one_redis_call_once(
    anyio_backend: str, redis_server: RedisServer
) -> None:
    base = unique_base()
    await _one_call_across_processes(f"{redis_server.url}?base={base}")
    driver = RedisDriver(redis_server.url, base=base)
    assert [key async for key in driver.scan()] == ["value:7"]  # and the lock is gone
    await driver.clear()
    await driver.dispose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_four_processes_on_one_sqlite_file_call_once(
    anyio_backend: str, tmp_path: Path
) -> None:
    path = tmp_path / "cache.db"
    await _one_call_across_processes(f"sqlite:///{path}")
    storage = create_storage(f"sqlite:///{path}")
    assert await storage.get_keys() == ["value:7"]
    await storage.dispose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_over_a_tiered_mount_hits_stay_in_the_process(
    anyio_backend: str, redis_server: RedisServer
) -> None:
    tiered = TieredDriver(far=RedisDriver(redis_server.url, base=unique_base()))
    storage = create_storage().mount("hot", tiered)
    calls = Calls()
    load = cached(storage, ttl=60, key=lambda n: f"hot:{n}")(calls)
    assert await load(1) == {"n": 1, "call": 1}
    assert tiered.near.peek("1") is not None  # written through to near
    assert await load(1) == {"n": 1, "call": 1}
    await storage.clear("hot")
    await storage.dispose()
