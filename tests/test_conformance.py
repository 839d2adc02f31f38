"""The shared driver conformance suite: every driver must pass every test here.

Each test runs once per (driver, anyio backend) pair from ``tests.backends.BACKENDS``, and
over each driver wrapper (``tests.backends.WRAPPED_BACKENDS``).
Tests use only the public ``Storage`` API, so they hold the core and the driver to the
contract together.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings

from kvstorage import (
    ConditionFailedError,
    DriverError,
    InvalidKeyError,
    SerializationError,
    Storage,
    create_storage,
    prefix_storage,
    restore_snapshot,
    snapshot,
)
from kvstorage.drivers import HTTPDriver, S3Driver

from .backends import BackendSpec, DriverFactory
from .support.helpers import eventually, json_values

pytestmark = [pytest.mark.anyio, pytest.mark.wrapped_drivers]

JSON_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    2**64,
    -(2**80),
    10**40,
    0.0,
    -2.5,
    1e300,
    5e-324,
    "",
    "123",
    "true",
    "null",
    '"quoted"',
    " 42 ",
    "unicode: żółw 🐢 \u2028 \x7f",
    [],
    {},
    [1, "a", None, [2, [3, {}]]],
    {"name": "Ada", "tags": ["x"], "nested": {"a": {"b": [1.5, None]}}},
    {"": "empty key", "a:b": "colon", "?": "?"},
]


# -- keys ------------------------------------------------------------------------------


async def test_keys_are_normalized(storage: Storage) -> None:
    await storage.set_item("/users//42/", "a")
    assert await storage.get_item("users:42") == "a"
    assert await storage.get_item("users/42") == "a"
    assert await storage.get_item("\\users\\42") == "a"
    assert await storage.get_keys() == ["users:42"]
    await storage.set_item("q?x=1", 1)
    assert await storage.get_item("q?x=1") == 1
    assert await storage.get_item("q") is None


@pytest.mark.parametrize(
    "key",
    ["", ":", "//", "a:..:b", "..", ".", "a/./b", "a\x00b", "a\nb", "\x7f", "x" * 1025, "é" * 513],
)
async def test_invalid_keys_are_rejected_before_the_driver(storage: Storage, key: str) -> None:
    with pytest.raises(InvalidKeyError):
        await storage.set_item(key, 1)
    with pytest.raises(InvalidKeyError):
        await storage.get_item(key)
    assert await storage.get_keys() == []


async def test_dots_inside_segments_are_ordinary(storage: Storage) -> None:
    await storage.set_item("a..b:c.d:...", 1)
    assert await storage.get_item("a..b:c.d:...") == 1
    assert await storage.get_keys() == ["a..b:c.d:..."]


async def test_longest_valid_key(storage: Storage) -> None:
    key = "k" * 1024
    await storage.set_item(key, 1)
    assert await storage.get_item(key) == 1


# -- values ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", JSON_VALUES, ids=lambda v: repr(v)[:30])
async def test_json_values_round_trip_exactly(storage: Storage, value: Any) -> None:
    await storage.set_item("v", value)
    got = await storage.get_item("v", default="missing")
    assert got == value
    assert type(got) is type(value)
    assert await storage.has_item("v")


async def test_tuples_come_back_as_lists(storage: Storage) -> None:
    await storage.set_item("t", (1, (2, 3)))
    assert await storage.get_item("t") == [1, [2, 3]]


async def test_none_is_stored_and_missing_gives_default(storage: Storage) -> None:
    assert await storage.get_item("missing") is None
    assert await storage.get_item("missing", default=7) == 7
    assert not await storage.has_item("missing")
    await storage.set_item("null", None)
    assert await storage.has_item("null")
    assert await storage.get_item("null", default=7) is None


@pytest.mark.parametrize("value", [object(), {1: "a"}, {"a": {2}}, float("nan"), b"bytes"])
async def test_unserializable_values_write_nothing(storage: Storage, value: Any) -> None:
    await storage.set_item("k", "old")
    with pytest.raises(SerializationError):
        await storage.set_item("k", value)
    assert await storage.get_item("k") == "old"
    with pytest.raises(SerializationError):
        await storage.set_items({"k": "new", "other": value})
    assert await storage.get_item("k") == "old"
    assert not await storage.has_item("other")


async def test_raw_bytes_round_trip(storage: Storage) -> None:
    every_byte = bytes(range(256))
    await storage.set_item_raw("raw:all", every_byte)
    await storage.set_item_raw("raw:empty", b"")
    await storage.set_item_raw("raw:view", memoryview(b"mv"))
    assert await storage.get_item_raw("raw:all") == every_byte
    assert await storage.get_item_raw("raw:empty") == b""
    assert await storage.get_item_raw("raw:view") == b"mv"
    assert await storage.get_item_raw("raw:missing") is None
    assert await storage.has_item("raw:empty")
    with pytest.raises(SerializationError):
        await storage.get_item("raw:all")
    with pytest.raises(SerializationError):
        await storage.set_item_raw("raw:str", "text")  # type: ignore[arg-type]


async def test_large_value(storage: Storage) -> None:
    blob = bytes(range(256)) * 4096  # 1 MiB
    await storage.set_item_raw("big", blob)
    assert await storage.get_item_raw("big") == blob


async def test_tagged_serializer_per_storage(make_driver: DriverFactory) -> None:
    from datetime import UTC, datetime
    from decimal import Decimal
    from uuid import UUID

    store = create_storage(make_driver(), serializer="tagged")
    value = {
        "when": datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        "price": Decimal("1.10"),
        "id": UUID(int=5),
        "blob": b"\x00\xff",
        "ids": {1, 2},
        "pair": (1, "a"),
    }
    await store.set_item("t", value)
    assert await store.get_item("t") == value
    await store.dispose()


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(value=json_values)
async def test_property_any_json_value_round_trips(storage: Storage, value: Any) -> None:
    await storage.set_item("prop", value)
    assert await storage.get_item("prop") == value


# -- listing and clearing --------------------------------------------------------------


async def _fill(storage: Storage, keys: list[str]) -> None:
    await storage.set_items({key: key for key in keys})


async def test_listing_matches_whole_segments(storage: Storage) -> None:
    await _fill(storage, ["a", "a:b", "a:b:c", "ab", "ab:c", "b:a"])
    assert sorted(await storage.get_keys()) == ["a", "a:b", "a:b:c", "ab", "ab:c", "b:a"]
    assert sorted(await storage.get_keys("a")) == ["a:b", "a:b:c"]
    assert sorted(await storage.get_keys("a:")) == ["a:b", "a:b:c"]
    assert sorted(await storage.get_keys("/a/")) == ["a:b", "a:b:c"]
    assert await storage.get_keys("a:b:c") == []
    assert await storage.get_keys("nothing") == []


async def test_max_depth_is_relative_to_base(storage: Storage) -> None:
    await _fill(storage, ["x", "a:1", "a:b:2", "a:b:c:3"])
    assert sorted(await storage.get_keys(max_depth=0)) == ["x"]
    assert sorted(await storage.get_keys(max_depth=1)) == ["a:1", "x"]
    assert sorted(await storage.get_keys("a", max_depth=0)) == ["a:1"]
    assert sorted(await storage.get_keys("a", max_depth=1)) == ["a:1", "a:b:2"]
    assert sorted(await storage.get_keys("a", max_depth=5)) == ["a:1", "a:b:2", "a:b:c:3"]


async def test_iter_keys_equals_get_keys(storage: Storage) -> None:
    keys = [f"it:{i % 7}:{i}" for i in range(300)]
    await _fill(storage, keys)
    streamed = [key async for key in storage.iter_keys("it")]
    assert sorted(streamed) == sorted(keys)
    assert len(streamed) == len(set(streamed))
    assert sorted(streamed) == sorted(await storage.get_keys("it"))


async def test_iter_keys_can_stop_early(storage: Storage) -> None:
    await _fill(storage, [f"s:{i}" for i in range(50)])
    seen = []
    async for key in storage.iter_keys("s"):
        seen.append(key)
        if len(seen) == 3:
            break
    assert len(seen) == 3
    assert await storage.get_item(seen[0]) == seen[0]


async def test_clear_base_removes_exactly_what_get_keys_lists(storage: Storage) -> None:
    await _fill(storage, ["a", "a:b", "a:b:c", "ab", "ab:c", "b:a"])
    listed = await storage.get_keys("a")
    await storage.clear("a")
    for key in listed:
        assert not await storage.has_item(key)
    assert sorted(await storage.get_keys()) == ["a", "ab", "ab:c", "b:a"]
    await storage.clear()
    assert await storage.get_keys() == []


async def test_clear_below_a_non_mount_base(storage: Storage) -> None:
    await _fill(storage, ["u:1:x", "u:1:y", "u:2:x"])
    await storage.clear("u:1")
    assert await storage.get_keys() == ["u:2:x"]


# -- batches ---------------------------------------------------------------------------


async def test_get_items_in_input_order(storage: Storage) -> None:
    await storage.set_items([("b", 2), ("a", 1), ("c", 3)])
    result = await storage.get_items(["c", "nope", "/a/", "b"])
    assert list(result) == ["c", "nope", "a", "b"]
    assert result == {"c": 3, "nope": None, "a": 1, "b": 2}
    assert await storage.get_items([]) == {}


async def test_get_values_are_the_values_of_get_many(make_driver: DriverFactory) -> None:
    # get_items reads through get_values: the live values of get_many, in order.
    store = create_storage(make_driver())
    try:
        await store.set_items_raw({"a": bytes(range(256)), "b": b"{}"})
        await store.set_item("short", 1, ttl=timedelta(milliseconds=300))
        driver = store.get_mount("").driver
        keys = ["b", "nope", "a", "b", "short"]
        records = await driver.get_many(keys)
        assert [None if r is None else r.value for r in records[:4]] == [
            b"{}",
            None,
            bytes(range(256)),
            b"{}",
        ]
        assert await driver.get_values(keys[:4]) == [b"{}", None, bytes(range(256)), b"{}"]
        assert await driver.get_values([]) == []

        async def short_is_gone() -> bool:
            return await driver.get_values(["short", "a"]) == [None, bytes(range(256))]

        await eventually(short_is_gone)
    finally:
        await store.dispose()


async def test_set_items_and_remove_items(storage: Storage) -> None:
    await storage.set_items({f"batch:{i}": {"i": i} for i in range(250)})
    got = await storage.get_items(f"batch:{i}" for i in range(250))
    assert got == {f"batch:{i}": {"i": i} for i in range(250)}
    assert await storage.remove_items([f"batch:{i}" for i in range(100)] + ["nope"]) == 100
    assert len(await storage.get_keys("batch")) == 150
    assert await storage.remove_items([]) == 0


async def test_raw_batches_keep_bytes_etags_and_expiry(storage: Storage) -> None:
    every_byte = bytes(range(256))
    await storage.set_items_raw({"rb:a": every_byte, "rb:empty": b""})
    await storage.set_items_raw([("rb:t", b"ttl")], ttl=60)
    entries = await storage.get_entries_raw(["rb:t", "rb:missing", "/rb/a/", "rb:empty"])
    assert list(entries) == ["rb:t", "rb:missing", "rb:a", "rb:empty"]
    assert entries["rb:missing"] is None
    assert [e.value for e in entries.values() if e is not None] == [b"ttl", every_byte, b""]
    single = await storage.get_entry_raw("rb:a")
    assert single is not None and entries["rb:a"] is not None
    assert entries["rb:a"].etag == single.etag and entries["rb:a"].meta.size == 256
    ttl = entries["rb:t"].meta.ttl if entries["rb:t"] is not None else None
    assert ttl is not None and 50 < ttl <= 60
    assert entries["rb:a"].meta.ttl is None
    assert await storage.get_entries_raw([]) == {}


async def test_remove_item(storage: Storage) -> None:
    await storage.set_item("r", 1)
    assert await storage.remove_item("r") is True
    assert await storage.remove_item("r") is False
    assert not await storage.has_item("r")


# -- TTL -------------------------------------------------------------------------------


async def _expired(storage: Storage, key: str) -> bool:
    return not await storage.has_item(key)


async def _expired_by(storage: Storage, key: str, deadline: float) -> bool:
    """``key`` is gone; a read begun a second after ``deadline`` (its ttl's end, Unix time)
    that still finds it fails: an expiry that comes late, not a machine that stalled."""
    started = time.time()
    if await storage.has_item(key):
        assert started - deadline < 1.0, f"{key} still there {started - deadline:.2f} s late"
        return False
    return True


async def test_ttl_expires_everywhere(storage: Storage) -> None:
    written = time.monotonic()
    await storage.set_item("ttl:a", 1, ttl=0.5)
    await storage.set_items({"ttl:b": 2}, ttl=timedelta(milliseconds=500))
    await storage.set_item("ttl:keep", 3)
    deadline = time.time() + 0.5
    value, meta = await storage.get_item("ttl:a"), await storage.get_meta("ttl:a")
    if time.monotonic() - written < 0.5:  # else a loaded machine spent the whole TTL already
        assert value == 1
        assert meta is not None and meta.ttl is not None and 0 < meta.ttl <= 0.5
        assert meta.expires_at is not None and meta.expires_at.tzinfo is not None
    await eventually(lambda: _expired_by(storage, "ttl:a", deadline), within=2.0)
    await eventually(lambda: _expired_by(storage, "ttl:b", deadline), within=2.0)
    assert await storage.get_item("ttl:a") is None
    assert await storage.get_items(["ttl:a", "ttl:b", "ttl:keep"]) == {
        "ttl:a": None,
        "ttl:b": None,
        "ttl:keep": 3,
    }
    assert await storage.get_keys("ttl") == ["ttl:keep"]
    assert await storage.get_meta("ttl:a") is None
    await storage.sweep()
    assert await storage.get_keys("ttl") == ["ttl:keep"]


async def test_overwrite_without_ttl_clears_expiry(storage: Storage) -> None:
    await storage.set_item("k", 1, ttl=0.3)
    await storage.set_item("k", 2)
    meta = await storage.get_meta("k")
    assert meta is not None and meta.ttl is None and meta.expires_at is None
    await anyio.sleep(0.5)  # longer than the first ttl: the point is that nothing happens
    assert await storage.get_item("k") == 2


async def test_touch_sets_new_expiry(storage: Storage) -> None:
    assert await storage.touch("missing", ttl=10) is False
    await storage.set_item("k", {"v": 1})
    etag = (await storage.get_meta("k")).etag  # type: ignore[union-attr]
    assert await storage.touch("k", ttl=30) is True
    meta = await storage.get_meta("k")
    assert meta is not None and meta.ttl is not None and 20 < meta.ttl <= 30
    assert await storage.get_item("k") == {"v": 1}
    assert await storage.touch("k", ttl=0.3) is True  # shorter: the item expires
    await eventually(lambda: _expired(storage, "k"), within=2.0)
    await storage.set_item("k2", 1, ttl=10)  # alive however long the machine stalls
    assert await storage.touch("k2", ttl=60)
    assert etag  # a touched key still has an etag
    meta = await storage.get_meta("k2")
    assert meta is not None and meta.ttl is not None and meta.ttl > 50


async def test_expired_key_is_absent_for_conditions(storage: Storage) -> None:
    await storage.set_item("k", 1, ttl=0.2)
    await eventually(lambda: _expired(storage, "k"), within=2.0)
    await storage.set_item("k", 2, if_absent=True)
    assert await storage.get_item("k") == 2


@pytest.mark.parametrize("ttl", [0, -1, timedelta(0), float("nan")])
async def test_bad_ttl_is_rejected(storage: Storage, ttl: Any) -> None:
    with pytest.raises(ValueError):
        await storage.set_item("k", 1, ttl=ttl)
    assert not await storage.has_item("k")


#: One bad call per method: (id, call, the error it must raise). ``ttl=0`` on ``touch`` once
#: came back as a DriverError from every driver; each method gets its own case.
BAD_CALLS: list[tuple[str, Callable[[Storage], Awaitable[Any]], type[Exception]]] = [
    ("has_item-key", lambda s: s.has_item(""), InvalidKeyError),
    ("get_item-key", lambda s: s.get_item("a:..:b"), InvalidKeyError),
    ("get_item_raw-type", lambda s: s.get_item_raw(42), InvalidKeyError),  # type: ignore[arg-type]
    ("set_item-ttl", lambda s: s.set_item("k", 2, ttl=0), ValueError),
    ("set_item-ttl-type", lambda s: s.set_item("k", 2, ttl="5"), TypeError),  # type: ignore[arg-type]
    ("set_item-both", lambda s: s.set_item("k", 2, if_absent=True, if_match="x"), ValueError),
    ("set_item-if_match", lambda s: s.set_item("k", 2, if_match=5), TypeError),  # type: ignore[arg-type]
    ("set_item-if_absent", lambda s: s.set_item("k", 2, if_absent="yes"), TypeError),  # type: ignore[arg-type]
    ("set_item_raw-ttl", lambda s: s.set_item_raw("k", b"2", ttl=-1), ValueError),
    ("set_item_raw-data", lambda s: s.set_item_raw("k", "2"), TypeError),  # type: ignore[arg-type]
    ("remove_item-key", lambda s: s.remove_item("a\x00"), InvalidKeyError),
    ("get_meta-key", lambda s: s.get_meta("."), InvalidKeyError),
    ("get_entry-key", lambda s: s.get_entry(""), InvalidKeyError),
    ("get_entry_raw-key", lambda s: s.get_entry_raw(""), InvalidKeyError),
    ("update_item-ttl", lambda s: s.update_item("k", lambda v: 3, ttl=0), ValueError),
    ("update_item-fn", lambda s: s.update_item("k", 3), TypeError),  # type: ignore[arg-type]
    ("update_item-retries", lambda s: s.update_item("k", lambda v: 3, retries=-1), ValueError),
    ("touch-ttl", lambda s: s.touch("k", ttl=0), ValueError),
    ("touch-ttl-nan", lambda s: s.touch("k", ttl=float("nan")), ValueError),
    ("get_items-str", lambda s: s.get_items("k"), TypeError),
    ("get_items-key", lambda s: s.get_items(["k", ""]), InvalidKeyError),
    ("set_items-ttl", lambda s: s.set_items({"k": 3}, ttl=0), ValueError),
    ("set_items-pairs", lambda s: s.set_items([("k", 3, 4)]), TypeError),  # type: ignore[list-item]
    ("set_items-key", lambda s: s.set_items({"j": 3, "..": 4}), InvalidKeyError),
    ("get_entries_raw-key", lambda s: s.get_entries_raw(["k", "a:..:b"]), InvalidKeyError),
    ("set_items_raw-data", lambda s: s.set_items_raw({"j": b"1", "k": "2"}), TypeError),  # type: ignore[dict-item]
    ("set_items_raw-ttl", lambda s: s.set_items_raw({"j": b"1"}, ttl=0), ValueError),
    ("remove_items-str", lambda s: s.remove_items("k"), TypeError),
    ("remove_items-key", lambda s: s.remove_items(["k", "\x01"]), InvalidKeyError),
    ("get_keys-depth", lambda s: s.get_keys("", max_depth=-1), ValueError),
    ("get_keys-depth-type", lambda s: s.get_keys("", max_depth="1"), TypeError),  # type: ignore[arg-type]
    ("get_keys-base", lambda s: s.get_keys("a:..:b"), InvalidKeyError),
    ("clear-base", lambda s: s.clear(".."), InvalidKeyError),
    ("sweep-base", lambda s: s.sweep(7), InvalidKeyError),  # type: ignore[arg-type]
    ("watch-callback", lambda s: s.watch("print"), TypeError),  # type: ignore[arg-type]
]

_DRIVER_METHODS = (
    "get", "set", "remove", "scan", "head", "get_many", "get_values", "set_many",
    "remove_many", "clear", "touch", "sweep", "watch",
)  # fmt: skip


@pytest.mark.parametrize(
    ("call", "error"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS]
)
async def test_bad_arguments_fail_before_the_driver(
    make_driver: DriverFactory,
    monkeypatch: pytest.MonkeyPatch,
    call: Callable[[Storage], Awaitable[Any]],
    error: type[Exception],
) -> None:
    driver = make_driver()
    storage = create_storage(driver)
    try:
        await storage.set_item("k", 1)
        called: list[str] = []
        for name in _DRIVER_METHODS:
            method = getattr(driver, name)

            def spy(*args: Any, _name: str = name, _method: Any = method, **kwargs: Any) -> Any:
                called.append(_name)
                return _method(*args, **kwargs)

            monkeypatch.setattr(driver, name, spy)
        with pytest.raises(error) as caught:
            await call(storage)
        assert not isinstance(caught.value, DriverError), caught.value
        assert called == []
        monkeypatch.undo()
        assert await storage.get_items(["k", "j"]) == {"k": 1, "j": None}
    finally:
        await storage.dispose()


# -- metadata and conditions -----------------------------------------------------------


async def test_meta_and_entry(storage: Storage) -> None:
    before = time.time()
    await storage.set_item("m", {"a": 1})
    meta = await storage.get_meta("m")
    entry = await storage.get_entry("m")
    assert meta is not None and entry is not None
    assert entry.value == {"a": 1}
    assert meta.size == entry.meta.size == len(await storage.get_item_raw("m") or b"")
    assert meta.etag == entry.etag
    if meta.mtime is not None:
        assert meta.mtime.timestamp() >= before - 2
    assert meta.ttl is None and meta.expires_at is None
    assert await storage.get_meta("nope") is None
    assert await storage.get_entry("nope") is None
    raw = await storage.get_entry_raw("m")
    assert raw is not None and raw.etag == entry.etag
    assert raw.value == await storage.get_item_raw("m")
    assert await storage.get_entry_raw("nope") is None


async def test_etag_changes_on_every_write(storage: Storage) -> None:
    etags = set()
    for value in [1, 1, 2, 1]:
        await storage.set_item("e", value)
        entry = await storage.get_entry("e")
        assert entry is not None
        etags.add(entry.etag)
    assert len(etags) == 4


async def test_set_returns_the_etag_it_wrote(
    make_driver: DriverFactory, backend_spec: BackendSpec
) -> None:
    """Every driver but S3 and HTTP (their servers do not answer a write with its etag)
    tells the etag of what it wrote (caches keep their own writes by it), and it is the etag
    a read then reports."""
    driver = make_driver()
    conditions = driver.capabilities.conditions
    try:
        writes: list[dict[str, Any]] = [{}, {"expires_at": time.time() + 60}, {}]
        if conditions:
            writes[0] = {"if_absent": True}
        for number, options in enumerate(writes):
            if conditions and number == 2:
                current = await driver.get("e")
                assert current is not None
                options = {"if_match": current.etag}
            etag = await driver.set("e", str(number).encode(), **options)
            record = await driver.get("e")
            assert record is not None and record.value == str(number).encode()
            if backend_spec.driver in (S3Driver, HTTPDriver) and etag is None:
                continue
            assert etag == record.etag, options
    finally:
        await driver.dispose()


async def test_if_absent(storage: Storage) -> None:
    await storage.set_item("c", 1, if_absent=True)
    with pytest.raises(ConditionFailedError):
        await storage.set_item("c", 2, if_absent=True)
    assert await storage.get_item("c") == 1


async def test_if_match(storage: Storage) -> None:
    await storage.set_item("c", 1)
    entry = await storage.get_entry("c")
    assert entry is not None
    await storage.set_item("c", 2, if_match=entry.etag)
    with pytest.raises(ConditionFailedError):
        await storage.set_item("c", 3, if_match=entry.etag)
    assert await storage.get_item("c") == 2
    with pytest.raises(ConditionFailedError):
        await storage.set_item("missing", 1, if_match=entry.etag)
    assert not await storage.has_item("missing")
    with pytest.raises(ValueError):
        await storage.set_item("c", 4, if_absent=True, if_match=entry.etag)


async def test_concurrent_update_item_is_exact(storage: Storage) -> None:
    async def increment() -> None:
        await storage.update_item("counter", lambda n: (n or 0) + 1, retries=1000)

    async with anyio.create_task_group() as group:
        for _ in range(50):
            group.start_soon(increment)
    assert await storage.get_item("counter") == 50


async def test_concurrent_if_absent_has_one_winner(storage: Storage) -> None:
    winners = []

    async def claim(i: int) -> None:
        try:
            await storage.set_item("lock", i, if_absent=True)
        except ConditionFailedError:
            return
        winners.append(i)

    async with anyio.create_task_group() as group:
        for i in range(20):
            group.start_soon(claim, i)
    assert len(winners) == 1
    assert await storage.get_item("lock") == winners[0]


async def test_update_item_keeps_expiry_and_accepts_coroutines(storage: Storage) -> None:
    await storage.set_item("u", 1, ttl=60)

    async def add_one(n: int) -> int:
        return n + 1

    assert await storage.update_item("u", add_one) == 2
    meta = await storage.get_meta("u")
    assert meta is not None and meta.ttl is not None and meta.ttl > 50
    assert await storage.update_item("u", lambda n: n * 10, ttl=5) == 20
    meta = await storage.get_meta("u")
    assert meta is not None and meta.ttl is not None and meta.ttl <= 5


# -- mounts and views ------------------------------------------------------------------


async def test_mounts_route_and_mask(make_driver: DriverFactory) -> None:
    root, cache = make_driver(), make_driver()
    store = create_storage(root)
    await store.set_item("cache:hidden", "in root")
    store.mount("cache", cache)
    assert await store.get_item("cache:hidden") is None
    await store.set_item("cache:x", 1)
    await store.set_item("cachex", 2)
    await store.set_item("cache", 3)  # the key equal to a mount base stays in the parent
    assert await cache.get("x") is not None
    assert sorted(await store.get_keys()) == ["cache", "cache:x", "cachex"]
    assert await store.get_keys("cache") == ["cache:x"]
    assert store.get_mount("cache:x").driver is cache
    assert store.get_mount("cachex").driver is root
    assert [m.base for m in store.get_mounts()] == ["cache", ""]
    assert [m.base for m in store.get_mounts("cache")] == ["cache"]
    assert [m.base for m in store.get_mounts("cache", parents=True)] == ["cache", ""]
    await store.clear()
    assert await store.get_keys() == []
    await store.unmount("cache", dispose=False)
    assert await store.get_item("cache:hidden") == "in root"  # masked keys survive clear
    await store.dispose()
    await cache.dispose()


async def test_clear_and_list_across_nested_mounts(make_driver: DriverFactory) -> None:
    store = create_storage(make_driver())
    store.mount("a:b", make_driver())
    await _fill(store, ["a:1", "a:b:2", "a:b:c:3", "a:bb", "z"])
    assert sorted(await store.get_keys("a")) == ["a:1", "a:b:2", "a:b:c:3", "a:bb"]
    assert sorted(await store.get_keys("a", max_depth=1)) == ["a:1", "a:b:2", "a:bb"]
    assert sorted(await store.get_keys("a", max_depth=0)) == ["a:1", "a:bb"]
    await store.clear("a")
    assert await store.get_keys() == ["z"]
    await store.dispose()


async def test_prefix_storage_view(storage: Storage) -> None:
    await storage.set_item("other", 0)
    view = prefix_storage(storage, "app:v1")
    await view.set_item("x:1", 1)
    await view.set_items({"x:2": 2})
    assert await storage.get_item("app:v1:x:1") == 1
    assert sorted(await view.get_keys()) == ["x:1", "x:2"]
    assert sorted(await view.get_keys("x", max_depth=0)) == ["x:1", "x:2"]
    assert await view.get_items(["x:2", "x:1"]) == {"x:2": 2, "x:1": 1}
    nested = prefix_storage(view, "x")
    assert await nested.get_item("1") == 1
    await view.clear()
    assert await storage.get_keys() == ["other"]


async def test_snapshot_and_restore(make_driver: DriverFactory) -> None:
    source = create_storage(make_driver())
    await _fill(source, ["s:a", "s:b:c", "t"])
    data = await snapshot(source, "s")
    assert data == {"a": "s:a", "b:c": "s:b:c"}
    target = create_storage(make_driver())
    await restore_snapshot(target, data, "copy")
    assert await target.get_item("copy:b:c") == "s:b:c"
    await source.dispose()
    await target.dispose()


# -- watch -----------------------------------------------------------------------------


async def test_watch_reports_every_write_path(storage: Storage) -> None:
    events: list[tuple[str, str]] = []
    unwatch = await storage.watch(lambda event, key: events.append((event, key)))

    async def seen(*expected: tuple[str, str]) -> bool:
        return all(e in events for e in expected)

    await storage.set_item("w:a", 1)
    await storage.set_item_raw("w:raw", b"x")
    await storage.set_items({"w:b": 2, "w:c": 3})
    await eventually(
        lambda: seen(("update", "w:a"), ("update", "w:raw"), ("update", "w:b"), ("update", "w:c"))
    )
    await storage.remove_item("w:a")
    await storage.remove_items(["w:b"])
    await eventually(lambda: seen(("remove", "w:a"), ("remove", "w:b")))
    await storage.clear("w")
    await eventually(lambda: seen(("remove", "w:c"), ("remove", "w:raw")))
    await unwatch()
    count = len(events)
    await storage.set_item("w:after", 1)
    assert await storage.get_item("w:after") == 1
    assert len(events) == count or all(key != "w:after" for _, key in events[count:])


async def test_exact_watch_reports_each_set_once_in_order(make_driver: DriverFactory) -> None:
    driver = make_driver()
    if not driver.capabilities.exact_watch:
        await driver.dispose()
        pytest.skip("the driver does not declare exact_watch")
    events: list[tuple[str, str]] = []
    stop = await driver.watch(lambda event, key: events.append((event, key)))
    try:
        expected = []
        for i in range(12):
            await driver.set(f"x:{i % 3}", b"v", expires_at=time.time() + 60 if i % 2 else None)
            expected.append(("update", f"x:{i % 3}"))
            with pytest.raises(ConditionFailedError):  # a failed condition reports nothing
                await driver.set(f"x:{i % 3}", b"w", if_absent=True)
        await driver.set("end", b"")

        async def ended() -> bool:
            return ("update", "end") in events

        await eventually(ended)
        assert events == [*expected, ("update", "end")]
    finally:
        await stop()
        await driver.dispose()


async def test_watch_on_a_view_strips_its_prefix(storage: Storage) -> None:
    view = prefix_storage(storage, "v")
    events: list[tuple[str, str]] = []
    unwatch = await view.watch(lambda event, key: events.append((event, key)))
    await storage.set_item("other", 1)
    await view.set_item("k", 1)

    async def seen() -> bool:
        return ("update", "k") in events

    await eventually(seen)
    assert all(key == "k" for _, key in events)
    await unwatch()
