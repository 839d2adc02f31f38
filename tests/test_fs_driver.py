"""FSDriver-specific behaviour: the file layout, path safety, read-only mode, TTL across
instances, temp files, and crash/multi-process safety with real child processes."""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
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
from kvstorage.drivers.fs import _driver as fs_driver_module
from kvstorage.drivers.fs import _worker
from kvstorage.drivers.fs._driver import _temp_name
from kvstorage.drivers.fs._worker import WORKERS, _Inbox

from .support import reliability
from .support.children import run_counters
from .support.helpers import ROOT, eventually

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@pytest.fixture
def asyncio_only(anyio_backend: str) -> None:
    """Skip on trio: the worker threads (and calls run on the loop) serve asyncio; trio
    takes one plain thread hop per call."""
    if anyio_backend != "asyncio":
        pytest.skip("the worker threads serve asyncio")


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


_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


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
    assert (base / "users" / "42").read_bytes() == b'{"name":"Ada"}'
    assert (base / "blob").read_bytes() == bytes(range(256))
    (base / "users" / "7").write_bytes(b'"written by another tool"')
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
    assert _tree(base) == ["a", "a/:value", "a/b", "a/b/:value", "a/b/c"]
    assert await storage.remove_item("a")
    assert await storage.get_item("a:b") == 2
    assert sorted(await storage.get_keys()) == ["a:b", "a:b:c"]
    assert _tree(base) == ["a", "a/b", "a/b/:value", "a/b/c"]


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
    assert _tree(base) == ["u", "u/2", "u/2/x", "v"]
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
    assert (base / "a" / "b").read_bytes() == b"2"
    assert await storage.get_keys() == ["a:b"]


async def test_names_no_key_can_have_are_not_listed(storage: Storage, base: Path) -> None:
    await storage.set_item("k", 1)
    (base / "has:colon").write_bytes(b"x")
    (base / "back\\slash").write_bytes(b"x")
    (base / ":own").write_bytes(b"x")
    (base / "plaindir").mkdir()
    (base / "plaindir" / "f").write_bytes(b"x")
    assert sorted(await storage.get_keys()) == ["k", "plaindir:f"]


async def test_a_tree_made_by_other_tools_lists_and_reads_back(
    storage: Storage, base: Path
) -> None:
    os.makedirs(base / "docs" / "guides")
    (base / "docs" / "readme.txt").write_bytes(b"Read me.\n")
    (base / "docs" / "guides" / "setup.md").write_bytes(b"# Setup\n")
    (base / "content" / "posts" / "2024").mkdir(parents=True)
    blob = bytes(range(256)) * 3
    (base / "content" / "posts" / "2024" / "hello.bin").write_bytes(blob)
    (base / "top.json").write_text('{"a": 1}')
    everything = ["content:posts:2024:hello.bin", "docs:guides:setup.md", "docs:readme.txt"]
    assert sorted(await storage.get_keys()) == [*everything, "top.json"]
    assert sorted(await storage.get_keys("docs")) == everything[1:]
    assert sorted(await storage.get_keys(max_depth=1)) == ["docs:readme.txt", "top.json"]
    assert await storage.get_item_raw("docs:readme.txt") == b"Read me.\n"
    assert await storage.get_item_raw("content:posts:2024:hello.bin") == blob
    assert await storage.get_item("top.json") == {"a": 1}
    await storage.set_item_raw("docs:readme.txt", b"Changed.")
    assert (base / "docs" / "readme.txt").read_bytes() == b"Changed."
    await storage.clear("content")
    assert not (base / "content").exists()
    assert sorted(await storage.get_keys()) == [*everything[1:], "top.json"]


