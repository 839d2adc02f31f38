"""HTTPDriver instances for the conformance suite. Each driver a test makes gets a whole
kvstorage server to itself (``create_app`` over a memory storage, with a token, served by
uvicorn on a loopback port), so its keys have the full 1024 bytes and its listing sees
nothing else: the servers are started once per session, as many as one test needs at a
time, and every driver clears its server when the test ends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack

import pytest

from kvstorage import create_storage
from kvstorage.drivers import HTTPDriver
from kvstorage.http import create_app

from ..support.servers import asgi_server
from . import DriverFactory, clearing_factory

TOKEN = "conformance-token"


class ServerPool:
    """kvstorage servers (memory storage, token :data:`TOKEN`), started on demand."""

    def __init__(self, stack: ExitStack) -> None:
        self._stack = stack
        self._urls: list[str] = []

    def url(self, index: int) -> str:
        """The URL of server number ``index``, starting it (and those before) if needed."""
        while len(self._urls) <= index:
            app = create_app(create_storage(), token=TOKEN)
            self._urls.append(self._stack.enter_context(asgi_server(app)))
        return self._urls[index]


@pytest.fixture(scope="session")
def http_servers() -> Iterator[ServerPool]:
    with ExitStack() as stack:
        yield ServerPool(stack)


@pytest.fixture
async def http_driver_factory(http_servers: ServerPool) -> AsyncIterator[DriverFactory]:
    async for factory in clearing_factory(lambda n: HTTPDriver(http_servers.url(n), token=TOKEN)):
        yield factory
