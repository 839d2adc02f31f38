"""EncryptedDriver beyond the conformance suite: what reaches the backend, key rotation,
tampering, and keys that never show. (The conformance suite runs it over every driver.)"""

from __future__ import annotations

import base64
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import redis

from kvstorage import Driver, DriverError, Storage, create_storage
from kvstorage.drivers import FSDriver, MemoryDriver, RedisDriver, SQLiteDriver
from kvstorage.wrappers import EncryptedDriver

from .backends import BackendSpec, DriverFactory
from .backends.wrapped import WRAPPED_DRIVERS

pytestmark = pytest.mark.anyio

OLD, NEW = os.urandom(32), os.urandom(32)
SECRET = "correct horse battery staple"


async def stored_bytes(driver: Driver, redis_url: str | None = None) -> bytes:
    """Every byte the backend of ``driver`` holds, read around the driver (for memory, whose
    backend is the driver, through it)."""
    if isinstance(driver, MemoryDriver):
        records = [await driver.get(key) async for key in driver.scan()]
        return b"".join(record.value for record in records if record is not None)
    return _read_around(driver, redis_url)


def _read_around(driver: Driver, redis_url: str | None) -> bytes:
    if isinstance(driver, FSDriver):
        return b"".join(p.read_bytes() for p in Path(driver.base).rglob("*") if p.is_file())
    if isinstance(driver, SQLiteDriver):
        files = b"".join(p.read_bytes() for p in Path(driver.path).parent.iterdir() if p.is_file())
        with sqlite3.connect(driver.path) as db:  # and the rows, as SQLite reads them
            values = [v for (v,) in db.execute(f'SELECT value FROM "{driver.table}"')]
        return files + b"".join(values)
    assert isinstance(driver, RedisDriver)
    client = redis.Redis.from_url(redis_url or "")
    try:
        return b"".join(client.get(k) or b"" for k in client.scan_iter(f"{driver.base}:*"))
    finally:
        client.close()


@pytest.mark.only_drivers(*WRAPPED_DRIVERS)
async def test_the_backend_never_holds_the_plaintext(
    make_driver: DriverFactory, backend_spec: BackendSpec, request: pytest.FixtureRequest
) -> None:
    inner = make_driver()
    is_redis = backend_spec.name == "redis"
    redis_url = request.getfixturevalue("redis_server").url if is_redis else None
    storage = create_storage(EncryptedDriver(inner, keys=[NEW]))
    await storage.set_item("one", {"password": SECRET})
    await storage.set_items({"many:1": SECRET, "many:2": [SECRET] * 3}, ttl=60)
    await storage.set_item_raw("raw", SECRET.encode())
    await storage.update_item("counted", lambda _: {"n": 1, "s": SECRET})
    await storage.touch("one", ttl=60)
    assert await storage.get_item("one") == {"password": SECRET}
    held = await stored_bytes(inner, redis_url)
    assert len(held) > 5 * 33  # the values are there, encrypted
    assert SECRET.encode() not in held
    assert SECRET[:8].encode() not in held


async def test_rotation_reads_old_values_and_writes_under_the_new_key() -> None:
    inner = MemoryDriver()
    old = create_storage(EncryptedDriver(inner, keys=[OLD]))
    await old.set_item("a", "written under old")
    await old.set_item("b", "also old")
    rotated = create_storage(EncryptedDriver(inner, keys=[NEW, OLD]))
    assert await rotated.get_items(["a", "b"]) == {"a": "written under old", "b": "also old"}
    await rotated.set_item("a", "rewritten")
    only_new = create_storage(EncryptedDriver(inner, keys=[NEW]))
    assert await only_new.get_item("a") == "rewritten"
    with pytest.raises(DriverError, match="not among the keys"):
        await only_new.get_item("b")  # never rewritten: still under the old key


async def test_rotate_rewrites_what_old_keys_encrypted() -> None:
    inner = MemoryDriver()
    old = create_storage(EncryptedDriver(inner, keys=[OLD]))
    await old.set_items({f"u:{i}": i for i in range(5)})
    await old.set_item("u:ttl", "x", ttl=300)
    await old.set_item("other", "outside the base")
    driver = EncryptedDriver(inner, keys=[NEW, OLD])
    await create_storage(driver).set_item("u:0", "already new")
    assert await driver.rotate("u") == 5  # u:1..4 and u:ttl; u:0 is under NEW already
    assert await driver.rotate("u") == 0
    only_new = create_storage(EncryptedDriver(inner, keys=[NEW]))
    assert await only_new.get_items(["u:0", "u:1", "u:4", "u:ttl"]) == {
        "u:0": "already new",
        "u:1": 1,
        "u:4": 4,
        "u:ttl": "x",
    }
    meta = await only_new.get_meta("u:ttl")
    assert meta is not None and meta.ttl is not None and 250 < meta.ttl <= 300
    with pytest.raises(DriverError):
        await only_new.get_item("other")


