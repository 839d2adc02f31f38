"""Core behaviour that does not depend on the driver: mounts, URLs, errors, emulation."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from collections.abc import AsyncGenerator
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest

from kvstorage import (
    Capabilities,
    ConditionFailedError,
    Driver,
    DriverError,
    InvalidKeyError,
    ReadOnlyError,
    Record,
    SerializationError,
    Storage,
    create_storage,
    prefix_storage,
)
from kvstorage.drivers import MemoryDriver, from_url
from kvstorage.drivers.base import require_asyncio

from .support.helpers import eventually

pytestmark = pytest.mark.anyio


class NoConditionsDriver(MemoryDriver):
    """A memory driver that claims no native conditions, so the core emulates them."""

    capabilities = Capabilities()

    async def set(self, key: str, value: bytes, **options: object) -> None:  # type: ignore[override]
        assert not options.get("if_absent") and options.get("if_match") is None
        await anyio.lowlevel.checkpoint()  # give concurrent writers a chance to interleave
        await super().set(key, value, expires_at=options.get("expires_at"))  # type: ignore[arg-type]


class ReadOnlyMemory(MemoryDriver):
    read_only = True


class BrokenDriver(Driver):
    name = "broken"

    async def get(self, key: str) -> Record | None:
        raise RuntimeError("disk on fire")

    async def set(self, key: str, value: bytes, **options: object) -> None:  # type: ignore[override]
        raise OSError("no space left")

    async def remove(self, key: str) -> bool:
        raise RuntimeError("nope")

    async def scan(
        self, base: str = "", *, max_depth: int | None = None
    ) -> AsyncGenerator[str, None]:
        raise RuntimeError("cannot list")
        yield ""


def test_import_needs_no_backend_library() -> None:
    code = (
        "import sys, kvstorage, kvstorage.drivers; s = kvstorage.create_storage();"
        "libs = ('redis', 'aiobotocore', 'botocore', 'aiosqlite', 'aiofiles', 'watchfiles',"
        " 'asyncpg');"
        "bad = [m for m in libs if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_from_url_unknown_scheme_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"memory://.*sqlite://.*redis\+cluster://.*s3://"):
        from_url("ftp://x")
    with pytest.raises(ValueError):
        from_url("no-scheme")
    driver = from_url("memory://?max_entries=3")
    assert isinstance(driver, MemoryDriver)


async def test_mount_by_url_and_mount_errors() -> None:
    storage = create_storage("memory://")
    storage.mount("cache", "memory://")
    with pytest.raises(ValueError, match="already mounted"):
        storage.mount("cache", MemoryDriver())
    with pytest.raises(ValueError, match="root"):
        await storage.unmount("")
    with pytest.raises(ValueError, match="nothing is mounted"):
        await storage.unmount("nope")
    with pytest.raises(TypeError):
        storage.mount("x", object())  # type: ignore[arg-type]
    await storage.dispose()


async def test_driver_failures_become_driver_error_with_cause() -> None:
    storage = create_storage(BrokenDriver())
    with pytest.raises(DriverError, match=r"\[broken\] RuntimeError: disk on fire") as info:
        await storage.get_item("k")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert info.value.driver == "broken"
    with pytest.raises(DriverError, match="no space left"):
        await storage.set_item("k", 1)
    with pytest.raises(DriverError, match="cannot list"):
        await storage.get_keys()


async def test_read_only_driver_rejects_every_write() -> None:
    driver = ReadOnlyMemory()
    storage = create_storage(driver)
    for write in (
        storage.set_item("k", 1),
        storage.set_item_raw("k", b"1"),
        storage.set_items({"k": 1}),
        storage.remove_item("k"),
        storage.remove_items(["k"]),
        storage.clear(),
        storage.touch("k", ttl=1),
        storage.update_item("k", lambda v: 1),
    ):
        with pytest.raises(ReadOnlyError):
            await write
    assert await storage.get_keys() == []


async def test_conditions_are_emulated_for_drivers_without_them() -> None:
    storage = create_storage(NoConditionsDriver())

    async def increment() -> None:
        await storage.update_item("n", lambda n: (n or 0) + 1, retries=1000)

    async with anyio.create_task_group() as group:
        for _ in range(30):
            group.start_soon(increment)
    assert await storage.get_item("n") == 30
    with pytest.raises(ConditionFailedError):
        await storage.set_item("n", 0, if_absent=True)


async def test_update_item_gives_up_after_retries() -> None:
    storage = create_storage()
    await storage.set_item("k", 0)

    async def meddle(value: int) -> int:
        await storage.set_item("k", value + 100)  # a concurrent writer, every time
        return value + 1

    with pytest.raises(ConditionFailedError):
        await storage.update_item("k", meddle, retries=3)


async def test_max_entries_evicts_least_recently_used() -> None:
    storage = create_storage(MemoryDriver(max_entries=3))
    for key in "abc":
        await storage.set_item(key, key)
    await storage.get_item("a")  # a is now the most recently used
    await storage.set_item("d", "d")
    assert sorted(await storage.get_keys()) == ["a", "c", "d"]


async def test_background_sweeper_deletes_expired_entries() -> None:
    driver = MemoryDriver()
    async with create_storage(driver, sweep_interval=0.05) as storage:
        await storage.set_item("gone", 1, ttl=0.1)
        await storage.set_item("kept", 1)

        async def swept() -> bool:
            return "gone" not in driver._data

        await eventually(swept, within=3)
        assert await storage.get_keys() == ["kept"]


async def test_sweep_reports_count() -> None:
    storage = create_storage()
    await storage.set_items({f"t:{i}": i for i in range(5)}, ttl=0.05)
    await storage.set_item("t:keep", 1)

    async def all_expired() -> bool:
        return await storage.get_keys("t") == ["t:keep"]

    await eventually(all_expired)
    assert await storage.sweep("t") == 5
    assert await storage.sweep() == 0


async def test_watch_callback_errors_do_not_break_writes(caplog: pytest.LogCaptureFixture) -> None:
    storage = create_storage()

    def explode(event: str, key: str) -> None:
        raise RuntimeError("callback bug")

    unwatch = await storage.watch(explode)
    await storage.set_item("k", 1)
    assert await storage.get_item("k") == 1
    assert "callback bug" in caplog.text
    await unwatch()


async def test_storage_repr_and_context_manager() -> None:
    async with create_storage() as storage:
        storage.mount("c", MemoryDriver())
        assert "MemoryDriver" in repr(storage)
        assert isinstance(storage, Storage)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_require_asyncio_refuses_trio() -> None:
    with pytest.raises(DriverError, match="only on asyncio, not on trio"):
        require_asyncio("redis")


async def test_keys_used_before_a_mount_go_to_the_mount_afterwards() -> None:
    root, later = MemoryDriver(), MemoryDriver()
    storage = create_storage(root)
    await storage.set_item("a:b", 1)
    assert await storage.get_item("a:b") == 1  # routed, and remembered
    storage.mount("a", later)
    assert await storage.get_item("a:b") is None
    await storage.set_item("a:b", 2)
    assert (await later.get("b")) is not None and await storage.get_item("a:b") == 2
    await storage.unmount("a", dispose=False)
    assert await storage.get_item("a:b") == 1


async def test_a_view_refuses_empty_and_non_string_keys_its_parent_has_used() -> None:
    storage = create_storage()
    await storage.set_item("p", 1)  # the normal key "p" is remembered by the routing
    assert await storage.get_item("p:") == 1  # remembered as "p", never as "p:"
    view = prefix_storage(storage, "p")
    for bad in ("", ":", "/"):
        with pytest.raises(InvalidKeyError):
            await view.get_item(bad)
        with pytest.raises(InvalidKeyError):
            await view.set_item(bad, 2)
    for not_a_key in (5, None, b"p"):
        with pytest.raises(InvalidKeyError):
            await view.get_item(not_a_key)  # type: ignore[arg-type]
        with pytest.raises(InvalidKeyError):
            await storage.get_item(not_a_key)  # type: ignore[arg-type]
    await view.set_item("/x//y/", 3)
    assert await storage.get_item("p:x:y") == 3 and await view.get_item("x:y") == 3
    assert await storage.get_item("p") == 1


async def test_stored_bytes_that_are_not_json_read_as_a_clear_error() -> None:
    storage = create_storage()
    await storage.set_item_raw("bad", b"{not json")
    await storage.set_item_raw("deep", b"[" * 100_000 + b"]" * 100_000)
    for key in ("bad", "deep"):
        with pytest.raises(SerializationError):
            await storage.get_item(key)
        with pytest.raises(SerializationError):
            await storage.get_items([key])
        with pytest.raises(SerializationError):
            await storage.get_entry(key)
    assert await storage.get_item_raw("bad") == b"{not json"  # nothing was lost


async def test_a_key_too_long_for_the_storage_is_refused_after_a_view_used_it() -> None:
    storage = create_storage()
    view = prefix_storage(storage, "p" * 100)
    key = "k" * 1000  # within the limit for the view, not once the view's base is added
    await view.set_item(key, 1)
    assert await view.get_item(key) == 1
    full = "p" * 100 + ":" + key
    with pytest.raises(InvalidKeyError):
        await storage.get_item(full)
    with pytest.raises(InvalidKeyError):
        await storage.set_item(full, 2)


class _Base64Serializer:
    """A custom serializer whose loads fails with msgspec's error on bytes it did not write."""

    name = "b64"

    def dumps(self, value: Any) -> bytes:
        return base64.b64encode(msgspec.json.encode(value))

    def loads(self, data: bytes) -> Any:
        return msgspec.json.decode(base64.b64decode(data, validate=True))


