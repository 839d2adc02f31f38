"""Redis servers for the tests: the tests start their own ``redis-server`` processes on free
loopback ports and stop them by pid. Never a server that was already running.

* ``redis_server``: one standalone server for the session.
* ``redis_driver_factory``: RedisDrivers on it, each with its own ``base`` (a uuid); at the
  end each clears its own keys and is disposed.

The 3-node cluster lives in :mod:`tests.backends.redis_cluster`.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from kvstorage.drivers import RedisDriver

from ..support.servers import RedisServer, free_port
from . import DriverFactory, clearing_factory, require_service


def require_redis() -> None:
    require_service(shutil.which("redis-server") is not None, "redis-server")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A standalone redis-server for the whole session."""
    require_redis()
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def unique_base() -> str:
    return f"kvt-{uuid.uuid4().hex}"


async def drivers_at(url: str) -> AsyncIterator[DriverFactory]:
    """A factory of drivers on ``url``, each under its own base; at the end each one
    deletes its own keys (never anything else) and is disposed."""
    async for factory in clearing_factory(lambda _: RedisDriver(url, base=unique_base())):
        yield factory


@pytest.fixture
async def redis_driver_factory(redis_server: RedisServer) -> AsyncIterator[DriverFactory]:
    async for factory in drivers_at(redis_server.url):
        yield factory
