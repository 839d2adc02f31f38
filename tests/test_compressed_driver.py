"""CompressedDriver beyond the conformance suite: what is stored, values from before the
wrapper, the compression ratio, and corrupt frames. (The conformance suite runs it over
every driver.)"""

from __future__ import annotations

import json
import os
import random
from collections.abc import AsyncGenerator

import pytest
import zstandard

from kvstorage import DriverError, create_storage
from kvstorage.drivers import MemoryDriver
from kvstorage.wrappers import CompressedDriver, WrapperDriver

pytestmark = pytest.mark.anyio

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def one_mib_of_json() -> list[dict[str, object]]:
    """A realistic, compressible JSON document of 1 MiB (compact): a table of users."""
    rng = random.Random(17)
    names = ["Ada", "Grace", "Linus", "Barbara", "Edsger", "Margaret", "Ken", "Frances"]
    records: list[dict[str, object]] = []
    size = 2  # the brackets
    while size < 2**20:
        record = {
            "id": len(records),
            "name": rng.choice(names),
            "email": f"user{len(records)}@example.com",
            "active": rng.random() < 0.8,
            "score": round(rng.uniform(0, 100), 2),
            "tags": rng.sample(["admin", "beta", "staff", "trial", "eu", "us"], 2),
        }
        records.append(record)
        size += len(json.dumps(record, separators=(",", ":"))) + 1
    return records


async def stored(inner: MemoryDriver, key: str) -> bytes:
    record = await inner.get(key)
    assert record is not None
    return record.value


async def test_a_compressible_mib_of_json_is_stored_at_least_5x_smaller() -> None:
    inner = MemoryDriver()
    storage = create_storage(CompressedDriver(inner))
    document = one_mib_of_json()
    await storage.set_item("users", document)
    size = len(await storage.get_item_raw("users") or b"")
    held = len(await stored(inner, "users"))
    assert size >= 2**20
    assert size / held >= 5, f"only {size / held:.1f}x"
    print(f"1 MiB of JSON: {size:,} bytes stored as {held:,} ({size / held:.1f}x)")
    assert await storage.get_item("users") == document
    meta = await storage.get_meta("users")
    assert meta is not None and meta.size == size


async def test_values_below_min_size_are_stored_unchanged() -> None:
    inner = MemoryDriver()
    storage = create_storage(CompressedDriver(inner, min_size=100))
    small = b"a" * 99
    await storage.set_item_raw("small", small)
    await storage.set_item_raw("big", b"a" * 100)
    assert await stored(inner, "small") == small
    assert len(await stored(inner, "big")) < 100
    assert await storage.get_item_raw("big") == b"a" * 100


async def test_values_that_do_not_shrink_are_stored_unchanged() -> None:
    inner = MemoryDriver()
    noise = os.urandom(4096)
    await create_storage(CompressedDriver(inner, min_size=0)).set_item_raw("noise", noise)
    assert await stored(inner, "noise") == noise


OLD_VALUES = [
    b"",
    b"\x00",
    b"\x00\x28\xb5\x2f",  # the signature but one byte
    b'{"written": "before the wrapper"}' * 100,
    ZSTD_MAGIC + b"a zstd magic without the marker",
    zstandard.ZstdCompressor().compress(b"a real zstd frame, stored by another tool"),
    bytes(range(256)) * 8,
]


@pytest.mark.parametrize("value", OLD_VALUES, ids=range(len(OLD_VALUES)))
async def test_values_written_before_the_wrapper_read_back_unchanged(value: bytes) -> None:
    inner = MemoryDriver()
    await create_storage(inner).set_item_raw("old", value)
    storage = create_storage(CompressedDriver(inner, min_size=0))
    assert await storage.get_item_raw("old") == value
    entry = await storage.get_entry_raw("old")
    assert entry is not None and entry.value == value


async def test_a_value_that_looks_compressed_is_compressed_whatever_its_size() -> None:
    inner = MemoryDriver()
    storage = create_storage(CompressedDriver(inner))
    lookalike = b"\x00" + ZSTD_MAGIC + b"tiny"
    await storage.set_item_raw("k", lookalike)
    assert await stored(inner, "k") != lookalike
    assert await storage.get_item_raw("k") == lookalike


async def test_old_json_values_mix_with_new_compressed_ones() -> None:
    inner = MemoryDriver()
    await create_storage(inner).set_items({"old:1": {"n": 1}, "old:2": "x" * 5000})
    storage = create_storage(CompressedDriver(inner))
    await storage.set_item("new", "y" * 5000)
    assert await storage.get_items(["old:1", "old:2", "new"]) == {
        "old:1": {"n": 1},
        "old:2": "x" * 5000,
        "new": "y" * 5000,
    }


async def test_a_corrupt_frame_is_a_clear_error() -> None:
    inner = MemoryDriver()
    storage = create_storage(CompressedDriver(inner))
    await storage.set_item_raw("k", b"z" * 5000)
    value = bytearray(await stored(inner, "k"))
    del value[-4:]  # truncated
    await inner.set("k", bytes(value))
    with pytest.raises(DriverError, match="value at 'k' is corrupt"):
        await storage.get_item_raw("k")


@pytest.mark.parametrize(
    "options",
    [{"min_size": -1}, {"min_size": 1.5}, {"min_size": True}, {"level": 23}, {"level": "3"}],
    ids=repr,
)
def test_bad_options_fail_at_construction(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        CompressedDriver(MemoryDriver(), **options)  # type: ignore[arg-type]


async def test_a_wrapper_lists_through_the_inner_pages_unless_it_changes_scan() -> None:
    inner = MemoryDriver()
    assert vars(CompressedDriver(inner))["scan_pages"] == inner.scan_pages

    class Hiding(WrapperDriver):
        async def scan(
            self, base: str = "", *, max_depth: int | None = None
        ) -> AsyncGenerator[str, None]:
            async for key in self.inner.scan(base, max_depth=max_depth):
                if not key.startswith("secret"):
                    yield key

    store = create_storage(Hiding(MemoryDriver()))
    await store.set_items({"secret:a": 1, "public:b": 2})
    assert await store.get_keys() == ["public:b"]
    assert [key async for key in store.iter_keys()] == ["public:b"]
