"""Limits on every driver: huge values, and several processes incrementing one counter.

Figures go to RELIABILITY.md (sections "hostile" and "concurrency").
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anyio
import pytest

from kvstorage import Storage

from .backends import BackendSpec
from .helpers import ROOT
from .reliability import record

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

HUGE = 50 * 2**20
#: Peak Python allocations during a set and get of a HUGE value, in HUGE units: the value,
#: its stored form (header + value) and the driver's send/receive buffers. s3 counts the
#: in-process moto server too (it holds the object and its request bodies).
PEAK_COPIES = {"s3": 8.0}  # measured: memory 0, fs 1, sqlite 1, redis 3.8, s3 4.3


@pytest.mark.only_drivers("memory", "fs", "sqlite", "redis", "s3")
async def test_huge_value_round_trips(storage: Storage, backend_spec: BackendSpec) -> None:
    blob = os.urandom(2**20) * 50  # 50 MiB, incompressible within each MiB
    started = time.perf_counter()
    tracemalloc.start()
    try:
        await storage.set_item_raw("huge", blob)
        got = await storage.get_item_raw("huge")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - started
    assert got == blob
    copies = peak / HUGE
    assert copies <= PEAK_COPIES.get(backend_spec.name, 5.0), f"peak {copies:.1f} x the value"
    meta = await storage.get_meta("huge")
    assert meta is not None and meta.size == HUGE
    assert await storage.remove_item("huge")
    record(
        "hostile",
        backend_spec.name,
        huge_value_mib=50,
        huge_value_round_trip_s=round(seconds, 2),
        huge_value_peak_alloc_mib=round(peak / 2**20),
    )


COUNTER_CHILD = """
import asyncio, sys
from kvstorage import create_storage

async def main() -> None:
    storage = create_storage(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(int(sys.argv[2])):
        await storage.update_item("counter", lambda n: (n or 0) + 1, retries=10_000)
    await storage.dispose()

asyncio.run(main())
"""


def _url(spec: BackendSpec, storage: Storage, request: pytest.FixtureRequest) -> str | None:
    """A URL another process can open to reach the same store, or None."""
    driver: Any = storage.get_mount("").driver
    if spec.name == "sqlite":
        return f"sqlite:///{driver.path}?table={driver.table}"
    if spec.name == "fs":
        return f"file://{driver.base}"
    if spec.name == "redis":
        return f"{request.getfixturevalue('redis_server').url}?base={driver.base}"
    if spec.name == "s3":
        query = urlencode({"endpoint_url": driver.endpoint_url, "region": driver.region})
        return f"s3://{driver.bucket}/{driver.prefix.rstrip('/')}?{query}"
    return None


@pytest.mark.only_drivers("fs", "sqlite", "redis", "s3")
async def test_two_processes_increment_one_counter(
    storage: Storage, backend_spec: BackendSpec, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = _url(backend_spec, storage, request)
    assert url is not None
    per_process = 50 if backend_spec.name == "s3" else 200  # moto: ~100 requests/s
    await storage.set_item("counter", 0)
    script = tmp_path / "counter_child.py"
    script.write_text(COUNTER_CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    spawn = functools.partial(
        subprocess.Popen,
        [sys.executable, str(script), url, str(per_process)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    children = [await anyio.to_thread.run_sync(spawn) for _ in range(2)]
    try:
        for child in children:
            assert child.stdout is not None
            line = await anyio.to_thread.run_sync(child.stdout.readline)
            assert line.strip() == b"ready", child.stderr.read() if child.stderr else b""
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")
            child.stdin.flush()
        for child in children:
            code = await anyio.to_thread.run_sync(lambda c=child: c.wait(120))
            assert code == 0, child.stderr.read() if child.stderr else b""
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    final = await storage.get_item("counter")
    record(
        "concurrency",
        f"{backend_spec.name}: 2 processes x {per_process} update_item",
        expected=2 * per_process,
        final=final,
    )
    assert final == 2 * per_process
