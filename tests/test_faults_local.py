"""Local faults on the fs and sqlite drivers, in real child processes: a full disk (a
lowered ``RLIMIT_FSIZE``) and SIGKILL in the middle of ``set_items`` batches.

What is promised: a failed write raises ``DriverError`` and leaves the previous value;
after a kill every key holds its old or its new value, never a torn one. A batch is one
transaction on sqlite (all keys from the same generation); on fs it is atomic per key
only, so a kill may leave some keys of a batch old and others new.
"""

from __future__ import annotations

import contextlib
import random
import signal
import sqlite3
import textwrap
from pathlib import Path

import anyio
import pytest

from kvstorage import Driver, create_storage
from kvstorage.drivers import FSDriver, SQLiteDriver

from .support import reliability
from .support.children import read_lines, spawn

pytestmark = pytest.mark.anyio

DRIVERS = ["fs", "sqlite"]

#: Opens the driver named by argv[1] at the path argv[2], in a child process.
_OPEN = """
import resource, signal, sys, anyio
from kvstorage import DriverError, create_storage
from kvstorage.drivers import FSDriver, SQLiteDriver

def open_driver():
    kind, path = sys.argv[1], sys.argv[2]
    return FSDriver(path) if kind == "fs" else SQLiteDriver(path)
"""

_FILLER = _OPEN + textwrap.dedent(
    """
    LIMIT = 64 * 1024

    async def attempt(write):
        try:
            await write
        except DriverError as exc:
            cause = exc.__cause__ or exc.__context__
            print(type(exc).__name__, type(cause).__name__, flush=True)
            print(str(exc), file=sys.stderr, flush=True)
        except BaseException as exc:
            print("not-a-DriverError", type(exc).__name__, flush=True)
        else:
            print("no-error", flush=True)

    async def main():
        store = create_storage(open_driver())
        await store.set_item_raw("k", b"small")
        await store.set_items({"b1": "old", "b2": "old", "b3": "old"})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))
        await attempt(store.set_item_raw("k", b"x" * 2**20))
        print((await store.get_item_raw("k")).decode(), flush=True)
        await attempt(store.set_items({"b1": "new", "b2": "x" * 2**20, "b3": "new"}))
        await store.set_item_raw("k2", b"fits")  # the store still works for small writes
        print((await store.get_item_raw("k2")).decode(), flush=True)
        await store.dispose()

    anyio.run(main)
    """
)

KEYS = 50
VALUE_SIZE = 20_000
KILLS = 24


def value(generation: str, i: int) -> str:
    """The value of key ``i`` in ``generation`` ("A" or "B"): distinct per key and
    generation, so a value from another key or a torn mix is recognized."""
    return f"{generation}{i:03d}" * (VALUE_SIZE // 4)


_BATCHER = _OPEN + textwrap.dedent(
    f"""
    KEYS, VALUE_SIZE = {KEYS}, {VALUE_SIZE}

    def batch(generation):
        return {{
            f"b:{{i}}": f"{{generation}}{{i:03d}}" * (VALUE_SIZE // 4)
            for i in range(KEYS)
        }}

    async def main():
        store = create_storage(open_driver())
        a, b = batch("A"), batch("B")
        if not await store.has_item("b:0"):
            await store.set_items(a)
        print("writing", flush=True)
        while True:
            await store.set_items(b)
            await store.set_items(a)

    anyio.run(main)
    """
)


def _open(kind: str, path: Path) -> Driver:
    return FSDriver(path) if kind == "fs" else SQLiteDriver(path)


def _path(kind: str, tmp_path: Path) -> Path:
    return tmp_path / ("data" if kind == "fs" else "kv.db")


def _integrity(path: Path) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("PRAGMA integrity_check").fetchall()


def _temp_files(base: Path) -> list[Path]:
    return [path for path in base.rglob("*") if path.name.startswith(":tmp:")]


# -- disk full ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DRIVERS)
async def test_a_write_beyond_the_file_size_limit_fails_cleanly(kind: str, tmp_path: Path) -> None:
    path = _path(kind, tmp_path)
    async with await spawn(_FILLER, kind, str(path)) as child:
        with anyio.fail_after(30):
            lines = await read_lines(child, 4)
            assert await child.wait() == 0
    error, after, batch_error, small = lines
    assert error.startswith("DriverError "), error  # then the cause, for the record
    assert after == "small"
    assert batch_error.startswith("DriverError "), batch_error
    assert small == "fits"  # the store still works for small writes
    store = create_storage(_open(kind, path))
    assert await store.get_item_raw("k") == b"small"
    batch = await store.get_items(["b1", "b2", "b3"])
    assert batch["b2"] == batch["b3"] == "old"  # the failed value, and the ones after it
    if kind == "sqlite":
        assert batch["b1"] == "old"  # one transaction: nothing of the batch was applied
    else:
        assert batch["b1"] in ("old", "new")  # per key: the value before the failure stays
    assert sorted(await store.get_keys()) == ["b1", "b2", "b3", "k", "k2"]
    await store.dispose()
    if kind == "fs":
        assert _temp_files(path) == []  # the half-written temp files were removed
    else:
        assert _integrity(path) == [("ok",)]
    reliability.record(
        "faults",
        f"{kind}: file size limit (RLIMIT_FSIZE 64 KiB), 1 MiB set and set_items",
        injected=2,
        intact=2,
        error=" from ".join(error.split()),
        atomicity="per key (failed batch partly applied)" if batch["b1"] == "new" else "batch",
    )


# -- SIGKILL during batches --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", DRIVERS)
async def test_sigkill_during_set_items_leaves_each_key_old_or_new(
    kind: str, tmp_path: Path
) -> None:
    path = _path(kind, tmp_path)
    generations = {value(g, i): g for g in "AB" for i in range(KEYS)}
    kills = mixed = 0
    for _ in range(KILLS):
        async with await spawn(_BATCHER, kind, str(path)) as child:
            with anyio.fail_after(30):
                await read_lines(child, 1)
            await anyio.sleep(random.uniform(0, 0.05))  # kill at a random moment
            child.send_signal(signal.SIGKILL)
            with anyio.fail_after(10):
                assert await child.wait() == -signal.SIGKILL
        kills += 1
        store = create_storage(_open(kind, path))
        keys = [f"b:{i}" for i in range(KEYS)]
        values = await store.get_items(keys)
        seen = set()
        for i, key in enumerate(keys):
            assert values[key] in (value("A", i), value("B", i)), f"{key} torn or lost"
            seen.add(generations[values[key]])
        assert sorted(await store.get_keys()) == sorted(keys)  # no temp file listed
        await store.dispose()
        mixed += len(seen) > 1
        if kind == "sqlite":
            assert len(seen) == 1, "a batch is one transaction"
    if kind == "sqlite":
        assert _integrity(path) == [("ok",)]
    else:  # a kill mid-write leaves a temp file (never listed); a sweep removes it
        left = len(_temp_files(path))
        sweeper = FSDriver(path)
        sweeper.stale_temp_after = 0.0
        await sweeper.sweep()
        await sweeper.dispose()
        assert _temp_files(path) == []
        reliability.record(
            "faults", f"fs: SIGKILL during set_items of {KEYS} x 20 KB", temp_files_swept=left
        )
    reliability.record(
        "faults",
        f"{kind}: SIGKILL during set_items of {KEYS} x 20 KB",
        kills=kills,
        intact=kills,
        mixed_batches=mixed,
        atomicity="batch" if kind == "sqlite" else "per key",
    )
