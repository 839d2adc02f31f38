"""HTTPDriver specifics against a kvstorage server on uvicorn (the shared conformance suite
runs it too, see tests/backends/http.py): URLs and tokens, base paths, awkward keys,
errors, the connection pool."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from kvstorage import (
    DriverError,
    DriverUnavailableError,
    ReadOnlyError,
    Storage,
    create_storage,
)
from kvstorage.drivers import HTTPDriver, RedisDriver, from_url
from kvstorage.http import create_app

from .support.servers import asgi_server, free_port
from .test_s3_driver import AWKWARD_KEYS

pytestmark = pytest.mark.anyio

TOKEN = "driver-test-token"


class ConnectionLog:
    """ASGI middleware recording the client address of every request."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.clients: list[tuple[str, int]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.clients.append(tuple(scope["client"]))
        await self.app(scope, receive, send)


@pytest.fixture
def served() -> Iterator[tuple[str, Storage, ConnectionLog]]:
    """(URL, served storage, connection log) of a kvstorage server with token TOKEN."""
    storage = create_storage()
    log = ConnectionLog(create_app(storage, token=TOKEN))
    with asgi_server(log) as url:
        yield url, storage, log


@pytest.fixture
async def driver(served: tuple[str, Storage, ConnectionLog]) -> AsyncIterator[HTTPDriver]:
    driver = HTTPDriver(served[0] + "/app/v1", token=TOKEN)
    yield driver
    await driver.dispose()


async def test_base_path_namespaces_every_key(
    served: tuple[str, Storage, ConnectionLog], driver: HTTPDriver
) -> None:
    _, server_side, _ = served
    await server_side.set_item("outside", 0)
    await server_side.set_item("app:v1x", 0)
    store = create_storage(driver)
    await store.set_items({"a": 1, "b:c": 2})
    assert sorted(await server_side.get_keys("app:v1")) == ["app:v1:a", "app:v1:b:c"]
    assert sorted(await store.get_keys()) == ["a", "b:c"]
    assert await store.get_keys("b") == ["b:c"]
    await store.clear()
    assert sorted(await server_side.get_keys()) == ["app:v1x", "outside"]


async def test_awkward_keys_travel_exactly(driver: HTTPDriver) -> None:
    store = create_storage(driver)
    for key in AWKWARD_KEYS:
        await store.set_item(key, key)
    assert sorted(await store.get_keys()) == sorted(AWKWARD_KEYS)
    assert await store.get_items(AWKWARD_KEYS) == {key: key for key in AWKWARD_KEYS}
    for key in AWKWARD_KEYS:
        assert await store.get_item(key) == key
        assert await store.remove_item(key)


async def test_large_listings_stream_and_can_stop_early(driver: HTTPDriver) -> None:
    store = create_storage(driver)
    keys = [f"many:{i:05}" for i in range(2500)]
    await store.set_items({key: 1 for key in keys})
    assert sorted(await store.get_keys("many")) == keys
    seen = []
    async for key in store.iter_keys("many"):
        seen.append(key)
        if len(seen) == 3:
            break
    assert await store.get_item(seen[0]) == 1  # the pool is still usable
    assert len(await store.get_items(keys)) == 2500  # three batch requests


async def test_one_connection_pool(
    served: tuple[str, Storage, ConnectionLog], driver: HTTPDriver
) -> None:
    store = create_storage(driver)
    for i in range(50):
        await store.set_item(f"k{i}", i)
        await store.get_item(f"k{i}")
    log = served[2]
    assert len(log.clients) == 100
    assert len(set(log.clients)) == 1  # every request on one kept-alive connection


async def test_given_client_is_used_and_not_closed(served: tuple[str, Storage, Any]) -> None:
    async with httpx.AsyncClient() as client:
        driver = HTTPDriver(served[0], token=TOKEN, client=client)
        await create_storage(driver).set_item("k", 1)
        await driver.dispose()
        assert not client.is_closed
        auth = {"authorization": f"Bearer {TOKEN}"}
        assert (await client.get(served[0] + "/k", headers=auth)).json() == 1


# -- URLs, tokens, errors ---------------------------------------------------------------


def test_urls_and_the_registry() -> None:
    driver = from_url(f"https://:{TOKEN}@example.test:8443/a/b%20c/")
    assert isinstance(driver, HTTPDriver)
    assert driver.url == "https://example.test:8443/a/b%20c"
    assert repr(driver) == "HTTPDriver('https://example.test:8443/a/b%20c', token=***)"
    by_query = HTTPDriver(f"http://127.0.0.1:1/?token={TOKEN}")
    assert TOKEN not in repr(by_query) and by_query.url == "http://127.0.0.1:1"
    assert repr(HTTPDriver("http://h:1")) == "HTTPDriver('http://h:1')"
    assert isinstance(create_storage("http://h:1").get_mount().driver, HTTPDriver)
    for bad in [f"http://h:1/?token={TOKEN}&bogus=1", "ftp://h/x", f"http://:{TOKEN}@/x"]:
        with pytest.raises(ValueError) as caught:
            HTTPDriver(bad)
        assert TOKEN not in str(caught.value)


async def test_connection_refused_names_the_address_not_the_token() -> None:
    port = free_port()
    driver = HTTPDriver(f"http://:{TOKEN}@127.0.0.1:{port}/base")
    store = create_storage(driver)
    for call in (store.get_item("k"), store.set_item("k", 1), store.get_keys(), store.clear()):
        with pytest.raises(DriverUnavailableError) as caught:
            await call
        message = str(caught.value)
        assert f"http://127.0.0.1:{port}/base" in message and TOKEN not in message
        assert TOKEN not in repr(caught.value.__cause__)
    await store.dispose()


async def test_a_wrong_token_is_reported_without_it(served: tuple[str, Storage, Any]) -> None:
    for token in [None, "wrong-" + TOKEN]:
        store = create_storage(HTTPDriver(served[0], token=token))
        with pytest.raises(DriverError, match="check the token") as caught:
            await store.get_item("k")
        assert "wrong-" not in str(caught.value)
        await store.dispose()
    host = served[0].removeprefix("http://")
    for driver in [  # from_url: the token of the URL wins over the one given
        HTTPDriver.from_url(served[0], token=TOKEN),
        HTTPDriver.from_url(f"http://:{TOKEN}@{host}", token="wrong"),
        HTTPDriver.from_url(f"http://{host}/?token={TOKEN}", token="wrong"),
    ]:
        store = create_storage(driver)
        await store.set_item("k", 1)
        await store.dispose()


async def test_read_only_servers_raise_read_only_error() -> None:
    served = create_storage()
    await served.set_item("k", 1)
    with asgi_server(create_app(served, read_only=True)) as url:
        store = create_storage(HTTPDriver(url))
        assert await store.get_item("k") == 1
        for call in (store.set_item("k", 2), store.remove_item("k"), store.clear()):
            with pytest.raises(ReadOnlyError, match="read-only"):
                await call
        await store.dispose()
    assert await served.get_item("k") == 1


async def test_a_server_whose_backend_is_down_is_unavailable() -> None:
    behind = create_storage(RedisDriver(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5))
    with asgi_server(create_app(behind)) as url:
        store = create_storage(HTTPDriver(url))
        with pytest.raises(DriverUnavailableError, match="cannot reach its storage"):
            await store.get_item("k")
        await store.dispose()
    await behind.dispose()
