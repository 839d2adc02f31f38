"""FSDriver-specific behaviour: the file layout, path safety, read-only mode, TTL across
instances, temp files, and crash/multi-process safety with real child processes."""

from __future__ import annotations

import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from kvstorage import (
    ConditionFailedError,
    DriverError,
    InvalidKeyError,
    ReadOnlyError,
    Storage,
    create_storage,
)
from kvstorage.drivers import FSDriver, from_url

from . import reliability
from .children import run_counters
from .helpers import ROOT, eventually

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def driver(base: Path) -> AsyncIterator[FSDriver]:
    made = FSDriver(base)
    yield made
    await made.dispose()


@pytest.fixture
async def storage(driver: FSDriver) -> AsyncIterator[Storage]:
    store = create_storage(driver)
    yield store
    await store.dispose()


def _tree(base: Path) -> list[str]:
    """Every path below ``base`` except the lock directory, relative, sorted."""
    return sorted(
        str(path.relative_to(base))
        for path in base.rglob("*")
        if not str(path.relative_to(base)).startswith(":locks")
    )


# -- layout ----------------------------------------------------------------------------


async def test_files_without_ttl_hold_exactly_the_bytes(storage: Storage, base: Path) -> None:
    await storage.set_item("users:42", {"name": "Ada"})
    await storage.set_item_raw("blob", bytes(range(256)))
    assert (base / "users:" / "42").read_bytes() == b'{"name":"Ada"}'
    assert (base / "blob").read_bytes() == bytes(range(256))
    (base / "users:" / "7").write_bytes(b'"written by another tool"')
    assert await storage.get_item("users:7") == "written by another tool"
    assert sorted(await storage.get_keys()) == ["blob", "users:42", "users:7"]


async def test_ttl_is_a_header_and_magic_values_round_trip(
    storage: Storage, driver: FSDriver, base: Path
) -> None:
    await storage.set_item_raw("t", b"value", ttl=60)
    raw = (base / "t").read_bytes()
    assert raw.endswith(b"value") and len(raw) == 16 + 5
    meta = await storage.get_meta("t")
    assert meta is not None and meta.size == 5 and meta.ttl is not None and meta.ttl > 50
    tricky = b"\x00kvs\xffttl" + b"looks like a header"
    await storage.set_item_raw("m", tricky)
    assert await storage.get_item_raw("m") == tricky
    assert (await storage.get_meta("m")) is not None
    assert (await driver.head("m")).expires_at is None  # type: ignore[union-attr]
    await storage.set_item_raw("t", b"plain again")
    assert (base / "t").read_bytes() == b"plain again"


async def test_a_key_and_keys_below_it_coexist(storage: Storage, base: Path) -> None:
    await storage.set_item("a", 1)
    await storage.set_item("a:b", 2)
    await storage.set_item("a:b:c", 3)
    assert [await storage.get_item(k) for k in ("a", "a:b", "a:b:c")] == [1, 2, 3]
    assert _tree(base) == ["a", "a:", "a:/b", "a:/b:", "a:/b:/c"]
    assert await storage.remove_item("a")
    assert await storage.get_item("a:b") == 2
    assert sorted(await storage.get_keys()) == ["a:b", "a:b:c"]


async def test_long_and_unicode_segments(storage: Storage, base: Path) -> None:
    long_key = "k" * 1024
    wide_key = "żółw🐢" * 60 + ":x"  # 660 bytes in the first segment, cut between characters
    await storage.set_item(long_key, 1)
    await storage.set_item(wide_key, 2)
    await storage.set_item("..a:?b:.c", 3)
    assert await storage.get_item(long_key) == 1
    assert await storage.get_item(wide_key) == 2
    assert sorted(await storage.get_keys()) == sorted([long_key, wide_key, "..a:?b:.c"])
    assert await storage.get_keys(max_depth=0) == [long_key]
    assert all(len(os.fsencode(Path(path).name)) <= 255 for path in _tree(base))
    await storage.clear()
    assert _tree(base) == []