@pytest.mark.parametrize("first", ["parent", "child"])
async def test_a_key_and_a_directory_of_the_same_name_in_either_order(
    storage: Storage, base: Path, first: str
) -> None:
    writes = [("a", "parent"), ("a:b", "child")]
    for key, value in writes if first == "parent" else writes[::-1]:
        await storage.set_item(key, value)
    assert await storage.get_items(["a", "a:b"]) == {"a": "parent", "a:b": "child"}
    assert (base / "a" / ":value").read_bytes() == b'"parent"'
    assert (base / "a" / "b").read_bytes() == b'"child"'
    assert sorted(await storage.get_keys()) == ["a", "a:b"]
    assert await storage.get_keys("a") == ["a:b"]
    assert await storage.get_keys(max_depth=0) == ["a"]
    etag = (await storage.get_meta("a")).etag  # type: ignore[union-attr]
    await storage.set_item("a", "again", if_match=etag)
    assert await storage.get_item("a") == "again"
    assert await storage.remove_item("a:b")
    assert await storage.get_item("a") == "again"
    assert await storage.remove_item("a")
    assert _tree(base) == []


async def test_a_value_moving_into_its_directory_never_disappears(
    driver: FSDriver, base: Path
) -> None:
    misses = 0

    async def read(key: str, done: anyio.Event) -> None:
        nonlocal misses
        while not done.is_set():
            misses += await driver.get(key) is None
            await anyio.lowlevel.checkpoint()

    for round_ in range(40):
        key = f"k{round_}"
        await driver.set(key, b"v")
        done = anyio.Event()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(read, key, done)
            tasks.start_soon(read, key, done)
            await driver.set(f"{key}:child", b"c")
            await driver.set(f"{key}:other", b"c")
            done.set()
        assert (base / key / ":value").read_bytes() == b"v"
    assert misses == 0


# -- temp files and sweeping -----------------------------------------------------------


async def test_temp_files_are_never_listed_and_stale_ones_are_swept(
    storage: Storage, driver: FSDriver, base: Path
) -> None:
    await storage.set_item("d:k", 1)
    fresh, stale = base / "d" / ":tmp:fresh", base / "d" / ":tmp:stale"
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
    assert _tree(base) == [":ttl", "d", "d/:tmp:fresh", "d/k"]  # :ttl marks TTL files


