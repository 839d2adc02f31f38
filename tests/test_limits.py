"""Limits on every driver: huge values, and several processes incrementing one counter.

Figures go to RELIABILITY.md (sections "hostile" and "concurrency").
"""

from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from kvstorage import Storage

from .backends import BackendSpec
from .support.children import run_counters
from .support.reliability import record

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

HUGE = 50 * 2**20
#: Peak Python allocations during a set and get of a HUGE value, in HUGE units: the value,
#: its stored form (header + value) and the driver's send/receive buffers. s3 counts the
#: in-process moto server too (it holds the object and its request bodies).
PEAK_COPIES = {"s3": 8.0}  # measured: memory 0, fs 1, sqlite 1, redis 3.8, s3 4.3


@pytest.mark.only_drivers("memory", "fs", "sqlite", "redis", "s3", "postgres")
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
    if spec.name == "postgres":
        return f"{request.getfixturevalue('postgres_server').url}?table={driver.table}"
    return None


@pytest.mark.only_drivers("fs", "sqlite", "redis", "s3", "postgres")
async def test_two_processes_increment_one_counter(
    storage: Storage, backend_spec: BackendSpec, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = _url(backend_spec, storage, request)
    assert url is not None
    per_process = 50 if backend_spec.name == "s3" else 200  # moto: ~100 requests/s
    await storage.set_item("counter", 0)
    await run_counters(url, per_process)
    final = await storage.get_item("counter")
    record(
        "concurrency",
        f"{backend_spec.name}: 2 processes x {per_process} update_item",
        expected=2 * per_process,
        final=final,
    )
    assert final == 2 * per_process