async def test_clear_and_remove_delete_empty_directories(storage: Storage, base: Path) -> None:
    await storage.set_items({"u:1:x": 1, "u:1:y": 2, "u:2:x": 3, "v": 4})
    await storage.clear("u:1")
    assert _tree(base) == ["u:", "u:/2:", "u:/2:/x", "v"]
    assert await storage.remove_item("u:2:x")
    assert _tree(base) == ["v"]
    await storage.set_item("w:deep:er:key", 5)
    await storage.clear()
    assert _tree(base) == []


async def test_base_directory_deleted_while_in_use(storage: Storage, base: Path) -> None:
    await storage.set_item("a:b", 1)
    shutil.rmtree(base)
    assert await storage.get_item("a:b") is None
    await storage.set_item("a:b", 2, if_absent=True)
    assert (base / "a:" / "b").read_bytes() == b"2"
    assert await storage.get_keys() == ["a:b"]


async def test_foreign_files_are_not_listed(storage: Storage, base: Path) -> None:
    await storage.set_item("k", 1)
    (base / "has:colon").write_bytes(b"x")
    (base / "back\\slash").write_bytes(b"x")
    (base / "plaindir").mkdir()
    (base / "plaindir" / "f").write_bytes(b"x")
    assert await storage.get_keys() == ["k"]


# -- temp files and sweeping -----------------------------------------------------------


async def test_temp_files_are_never_listed_and_stale_ones_are_swept(
    storage: Storage, driver: FSDriver, base: Path
) -> None:
    await storage.set_item("d:k", 1)
    fresh, stale = base / "d:" / ":tmp:fresh", base / "d:" / ":tmp:stale"
    fresh.write_bytes(b"half a val")
    stale.write_bytes(b"half a val")
    old = time.time() - driver.stale_temp_after - 10
    os.utime(stale, (old, old))
    assert await storage.get_keys() == ["d:k"]
    assert await storage.get_keys("d") == ["d:k"]
    await storage.set_item("e", 1, ttl=0.05)
    await anyio.sleep(0.1)  # let "e" expire; nothing to wait on
    assert await storage.sweep() == 1
    assert not stale.exists() and fresh.exists()
    assert _tree(base) == [":ttl", "d:", "d:/:tmp:fresh", "d:/k"]  # :ttl marks TTL files


async def test_ttl_markers_do_not_keep_directories_alive(storage: Storage, base: Path) -> None:
    await storage.set_item("s:a", 1, ttl=60)
    await storage.set_item("s:b", 1, ttl=0.05)
    await storage.set_item("p:x", 1)
    assert _tree(base) == ["p:", "p:/x", "s:", "s:/:ttl", "s:/a", "s:/b"]
    await anyio.sleep(0.1)  # let "s:b" expire; nothing to wait on
    assert sorted(await storage.get_keys()) == ["p:x", "s:a"]
    assert await storage.sweep() == 1
    assert await storage.remove_item("s:a")
    assert _tree(base) == ["p:", "p:/x", "s:", "s:/:ttl"]  # remove only drops empty dirs
    await storage.sweep()
    assert _tree(base) == ["p:", "p:/x"]
    await storage.set_item("q:r:s", 1, ttl=60)
    await storage.clear("q")
    assert _tree(base) == ["p:", "p:/x"]


async def test_ttl_survives_a_new_driver_instance(base: Path) -> None:
    first = create_storage(FSDriver(base))
    await first.set_item("long", "kept", ttl=60)
    await first.set_item("short", "gone", ttl=0.2)
    etag = (await first.get_meta("long")).etag  # type: ignore[union-attr]
    await first.dispose()
    second = create_storage(FSDriver(base))
    meta = await second.get_meta("long")
    assert meta is not None and meta.etag == etag and meta.ttl is not None and 50 < meta.ttl <= 60
    assert await second.get_item("long") == "kept"
    deadline = time.time() + 5
    while await second.has_item("short"):
        assert time.time() < deadline
        await anyio.sleep(0.02)
    assert await second.get_keys() == ["long"]
    await second.dispose()