async def test_a_custom_serializer_error_is_not_reported_as_bad_json() -> None:
    storage = Storage(serializer=_Base64Serializer())
    await storage.set_item("a", {"x": 1})
    assert await storage.get_item("a") == {"x": 1}
    await storage.set_item_raw("b", base64.b64encode(b"{not json"))
    reads = (storage.get_item, storage.get_entry, lambda key: storage.get_items([key]))
    for read in reads:
        with pytest.raises(msgspec.DecodeError) as caught:
            await read("b")
        assert "not valid JSON" not in str(caught.value)


async def test_a_memory_driver_whose_set_is_overridden_is_awaited() -> None:
    # The core writes memory without awaiting set (synchronous_set), but not past a set
    # a subclass put in: that set must see every write.
    class CountingMemory(MemoryDriver):
        writes = 0

        async def set(self, key: str, value: bytes, **options: Any) -> str:
            CountingMemory.writes += 1
            return await super().set(key, value, **options)

    plain, counting = MemoryDriver(), CountingMemory()
    assert plain.synchronous_set() is not None and counting.synchronous_set() is None
    storage = create_storage(counting)
    await storage.set_item("a", 1)
    await storage.set_item("b", 2, ttl=60)
    await storage.set_item_raw("c", b"3")
    assert await storage.get_items(["a", "b", "c"]) == {"a": 1, "b": 2, "c": 3}
    assert CountingMemory.writes == 3