async def test_a_write_finds_its_temp_name_taken(
    storage: Storage, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await storage.set_item("d:a", 1)
    monkeypatch.setattr(_temp_name, "_prefix", ":tmp:same-")
    monkeypatch.setattr(_temp_name, "_numbers", itertools.count())
    (base / "d" / ":tmp:same-0").write_bytes(b"left by a killed process")
    await storage.set_item("d:a", 2)
    assert await storage.get_item("d:a") == 2
    assert (base / "d" / ":tmp:same-0").read_bytes() == b"left by a killed process"
    await storage.set_item("d:a", 3)  # the next name is free again
    assert _tree(base) == ["d", "d/:tmp:same-0", "d/a"]


async def test_ttl_markers_do_not_keep_directories_alive(storage: Storage, base: Path) -> None:
    await storage.set_item("s:a", 1, ttl=60)
    await storage.set_item("s:b", 1, ttl=0.05)
    await storage.set_item("p:x", 1)
    assert _tree(base) == ["p", "p/x", "s", "s/:ttl", "s/a", "s/b"]
    await anyio.sleep(0.1)  # let "s:b" expire; nothing to wait on
    assert sorted(await storage.get_keys()) == ["p:x", "s:a"]
    assert await storage.sweep() == 1
    assert await storage.remove_item("s:a")
    assert _tree(base) == ["p", "p/x", "s", "s/:ttl"]  # remove only drops empty dirs
    await storage.sweep()
    assert _tree(base) == ["p", "p/x"]
    await storage.set_item("q:r:s", 1, ttl=60)
    await storage.clear("q")
    assert _tree(base) == ["p", "p/x"]


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
    (base / "dir").symlink_to(outside, target_is_directory=True)
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


async def test_nested_reads_refuse_what_top_level_reads_refuse(
    storage: Storage, base: Path, tmp_path: Path
) -> None:
    # Reads below the top level open the file in one call where the system can (openat2).
    await storage.set_item("d:a", "a")
    await storage.set_item("d:a:b", "b")  # d/a becomes a directory holding d/a/:value
    assert await storage.get_item("d:a") == "a"
    meta = await storage.get_meta("d:a")
    assert meta is not None and meta.size == 3
    (tmp_path / "secret").write_bytes(b'"secret"')
    (base / "d" / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(DriverError, match="symbolic link"):
        await storage.get_item("d:link")
    os.mkfifo(base / "d" / "fifo")
    with pytest.raises(DriverError, match="not a regular file"):
        await storage.get_item("d:fifo")
    assert await storage.get_item("d:a:b:c") is None  # d/a/b is a file
    assert await storage.get_item("d:missing:x") is None


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


@pytest.mark.parametrize("umask", [0, 0o022])
async def test_files_are_private_to_their_owner_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    old = os.umask(umask)
    try:
        base = tmp_path / "new" / "data"
        store = create_storage(FSDriver(base))
        await store.set_item("a:b:c", 1)
        await store.set_item("a", 1)
        await store.set_item("t:x", 1, ttl=60)
        await store.dispose()
    finally:
        os.umask(old)
    modes = {
        str(path.relative_to(tmp_path)): path.stat().st_mode & 0o777
        for path in [tmp_path / "new", base, *base.rglob("*")]
    }
    assert ":locks" in "".join(modes) and "t/:ttl" in "".join(modes)
    for path, mode in modes.items():
        is_dir = (tmp_path / path).is_dir()
        assert mode == (0o700 if is_dir else 0o600), f"{path}: {mode:o}"


async def test_file_and_dir_modes_are_exact_under_a_strict_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        driver = FSDriver(tmp_path / "shared", file_mode=0o640, dir_mode=0o750)
        await driver.set("g:k", b"1")
        await driver.dispose()
    finally:
        os.umask(old)
    assert (tmp_path / "shared" / "g").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "shared" / "g" / "k").stat().st_mode & 0o777 == 0o640
    assert "dir_mode=0o750" in repr(driver) and "file_mode=0o640" in repr(driver)
    with pytest.raises(ValueError, match="file_mode"):
        FSDriver(tmp_path, file_mode=0o10000)


_PLANTED = textwrap.dedent(
    """
    import os, sys, anyio
    from kvstorage import DriverError
    from kvstorage.drivers import FSDriver

    async def main(base, where):
        driver = FSDriver(base)
        if where == "key":
            os.makedirs(base, exist_ok=True)
            os.mkfifo(os.path.join(base, "k"))
            calls = [driver.get("k"), driver.set("k", b"v", if_absent=True), driver.remove("k")]
        elif where == "lock":
            os.makedirs(os.path.join(base, ":locks"))
            for stripe in range(64):
                os.mkfifo(os.path.join(base, ":locks", f"{stripe:02x}"))
            calls = [driver.set("k", b"v")]
        else:
            os.makedirs(os.path.join(base, "d"))
            os.mkfifo(os.path.join(base, "d", ":ttl"))
            calls = [driver.set("d:k", b"v", expires_at=4e9)]
        for call in calls:
            try:
                await call
            except DriverError as exc:
                print("refused:", exc)
            else:
                print("accepted")

    anyio.run(main, sys.argv[1], sys.argv[2])
    """
)


@pytest.mark.parametrize("where", ["key", "lock", "ttl-marker"])
def test_a_planted_fifo_is_an_error_never_a_hang(tmp_path: Path, where: str) -> None:
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PLANTED, str(tmp_path / "data"), where],
            capture_output=True,
            text=True,
            timeout=30,
            env=_ENV,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"an FSDriver call hung on a FIFO planted at the {where}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    if where == "ttl-marker":  # the marker only has to exist: the write may go through
        assert lines in (["accepted"], [line for line in lines if "not a regular file" in line])
    else:
        assert lines and all("not a regular file" in line for line in lines), lines