# -- safety ----------------------------------------------------------------------------


async def test_symlinks_never_lead_outside_base(
    storage: Storage, driver: FSDriver, base: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret"
    secret.write_bytes(b'"secret"')
    await storage.set_item("init", 1)
    (base / "leak").symlink_to(secret)
    (base / "dir:").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DriverError, match="symbolic link"):
        await storage.get_item("leak")
    with pytest.raises(DriverError, match="symbolic link"):
        await storage.get_item("dir:secret")
    with pytest.raises(DriverError, match="symbolic link"):
        await storage.set_item("dir:new", 1)
    with pytest.raises(DriverError, match="symbolic link"):
        await storage.remove_item("dir:secret")
    assert sorted(await storage.get_keys()) == ["init"]
    await storage.clear()
    await storage.set_item("leak", "replaced")  # replaces the link itself, not its target
    assert secret.read_bytes() == b'"secret"'
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert not (base / "leak").is_symlink()


@pytest.mark.parametrize("key", ["..", "a:..", ".", "a/b", "", "a::b", "x\x00"])
async def test_driver_rejects_path_like_keys(driver: FSDriver, key: str) -> None:
    with pytest.raises(InvalidKeyError):
        await driver.set(key, b"x")
    with pytest.raises(InvalidKeyError):
        await driver.get(key)


async def test_read_only(base: Path) -> None:
    writer = create_storage(FSDriver(base))
    await writer.set_item("k", 1)
    await writer.dispose()
    driver = FSDriver(base, read_only=True)
    store = create_storage(driver)
    assert await store.get_item("k") == 1
    assert await store.get_keys() == ["k"]
    for write in (
        driver.set("k", b"2"),
        driver.set_many([("k", b"2")]),
        driver.remove("k"),
        driver.remove_many(["k"]),
        driver.clear(),
        driver.touch("k", expires_at=None),
        driver.sweep(),
    ):
        with pytest.raises(ReadOnlyError):
            await write
    with pytest.raises(ReadOnlyError):
        await store.set_item("k", 3)
    assert await store.get_item("k") == 1
    await store.dispose()
    missing = FSDriver(base.parent / "missing", read_only=True)
    assert await missing.get("k") is None
    assert [key async for key in missing.scan()] == []
    assert not (base.parent / "missing").exists()  # reading creates nothing


def test_from_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absolute = from_url(f"file://{tmp_path}/abs")
    assert isinstance(absolute, FSDriver) and absolute.base == str(tmp_path / "abs")
    monkeypatch.chdir(tmp_path)
    relative = from_url("file://./rel/dir?read_only=1")
    assert isinstance(relative, FSDriver) and relative.base == str(tmp_path / "rel" / "dir")
    assert relative.read_only and not relative.fsync
    assert from_url("file:///x%20y?fsync=true").fsync  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        FSDriver.from_url("file://")


async def test_fsync_mode_writes_normally(base: Path) -> None:
    store = create_storage(FSDriver(base, fsync=True))
    await store.set_item("k", [1], ttl=60)
    await store.set_items({"a": 1, "b": 2})
    assert await store.get_items(["k", "a", "b"]) == {"k": [1], "a": 1, "b": 2}
    await store.dispose()


async def test_conditions_between_two_driver_instances(base: Path) -> None:
    one, two = create_storage(FSDriver(base)), create_storage(FSDriver(base))
    await one.set_item("k", 1)
    entry = await two.get_entry("k")
    assert entry is not None
    await one.set_item("k", 2)
    with pytest.raises(ConditionFailedError):
        await two.set_item("k", 3, if_match=entry.etag)
    with pytest.raises(ConditionFailedError):
        await two.set_item("k", 3, if_absent=True)
    assert await two.get_item("k") == 2
    await one.dispose()
    await two.dispose()