async def _storage_with(value: Any) -> tuple[Storage, MemoryDriver]:
    inner = MemoryDriver()
    storage = create_storage(EncryptedDriver(inner, keys=[NEW]))
    await storage.set_item("a", value)
    return storage, inner


async def test_a_value_copied_to_another_key_fails() -> None:
    storage, inner = await _storage_with({"role": "admin"})
    await storage.set_item("b", {"role": "guest"})
    record = await inner.get("a")
    assert record is not None
    await inner.set("b", record.value)  # a valid ciphertext, at the wrong key
    with pytest.raises(DriverError, match="'b' failed authentication"):
        await storage.get_item("b")
    with pytest.raises(DriverError):
        await storage.get_items(["a", "b"])
    with pytest.raises(DriverError):
        await storage.get_entry("b")
    assert await storage.get_item("a") == {"role": "admin"}


async def test_every_flipped_byte_fails() -> None:
    storage, inner = await _storage_with("a short secret")
    record = await inner.get("a")
    assert record is not None
    for index in range(len(record.value)):  # version, key id, nonce, ciphertext, tag
        tampered = bytearray(record.value)
        tampered[index] ^= 0x01
        await inner.set("a", bytes(tampered))
        with pytest.raises(DriverError, match="'a'") as caught:
            await storage.get_item_raw("a")
        assert "short secret" not in str(caught.value)


@pytest.mark.parametrize("stored", [b"", b"plain text", b'{"json": 1}', b"\x01" * 32])
async def test_bytes_that_were_never_encrypted_fail(stored: bytes) -> None:
    inner = MemoryDriver()
    await inner.set("a", stored)  # e.g. written before the wrapper, or truncated
    with pytest.raises(DriverError, match="not an encrypted value"):
        await create_storage(EncryptedDriver(inner, keys=[NEW])).get_item_raw("a")


async def test_raw_and_base64_forms_of_a_key_are_the_same_key() -> None:
    inner = MemoryDriver()
    await create_storage(EncryptedDriver(inner, keys=[NEW])).set_item("a", 1)
    text = base64.urlsafe_b64encode(NEW).decode()
    for form in (text, text.rstrip("="), bytearray(NEW)):
        assert await create_storage(EncryptedDriver(inner, keys=[form])).get_item("a") == 1
    generated = EncryptedDriver.generate_key()
    assert len(base64.urlsafe_b64decode(generated)) == 32


@pytest.mark.parametrize(
    ("keys", "error"),
    [
        ([], ValueError),
        (NEW, TypeError),  # one key, not a list
        (base64.urlsafe_b64encode(NEW).decode(), TypeError),
        ([NEW[:16]], ValueError),
        ([NEW + b"x"], ValueError),
        ([base64.urlsafe_b64encode(NEW[:16]).decode()], ValueError),
        (["not base64 at all!"], ValueError),
        (["é" * 44], ValueError),
        ([NEW, 12345], TypeError),
        ([None], TypeError),
    ],
    ids=lambda v: type(v).__name__,
)
async def test_bad_keys_fail_at_construction(keys: Any, error: type[Exception]) -> None:
    with pytest.raises(error) as caught:
        EncryptedDriver(MemoryDriver(), keys=keys)
    _assert_no_key_in(str(caught.value))


async def test_keys_never_show_in_repr_or_errors() -> None:
    driver = EncryptedDriver(MemoryDriver(), keys=[NEW, base64.urlsafe_b64encode(OLD).decode()])
    storage = create_storage(driver)
    await driver.inner.set("x", b"\x01" + os.urandom(60))
    with pytest.raises(DriverError) as caught:
        await storage.get_item("x")
    for text in (repr(driver), str(driver), repr(storage), str(caught.value), repr(caught.value)):
        _assert_no_key_in(text)
    assert "2 hidden" in repr(driver)


def _assert_no_key_in(text: str) -> None:
    for key in (NEW, OLD):
        for form in (key, key.hex().encode(), base64.urlsafe_b64encode(key), repr(key).encode()):
            assert form[:12] not in text.encode(), text


async def test_sessions_on_an_encrypted_driver_are_encrypted_at_rest() -> None:
    from sessions import SessionManager

    inner = MemoryDriver()
    manager = SessionManager(EncryptedDriver(inner, keys=[NEW]), ttl=60)
    session = manager.open(None)
    await session.set("card", SECRET)
    cookies = await manager.commit(session)
    assert cookies and session.id is not None
    assert SECRET.encode() not in await stored_bytes(inner)
    again = manager.open(session.id)
    assert await again.get("card") == SECRET
    await manager.dispose()