async def test_memory_read_without_awaiting_never_shows_an_expired_key() -> None:
    driver = MemoryDriver()
    storage = create_storage(driver)
    await driver.set("gone", b"1", expires_at=time.time() - 1)
    await driver.set("kept", b"2", expires_at=time.time() + 60)
    assert await storage.get_item("gone", "missing") == "missing"
    assert await storage.get_item_raw("gone") is None
    assert await storage.get_item("kept") == 2
    assert await storage.sweep() == 1  # the expired record was still held until now
    assert await driver.get("gone") is None


async def test_memory_written_without_awaiting_keeps_its_bound_expiry_and_etags() -> None:
    storage = create_storage(MemoryDriver(max_entries=2))
    await storage.set_item("a", 1)
    first = await storage.get_meta("a")
    await storage.set_item("a", 2, ttl=60)
    await storage.set_item("b", 3)
    await storage.set_item("c", 4)  # evicts a, the least recently used
    assert await storage.get_keys() == ["b", "c"]
    await storage.set_item("b", 5, ttl=60)
    second = await storage.get_meta("b")
    assert first is not None and second is not None and first.etag != second.etag
    assert second.expires_at is not None and second.mtime is not None
    assert 59 < (second.expires_at - second.mtime).total_seconds() <= 60


async def test_a_memory_driver_whose_get_is_overridden_is_awaited() -> None:
    # The core reads memory without awaiting get (synchronous_get), but not past a get
    # a subclass put in: that get must see every read.
    class CountingMemory(MemoryDriver):
        reads = 0

        async def get(self, key: str) -> Record | None:
            CountingMemory.reads += 1
            return await super().get(key)

    plain, counting = MemoryDriver(), CountingMemory()
    assert plain.synchronous_get() is not None and counting.synchronous_get() is None
    storage = create_storage(counting)
    await storage.set_item("a", 1)
    assert await storage.get_item("a") == 1
    assert (await storage.get_entry("a")) is not None
    assert CountingMemory.reads == 2