# -- watching --------------------------------------------------------------------------


async def test_watch_sees_other_writers_and_new_directories(storage: Storage, base: Path) -> None:
    events: list[tuple[str, str]] = []
    unwatch = await storage.watch(lambda event, key: events.append((event, key)))
    other = create_storage(FSDriver(base))  # another writer, as another process would be
    keys = [f"n{i}:deep{i}:k" for i in range(100)]
    for key in keys:
        await other.set_item(key, 1, ttl=60)
    (base / "tool").write_bytes(b'"from a tool"')

    async def seen(*expected: tuple[str, str]) -> bool:
        return all(event in events for event in expected)

    await eventually(lambda: seen(*[("update", key) for key in keys], ("update", "tool")))
    await other.clear("n1")
    (base / "tool").unlink()
    await eventually(lambda: seen(("remove", "n1:deep1:k"), ("remove", "tool")))
    assert {key for _, key in events} <= {*keys, "tool"}  # no temp files, markers, dirs
    await unwatch()
    count = len(events)
    await other.set_item("after", 1)
    await storage.set_item("after", 2)
    assert await storage.get_item("after") == 2
    assert events[count:] == []
    await other.dispose()


# -- real processes --------------------------------------------------------------------

_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

_OVERWRITER = textwrap.dedent(
    """
    import os, sys, anyio
    from kvstorage.drivers import FSDriver

    A, B = b"A" * 2**20, b"B" * 2**20

    async def main():
        driver = FSDriver(sys.argv[1])
        await driver.set("k", A)
        print("writing", flush=True)
        while True:
            await driver.set("k", B, expires_at=4e9)
            await driver.set("k", A)

    anyio.run(main)
    """
)


async def _keys(driver: FSDriver) -> list[str]:
    return [key async for key in driver.scan()]


def _wait_for_line(proc: subprocess.Popen[str], expected: str, within: float = 30.0) -> None:
    """Wait (bounded) until the child prints ``expected``."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(within):
            proc.kill()
            raise AssertionError(f"child did not print {expected!r} within {within} s")
    line = proc.stdout.readline().strip()
    if line != expected:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"child printed {line!r} instead of {expected!r}; stderr:\n{err}")


@pytest.mark.slow
def test_a_killed_writer_never_leaves_a_torn_value(base: Path) -> None:
    script = base.parent / "overwriter.py"
    script.write_text(_OVERWRITER)
    expected = {b"A" * 2**20, b"B" * 2**20}
    reader = FSDriver(base)
    for _ in range(20):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(base)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_ENV,
        )
        try:
            _wait_for_line(proc, "writing")
            kill_at = time.monotonic() + random.uniform(0, 0.05)  # the random kill moment
            while time.monotonic() < kill_at:  # meanwhile, read while it writes
                record = anyio.run(reader.get, "k")
                assert record is not None and record.value in expected
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        record = anyio.run(reader.get, "k")
        assert record is not None and record.value in expected
        assert anyio.run(_keys, reader) == ["k"]  # leftover temp files are not keys
        reliability.record("faults", "fs: SIGKILL during 1 MiB overwrites", kills=1, intact=1)
    reader.stale_temp_after = 0.0
    anyio.run(reader.sweep)
    assert sorted(p.name for p in base.iterdir()) == [":locks", ":ttl", "k"]
    anyio.run(reader.dispose)


@pytest.mark.slow
def test_two_processes_increment_exactly(base: Path) -> None:
    anyio.run(run_counters, f"file://{base}", 200)
    driver = FSDriver(base)
    record = anyio.run(driver.get, "counter")
    anyio.run(driver.dispose)
    assert record is not None and record.value == b"400"
