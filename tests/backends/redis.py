"""Redis servers for the tests: the tests start their own ``redis-server`` processes on free
loopback ports and stop them by pid. Never a server that was already running.

* ``redis_server``: one standalone server for the session.
* ``redis_driver_factory``: RedisDrivers on it, each with its own ``base`` (a uuid); at the
  end each clears its own keys and is disposed.

The 3-node cluster lives in :mod:`tests.backends.redis_cluster`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvstorage.drivers import RedisDriver

from ..helpers import free_port
from . import DriverFactory, require_service


@dataclass
class RedisServer:
    """A ``redis-server`` process started by the tests."""

    port: int
    directory: Path
    args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait (bounded) until it answers PING; skip (fail in CI)
        when redis-server is not installed."""
        require_redis()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--save",
                "",
                "--appendonly",
                "no",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not ping(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited at start")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server by its pid and wait until it is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None


def ping(port: int) -> bool:
    """True when a Redis server on 127.0.0.1:``port`` answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def require_redis() -> None:
    require_service(shutil.which("redis-server") is not None, "redis-server")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A standalone redis-server for the whole session."""
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def unique_base() -> str:
    return f"kvt-{uuid.uuid4().hex}"


async def drivers_at(url: str) -> AsyncIterator[DriverFactory]:
    """A factory of drivers on ``url``, each under its own base; at the end each one
    deletes its own keys (never anything else) and is disposed."""
    made: list[RedisDriver] = []

    def make() -> RedisDriver:
        driver = RedisDriver(url, base=unique_base())
        made.append(driver)
        return driver

    yield make
    for driver in made:
        await driver.clear()
        await driver.dispose()


@pytest.fixture
async def redis_driver_factory(redis_server: RedisServer) -> AsyncIterator[DriverFactory]:
    async for factory in drivers_at(redis_server.url):
        yield factory
