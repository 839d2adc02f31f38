"""Load: the session app under uvicorn with 4 worker processes sharing one store, driven
by 100 concurrent clients on loopback, each with its own session. Zero 5xx and zero lost
session writes; latencies and throughput go to RELIABILITY.md.

CI runs 3,000 requests per store; ``KVSTORAGE_LONG_TESTS=1`` runs 50,000.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support.helpers import ROOT
from .support.load.generator import run_load
from .support.reliability import record
from .support.servers import RedisServer, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

LONG = os.environ.get("KVSTORAGE_LONG_TESTS") == "1"
CLIENTS = 100
PER_CLIENT = 500 if LONG else 30


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    """``serve(url)`` starts the load app under 4 uvicorn workers on ``url``'s store."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(store_url: str) -> str:
        port = free_port()
        env = {**os.environ, "KVSTORAGE_URL": store_url}
        args = [sys.executable, "-m", "uvicorn", "tests.support.load.app:app", "--workers", "4"]
        args += ["--port", str(port), "--host", "127.0.0.1", "--log-level", "warning"]
        log = (tmp_path / f"uvicorn-{port}.log").open("wb")
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=log)
        processes.append(process)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / f"uvicorn-{port}.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return f"http://127.0.0.1:{port}"
            except OSError:
                time.sleep(0.05)
        raise AssertionError("uvicorn did not start within 30 s")

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=30)


async def _load(name: str, base_url: str) -> None:
    result = await run_load(base_url, clients=CLIENTS, requests_per_client=PER_CLIENT)
    record(
        "load",
        name,
        requests=result.requests,
        errors_5xx=result.errors_5xx,
        transport_errors=result.other_errors,
        lost_writes=result.lost_writes,
        requests_per_second=round(result.rate),
        p50_ms=round(result.percentile(50), 1),
        p99_ms=round(result.percentile(99), 1),
        workers=4,
        clients=CLIENTS,
    )
    assert result.requests == CLIENTS * PER_CLIENT
    assert result.errors_5xx == 0
    assert result.other_errors == 0
    assert result.lost_writes == 0


async def test_load_fs(serve: object, tmp_path: Path) -> None:
    await _load("fs", serve(f"file://{tmp_path / 'sessions'}"))  # type: ignore[operator]


async def test_load_sqlite(serve: object, tmp_path: Path) -> None:
    await _load("sqlite", serve(f"sqlite:///{tmp_path / 'sessions.db'}"))  # type: ignore[operator]


async def test_load_redis(serve: object, redis_server: RedisServer) -> None:
    url = f"{redis_server.url}?base=load-{uuid.uuid4().hex[:8]}"
    await _load("redis", serve(url))  # type: ignore[operator]