_DEEP = textwrap.dedent(
    """
    import resource, sys, anyio
    from kvstorage import create_storage
    from kvstorage.drivers import FSDriver

    async def main(base):
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
        store = create_storage(FSDriver(base))
        keys = [":".join([str(worker)] + ["s"] * 499) for worker in range(4)]

        async def work(key):
            await store.set_item(key, key[:1])
            await store.set_item(key.rsplit(":", 1)[0] + ":t", 1, ttl=60)
            assert await store.get_item(key) == key[:1]

        async with anyio.create_task_group() as tasks:
            for key in keys:
                tasks.start_soon(work, key)
        assert sorted(await store.get_keys()) == sorted(
            [*keys, *(key.rsplit(":", 1)[0] + ":t" for key in keys)]
        )
        async with anyio.create_task_group() as tasks:
            for key in keys:
                tasks.start_soon(store.remove_item, key)
        await store.clear()
        assert await store.get_keys() == []
        print("ok")

    anyio.run(main, sys.argv[1])
    """
)


def test_deep_keys_hold_few_descriptors(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _DEEP, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=120,
        env=_ENV,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    assert not any((tmp_path / "data").iterdir()) or [
        p.name for p in (tmp_path / "data").iterdir()
    ] == [":locks"]


def test_from_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absolute = from_url(f"file://{tmp_path}/abs")
    assert isinstance(absolute, FSDriver) and absolute.base == str(tmp_path / "abs")
    monkeypatch.chdir(tmp_path)
    relative = from_url("file://./rel/dir?read_only=1")
    assert isinstance(relative, FSDriver) and relative.base == str(tmp_path / "rel" / "dir")
    assert relative.read_only and not relative.fsync
    assert from_url("file:///x%20y?fsync=true").fsync  # type: ignore[attr-defined]
    moded = from_url("file:///x?file_mode=0640&dir_mode=0750")
    assert moded.file_mode == 0o640 and moded.dir_mode == 0o750  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="octal"):
        FSDriver.from_url("file:///x?file_mode=rw")
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


# -- worker threads --------------------------------------------------------------------


def test_fs_runs_on_trio_too() -> None:
    assert not FSDriver.capabilities.asyncio_only


