"""Interoperability with unstorage (Node.js, the npm package, installed on first use):
unstorage's http driver reads and writes a kvstorage server, and HTTPDriver reads and
writes unstorage's own storage server -- the same keys and values seen from both sides.
Missing node/npm skips these tests, and fails them under CI."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import anyio
import pytest
from anyio.abc import Process

from kvstorage import ConditionFailedError, Storage, create_storage
from kvstorage.drivers import HTTPDriver
from kvstorage.http import create_app

from .backends import require_service
from .support.node import CACHE, SCRIPTS, install_unstorage, node_script
from .support.servers import asgi_server

pytestmark = pytest.mark.anyio

TOKEN = "interop-token"


@pytest.fixture(scope="module")
def interop_script() -> str:
    """The Node script, where ``import "unstorage"`` resolves (unstorage installed)."""
    problem = install_unstorage()
    require_service(problem is None, f"unstorage for Node.js ({problem})")
    return str(node_script(SCRIPTS / "unstorage_interop.mjs"))


async def test_unstorage_http_driver_uses_a_kvstorage_server(interop_script: str) -> None:
    storage = create_storage()
    await storage.set_item("py:obj", {"x": [1, 2], "ok": True})
    await storage.set_item("py:str", "hi there")
    await storage.set_item_raw("py:raw", bytes([0, 1, 128, 255]))
    await storage.set_item("py:ttl", 1, ttl=120)
    await storage.set_items({"py:tmp:a": 1, "py:tmp:b:c": 2})
    with asgi_server(create_app(storage, token=TOKEN)) as url:
        with anyio.fail_after(60):
            result = await anyio.run_process(
                ["node", interop_script, "client", url, TOKEN], check=False, cwd=CACHE
            )
    assert result.returncode == 0, result.stderr.decode()
    seen = json.loads(result.stdout)

    # what unstorage saw of the items written here
    assert seen["keys"] == ["py:obj", "py:raw", "py:str", "py:tmp:a", "py:tmp:b:c", "py:ttl"]
    assert seen["obj"] == {"x": [1, 2], "ok": True}
    assert seen["str"] == "hi there"
    assert seen["raw"] == [0, 1, 128, 255]
    assert (seen["has"], seen["hasMissing"], seen["missing"]) == (True, False, None)
    assert seen["meta"]["status"] == 200 and 110 < seen["meta"]["ttl"] <= 120
    assert seen["meta"]["mtime"].endswith("Z")
    assert seen["afterClear"] == ["py:obj", "py:raw", "py:str", "py:ttl"]

    # what unstorage wrote, seen here
    assert sorted(await storage.get_keys("js")) == [
        "js:num",
        "js:obj",
        "js:raw",
        "js:str",
        "js:ttl",
    ]
    assert await storage.get_item("js:obj") == {"a": 1, "list": [1, "two", None, 2.5]}
    assert await storage.get_item("js:str") == "hello world"
    assert await storage.get_item("js:num") == 42
    assert await storage.get_item_raw("js:raw") == bytes([0, 1, 2, 127, 128, 254, 255])
    meta = await storage.get_meta("js:ttl")
    assert meta is not None and meta.ttl is not None and 55 < meta.ttl <= 60
    assert await storage.get_item("js:ttl") == {"t": True}
    await storage.dispose()


@pytest.fixture
async def unstorage_server(interop_script: str) -> AsyncIterator[tuple[str, Process]]:
    """unstorage's createStorageServer (memory) in Node: (URL, process)."""
    async with await anyio.open_process(["node", interop_script, "server"], cwd=CACHE) as node:
        assert node.stdout is not None
        with anyio.fail_after(30):
            port = json.loads(await node.stdout.receive())["port"]
        yield f"http://127.0.0.1:{port}", node
        assert node.stdin is not None
        await node.stdin.aclose()
        with anyio.fail_after(10):
            await node.wait()


async def dump(node: Process) -> dict[str, dict[str, object]]:
    """Every key of the unstorage server with its value (``getItem``) and raw bytes."""
    assert node.stdin is not None and node.stdout is not None
    await node.stdin.send(b"dump\n")
    received = b""
    with anyio.fail_after(30):
        while not received.endswith(b"\n"):
            received += await node.stdout.receive()
    items: dict[str, dict[str, object]] = json.loads(received)
    return items


async def test_http_driver_uses_an_unstorage_server(
    unstorage_server: tuple[str, Process],
) -> None:
    url, node = unstorage_server
    storage: Storage = create_storage(HTTPDriver(url))

    # what unstorage wrote, seen here (its setItem stores strings without JSON quotes)
    assert sorted(await storage.get_keys()) == ["js:obj", "js:raw", "js:str"]
    assert await storage.get_item("js:obj") == {"a": 1, "list": [1, "two", None]}
    assert await storage.get_item_raw("js:str") == b"hello world"
    assert await storage.get_item_raw("js:raw") == bytes([0, 1, 2, 254, 255])
    assert await storage.get_items(["js:obj", "nope"]) == {
        "js:obj": {"a": 1, "list": [1, "two", None]},
        "nope": None,
    }
    assert await storage.has_item("js:str") and not await storage.has_item("nope")

    # what is written here, seen by unstorage
    await storage.set_item("py:obj", {"x": [1, 2], "ok": True})
    await storage.set_item("py:str", "hi there")
    await storage.set_item_raw("py:raw", bytes([0, 1, 128, 255]))
    await storage.set_item("py:once", 1, if_absent=True)
    with pytest.raises(ConditionFailedError):
        await storage.set_item("py:once", 2, if_absent=True)
    assert await storage.update_item("py:once", lambda n: n + 1) == 2
    await storage.set_items({"py:tmp:a": 1, "py:tmp:b": 2})
    assert await storage.remove_item("py:tmp:b") is True
    assert await storage.remove_item("py:tmp:b") is False
    seen = await dump(node)
    assert sorted(seen) == sorted(await storage.get_keys())
    assert seen["py:obj"]["value"] == {"x": [1, 2], "ok": True}
    assert seen["py:str"]["value"] == "hi there"
    assert seen["py:once"]["value"] == 2
    assert base64.b64decode(str(seen["py:raw"]["raw"])) == bytes([0, 1, 128, 255])
    assert seen["py:tmp:a"]["value"] == 1

    await storage.clear("py")  # unstorage clears whole mounts only: listed and removed
    assert sorted(await dump(node)) == ["js:obj", "js:raw", "js:str"]
    await storage.dispose()