@pytest.mark.usefixtures("asyncio_only")
async def test_concurrent_reads_wake_the_loop_a_few_times_not_per_read(
    storage: Storage, driver: FSDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver._inline.needed = 10**9  # every call in a worker, however fast
    keys = [f"k:{i}" for i in range(100)]
    await storage.set_items([(key, i) for i, key in enumerate(keys)])
    wakeups = 0
    real = _Inbox._wake

    def counting(inbox: _Inbox) -> bool:
        nonlocal wakeups
        wakeups += 1
        return real(inbox)

    monkeypatch.setattr(_Inbox, "_wake", counting)
    got = await asyncio.gather(*(storage.get_item(key) for key in keys))
    assert got == list(range(100))
    assert 1 <= wakeups <= 25, f"{wakeups} loop wake-ups for 100 reads"
    wakeups = 0
    for key in keys[:10]:  # one at a time: each call wakes the loop once
        await storage.get_item(key)
    assert wakeups == 10


@pytest.mark.usefixtures("asyncio_only")
async def test_a_delivered_result_resumes_its_caller_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    order: list[str] = []
    real = _Inbox._deliver

    def delivering(inbox: _Inbox) -> None:
        order.append("delivering")
        real(inbox)
        order.append("delivered")

    monkeypatch.setattr(_Inbox, "_deliver", delivering)
    for _ in range(3):
        assert await WORKERS.run(int, "7") == 7
        order.append("resumed")
    with pytest.raises(ValueError):
        await WORKERS.run(int, "x")
    order.append("raised")
    await asyncio.sleep(0)  # (still within the last delivery until here)
    # the caller runs within the delivery, not one loop iteration later
    assert order == ["delivering", "resumed", "delivered"] * 3 + [
        "delivering",
        "raised",
        "delivered",
    ]


class _FakeClock:
    """The workers' clock, moved on only by the calls it times (so what runs where does
    not depend on the machine's speed)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 0.0
        monkeypatch.setattr(_worker, "_clock", lambda: self.now)


def _proven_fast(driver: FSDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Have the driver's short calls run on the loop from now on, however long they take
    on a loaded machine (the workers' clock stands still)."""
    _FakeClock(monkeypatch)
    driver._inline.fast = driver._inline.needed


def _where_calls_run(
    driver: FSDriver, clock: _FakeClock, cost: list[float], *, in_workers_too: bool = True
) -> list[str]:
    """Make the driver's reads take ``cost[0]`` seconds of ``clock`` (those in workers
    too, unless not ``in_workers_too``); return the list of where each one ran ("loop"
    or "worker")."""
    places: list[str] = []
    loop_thread = threading.get_ident()
    real = driver._get

    def get(key: str) -> Any:
        here = threading.get_ident() == loop_thread
        places.append("loop" if here else "worker")
        if here or in_workers_too:
            clock.now += cost[0]
        return real(key)

    driver._get = get  # type: ignore[method-assign]
    return places


@pytest.mark.usefixtures("asyncio_only")
async def test_reads_that_prove_fast_run_on_the_loop_until_one_is_slow(
    storage: Storage, driver: FSDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    await storage.set_item("k", 1)
    clock, cost = _FakeClock(monkeypatch), [20e-6]
    places = _where_calls_run(driver, clock, cost)
    for _ in range(20):
        assert await storage.get_item("k") == 1
    assert places == ["worker"] * 16 + ["loop"] * 4  # 16 fast ones in a row first
    places.clear()
    cost[0] = 2e-3  # a slow disk: this one holds the loop, and it is the last one
    assert await storage.get_item("k") == 1
    cost[0] = 20e-6
    for _ in range(40):
        assert await storage.get_item("k") == 1
    # twice as many fast ones in a row are needed after a slow call on the loop
    assert places == ["loop"] + ["worker"] * 32 + ["loop"] * 8
    places.clear()
    cost[0] = 2e-3  # slow on the loop again: 64 fast ones in a row are needed now
    for _ in range(11):  # the 10 after it are slow in workers: each starts the run over
        await storage.get_item("k")
    cost[0] = 20e-6
    for _ in range(65):
        await storage.get_item("k")
    assert places == ["loop"] + ["worker"] * 10 + ["worker"] * 64 + ["loop"]


@pytest.mark.usefixtures("asyncio_only")
async def test_calls_on_the_loop_leave_each_loop_iteration_after_half_a_millisecond(
    storage: Storage, driver: FSDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    await storage.set_item("k", 1)
    monkeypatch.setattr(_worker, "_WINDOW", 0.5e-3)
    clock, cost = _FakeClock(monkeypatch), [1e-6]
    places = _where_calls_run(driver, clock, cost, in_workers_too=False)
    for _ in range(16):
        await storage.get_item("k")
    await asyncio.sleep(0)
    cost[0] = 100e-6
    order: list[str] = []
    asyncio.get_running_loop().call_soon(order.append, "the loop's other work")
    for _ in range(12):
        await storage.get_item("k")
        order.append("read")
    # 5 x 0.1 ms fill one iteration's 0.5 ms; the next read waits for the next iteration
    assert order == ["read"] * 5 + ["the loop's other work"] + ["read"] * 7
    assert places[16:] == ["loop"] * 12
    places.clear()
    await asyncio.sleep(0)
    # 30 at once: 5 in this iteration, 4 wait for the next one, the others go to workers
    assert await asyncio.gather(*(storage.get_item("k") for _ in range(30))) == [1] * 30
    assert places.count("loop") == 9
    assert places.count("worker") == 21


@pytest.mark.usefixtures("asyncio_only")
async def test_a_remove_on_the_loop_leaves_pruning_to_a_worker(
    storage: Storage,
    driver: FSDriver,
    base: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await storage.set_items([("a:b:c", 1), ("a:b:d", 1), ("e:f", 1)])
    _proven_fast(driver, monkeypatch)
    loop_thread = threading.get_ident()
    real, threads = driver._remove, set()

    def remove(key: str) -> bool:
        threads.add(threading.get_ident())
        return real(key)

    driver._remove = remove  # type: ignore[method-assign]
    assert await storage.remove_item("a:b:c")
    assert await storage.remove_item("a:b:d")
    assert await storage.remove_item("e:f")
    assert threads == {loop_thread}
    # removing a directory emptied of many files can take milliseconds: not on the loop
    assert _tree(base) == ["a", "a/b", "e"]
    await storage.set_item("x", 1)  # the next call in a worker prunes them
    assert _tree(base) == ["x"]
    assert await storage.remove_item("x")
    await storage.set_item("g:h", 1)
    assert await storage.remove_item("g:h")
    assert _tree(base) == ["g"]
    await driver.dispose()  # and so does dispose
    assert _tree(base) == []


@pytest.mark.usefixtures("asyncio_only")
async def test_pruning_left_by_removes_on_the_loop_is_bounded_and_follows_no_link(
    storage: Storage,
    driver: FSDriver,
    base: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fs_driver_module, "_PENDING_PRUNES", 2)
    await storage.set_items([("a:k", 1), ("b:k", 1), ("c:k", 1), ("d:k", 1)])
    _proven_fast(driver, monkeypatch)
    assert await storage.remove_item("a:k")
    assert await storage.remove_item("b:k")
    assert _tree(base) == ["a", "b", "c", "c/k", "d", "d/k"]  # two left for a worker
    assert await storage.remove_item("c:k")  # the third goes to a thread: it prunes all
    assert _tree(base) == ["d", "d/k"]
    assert await storage.remove_item("d:k")
    assert _tree(base) == ["d"]
    # a link put where the directory was, before the next write prunes: left alone
    outside = tmp_path / "outside"
    (outside / "empty").mkdir(parents=True)
    os.rmdir(base / "d")
    os.symlink(outside, base / "d")
    await storage.set_item("x", 1)
    assert (outside / "empty").is_dir()
    assert (base / "d").is_symlink()
    assert await storage.get_item("x") == 1


@pytest.mark.usefixtures("asyncio_only")
async def test_a_call_on_the_loop_never_waits_for_a_lock(
    storage: Storage,
    driver: FSDriver,
    base: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await storage.set_item("k", 0)
    _proven_fast(driver, monkeypatch)  # removes run on the loop
    stripe = zlib.crc32(b"k") % 64
    held = os.open(base / ":locks" / f"{stripe:02x}", os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # as another process would
    once = threading.Lock()

    def release() -> None:
        if once.acquire(blocking=False):
            os.close(held)

    timer = threading.Timer(5, release)  # (a loop blocked in flock wakes up)
    timer.start()
    ticks = 0
    try:
        async with anyio.create_task_group() as tasks:
            removed: list[bool] = []

            async def remove() -> None:
                removed.append(await storage.remove_item("k"))

            tasks.start_soon(remove)
            for _ in range(20):  # the loop turns while the remove waits in a thread
                await asyncio.sleep(0.001)
                ticks += 1
            assert not removed
            release()
    finally:
        timer.cancel()
    assert removed == [True]
    assert ticks == 20
    assert await storage.get_item("k") is None


async def test_a_cancelled_caller_leaves_the_rest_of_its_batch_alone(
    storage: Storage, base: Path
) -> None:
    keys = [f"k:{i}" for i in range(40)]
    await storage.set_items([(key, "old") for key in keys])
    results: dict[str, Any] = {}

    async def write(key: str) -> None:
        await storage.set_item(key, "new")
        results[key] = await storage.get_item(key)

    for victim in (0, 13, 39):
        results.clear()
        async with anyio.create_task_group() as tasks:
            scopes = []
            for key in keys:
                scope = anyio.CancelScope()
                scopes.append(scope)

                async def guarded(key: str = key, scope: anyio.CancelScope = scope) -> None:
                    with scope:
                        await write(key)

                tasks.start_soon(guarded)
            await anyio.lowlevel.checkpoint()
            scopes[victim].cancel()
        others = [key for i, key in enumerate(keys) if i != victim]
        assert results == {key: "new" for key in others if key in results}
        assert set(results) >= set(others)
        assert await storage.get_item(keys[victim]) in ("old", "new")  # all or nothing
        assert not [path for path in _tree(base) if ":tmp:" in path]
        await storage.set_items([(key, "old") for key in keys])
    with anyio.fail_after(5):  # nothing is left stuck
        assert await storage.get_item(keys[0]) == "old"


@pytest.mark.usefixtures("asyncio_only")
async def test_workers_drop_calls_cancelled_before_they_start() -> None:
    release = threading.Event()
    ran: list[str] = []
    async with anyio.create_task_group() as tasks:
        for _ in range(WORKERS.count):  # every worker waits
            tasks.start_soon(WORKERS.run, release.wait, 5)
        await anyio.lowlevel.checkpoint()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await WORKERS.run(ran.append, "cancelled")
        release.set()
    await WORKERS.run(ran.append, "later")  # queued behind the cancelled one
    assert ran == ["later"]


async def test_a_slow_call_does_not_hold_up_the_next(anyio_backend: str) -> None:
    started, release, done = threading.Event(), threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        release.wait(60)
        done.set()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(WORKERS.run, slow)
        assert await anyio.to_thread.run_sync(started.wait, 5)
        try:
            with anyio.fail_after(30):  # (held up, it would wait for the slow call's 60 s)
                assert await WORKERS.run(int, "7") == 7
            assert not done.is_set()  # served while the slow call still ran
        finally:
            release.set()


async def test_a_cancelled_caller_waits_for_its_running_call(anyio_backend: str) -> None:
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def call() -> None:
        started.set()
        release.wait(5)
        order.append("call done")

    async def caller() -> None:
        try:
            await WORKERS.run(call)
        finally:
            order.append("caller left")

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(caller)
        assert await anyio.to_thread.run_sync(started.wait, 5)
        tasks.cancel_scope.cancel()
        for _ in range(10):  # the caller would leave now if it did not wait
            await anyio.lowlevel.cancel_shielded_checkpoint()
        release.set()
    assert order == ["call done", "caller left"]


async def test_a_lock_held_elsewhere_stalls_only_its_key(
    storage: Storage, driver: FSDriver, base: Path
) -> None:
    await storage.set_item("k", 0)
    stripe = zlib.crc32(b"k") % 64
    held = os.open(base / ":locks" / f"{stripe:02x}", os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # as another process would
        async with anyio.create_task_group() as tasks:
            done: list[int] = []

            async def write(value: int) -> None:
                await storage.set_item("k", value)
                done.append(value)

            for value in range(1, 4):  # more writers than worker threads
                tasks.start_soon(write, value)
            await anyio.lowlevel.checkpoint()
            try:
                with anyio.fail_after(5):
                    for key in [f"o:{i}" for i in range(20)]:
                        if zlib.crc32(key.encode()) % 64 != stripe:
                            await storage.set_item(key, key)
                            assert await storage.get_item(key) == key
                assert done == []
            finally:
                fcntl.flock(held, fcntl.LOCK_UN)
    finally:
        os.close(held)
    assert sorted(done) == [1, 2, 3]
    assert await storage.get_item("k") in (1, 2, 3)


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
