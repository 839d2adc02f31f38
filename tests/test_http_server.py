"""The storage server (``kvstorage.http.create_app``) over a real uvicorn on a loopback port:
every route, JSON and raw values, listing and clearing by base, ETag and conditions, X-TTL,
the batch read, 401/405/413, and hostile paths (always 4xx, never 5xx, never outside the
storage)."""

from __future__ import annotations

import base64
import email.utils
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from kvstorage import Storage, create_storage
from kvstorage.drivers import FSDriver, RedisDriver
from kvstorage.http import create_app

from .support.helpers import eventually
from .support.servers import asgi_server, free_port

pytestmark = pytest.mark.anyio

TOKEN = "server-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
EVERY_BYTE = bytes(range(256))


@contextmanager
def serving(storage: Storage, **options: Any) -> Iterator[str]:
    """Serve ``storage`` (token :data:`TOKEN` unless given) meanwhile; yield the URL."""
    options.setdefault("token", TOKEN)
    with asgi_server(create_app(storage, **options)) as url:
        yield url


@pytest.fixture
async def storage() -> AsyncIterator[Storage]:
    store = create_storage()
    yield store
    await store.dispose()


@pytest.fixture
async def client(storage: Storage) -> AsyncIterator[httpx.AsyncClient]:
    with serving(storage) as url:
        async with httpx.AsyncClient(base_url=url, headers=AUTH) as http:
            yield http


async def raw_request(url: str, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` (a whole HTTP/1.1 request) as it is -- no client normalizes its
    path -- and return (status, body)."""
    host, port = url.removeprefix("http://").split(":")
    async with await anyio.connect_tcp(host, int(port)) as stream:
        await stream.send(request)
        answer = b""
        with anyio.fail_after(10):
            while True:
                try:
                    answer += await stream.receive()
                except anyio.EndOfStream:
                    break
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# -- values ------------------------------------------------------------------------------


async def test_json_and_raw_values(client: httpx.AsyncClient, storage: Storage) -> None:
    put = await client.put("/users/1", content=b'{"name": "Ada", "n": [1, 2.5, null]}')
    assert (put.status_code, put.text) == (200, "OK")
    assert await storage.get_item("users:1") == {"name": "Ada", "n": [1, 2.5, None]}
    got = await client.get("/users/1")
    assert got.status_code == 200 and got.headers["content-type"] == "application/json"
    assert got.json() == {"name": "Ada", "n": [1, 2.5, None]}
    assert got.headers["x-kvstorage"] == "1"

    # text that is not JSON is a string (what unstorage's setItem sends for strings)
    await client.put("/greeting", content=b"hello", headers={"content-type": "text/plain"})
    assert await storage.get_item("greeting") == "hello"
    assert (await client.get("/greeting")).json() == "hello"

    raw = {"content-type": "application/octet-stream"}
    assert (await client.put("/blob", content=EVERY_BYTE, headers=raw)).status_code == 200
    assert await storage.get_item_raw("blob") == EVERY_BYTE
    exact = await client.get("/blob", headers={"accept": "application/octet-stream"})
    assert exact.content == EVERY_BYTE
    assert exact.headers["content-type"] == "application/octet-stream"
    assert (await client.get("/blob")).content == EVERY_BYTE  # not JSON: served as bytes

    await storage.set_item_raw("text", "żółw, not JSON".encode())
    text = await client.get("/text")
    assert text.headers["content-type"] == "text/plain; charset=utf-8"
    assert text.text == "żółw, not JSON"
    await client.put("/empty", content=b"", headers=raw)
    assert (
        await client.get("/empty", headers={"accept": "application/octet-stream"})
    ).content == b""

    missing = await client.get("/nope")
    assert missing.status_code == 404
    assert missing.json() == {
        "status": 404,
        "statusText": "Not Found",
        "message": "KV value not found",
    }


async def test_keys_in_paths_are_percent_decoded(
    client: httpx.AsyncClient, storage: Storage
) -> None:
    await client.put("/a%20b/%C5%BC%C3%B3%C5%82w/q%3Fx%3D1%23frag", content=b"1")
    assert await storage.get_keys() == ["a b:żółw:q?x=1#frag"]
    await client.put("/x%2Fy%3Az", content=b"2")  # encoded separators still separate
    assert await storage.get_item("x:y:z") == 2
    assert (await client.get("/x:y/z")).json() == 2


async def test_mounted_under_a_prefix(storage: Storage) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    app = Starlette(routes=[Mount("/kv", app=create_app(storage, token=TOKEN))])
    with asgi_server(app) as url:
        async with httpx.AsyncClient(base_url=url + "/kv", headers=AUTH) as client:
            assert (await client.put("/a/b", content=b"1")).status_code == 200
            assert (await client.get("/")).json() == ["a/b"]
            assert (await client.get("/a/b")).json() == 1
    assert await storage.get_keys() == ["a:b"]


async def test_delete_says_whether_the_key_existed(client: httpx.AsyncClient) -> None:
    await client.put("/k", content=b"1")
    first = await client.delete("/k")
    assert (first.status_code, first.headers["x-removed"]) == (200, "1")
    second = await client.delete("/k")
    assert (second.status_code, second.headers["x-removed"]) == (200, "0")
    assert (await client.get("/k")).status_code == 404


# -- metadata, etags, conditions, ttl -------------------------------------------------


async def test_head_etag_last_modified_and_ttl(client: httpx.AsyncClient, storage: Storage) -> None:
    before = time.time()
    await client.put("/m", content=b'{"a": 1}', headers={"x-ttl": "60"})
    got = await client.get("/m")
    head = await client.head("/m")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["etag"] == got.headers["etag"]
    entry = await storage.get_entry("m")
    assert entry is not None and got.headers["etag"] == f'"{entry.etag}"'
    assert int(head.headers["content-length"]) == len(b'{"a": 1}')
    modified = email.utils.parsedate_to_datetime(head.headers["last-modified"]).timestamp()
    assert before - 1 <= modified <= time.time()
    assert 55 < float(head.headers["x-ttl"]) <= 60
    assert (await client.head("/nope")).status_code == 404

    fresh = await client.get("/m", headers={"if-none-match": got.headers["etag"]})
    assert fresh.status_code == 304 and fresh.content == b""
    listed = await client.get("/m", headers={"if-none-match": f'"x", {got.headers["etag"]}'})
    assert listed.status_code == 304
    await client.put("/m", content=b"2")
    assert "x-ttl" not in (await client.head("/m")).headers  # a write without TTL clears it
    changed = await client.get("/m", headers={"if-none-match": got.headers["etag"]})
    assert changed.status_code == 200 and changed.headers["etag"] != got.headers["etag"]


async def test_conditions_answer_412_and_write_nothing(
    client: httpx.AsyncClient, storage: Storage
) -> None:
    absent = {"if-none-match": "*"}
    assert (await client.put("/c", content=b"1", headers=absent)).status_code == 200
    taken = await client.put("/c", content=b"2", headers=absent)
    assert taken.status_code == 412 and taken.json()["status"] == 412
    assert await storage.get_item("c") == 1

    etag = (await client.head("/c")).headers["etag"]
    assert (await client.put("/c", content=b"3", headers={"if-match": etag})).status_code == 200
    stale = await client.put("/c", content=b"4", headers={"if-match": etag})
    assert stale.status_code == 412 and await storage.get_item("c") == 3
    for tag in ['"garbage"', "unquoted", 'W/"1"', '"~!!"']:
        refused = await client.put("/c", content=b"5", headers={"if-match": tag})
        assert refused.status_code == 412, tag
    assert await storage.get_item("c") == 3

    assert (await client.put("/c", content=b"6", headers={"if-match": "*"})).status_code == 200
    nothing = await client.put("/none", content=b"7", headers={"if-match": "*"})
    assert nothing.status_code == 412 and not await storage.has_item("none")
    stale_missing = await client.put("/none", content=b"7", headers={"if-match": etag})
    assert stale_missing.status_code == 412 and not await storage.has_item("none")

    both = await client.put("/c", content=b"8", headers={"if-match": etag, "if-none-match": "*"})
    assert both.status_code == 400
    assert (
        await client.put("/c", content=b"8", headers={"if-none-match": etag})
    ).status_code == 400
    assert (await client.delete("/c", headers={"if-match": etag})).status_code == 400
    assert await storage.get_item("c") == 6


async def test_one_concurrent_if_none_match_wins(
    client: httpx.AsyncClient, storage: Storage
) -> None:
    statuses: list[int] = []

    async def claim(i: int) -> None:
        answer = await client.put("/lock", content=b"%d" % i, headers={"if-none-match": "*"})
        statuses.append(answer.status_code)

    async with anyio.create_task_group() as group:
        for i in range(20):
            group.start_soon(claim, i)
    assert sorted(statuses) == [200] + [412] * 19


async def test_x_expires_at_is_exact_and_wins(client: httpx.AsyncClient, storage: Storage) -> None:
    at = time.time() + 90.123456
    both = {"x-expires-at": f"{at:.6f}", "x-ttl": "5"}
    assert (await client.put("/exact", content=b"1", headers=both)).status_code == 200
    meta = await storage.get_meta("exact")
    assert meta is not None and meta.expires_at is not None
    assert abs(meta.expires_at.timestamp() - at) < 0.001
    head = await client.head("/exact")
    assert abs(float(head.headers["x-expires-at"]) - at) < 0.001
    assert 85 < float(head.headers["x-ttl"]) <= 90.2
    batch = (await client.post("/", json={"keys": ["exact"]})).json()
    assert abs(batch[0]["expires_at"] - at) < 0.001
    assert "x-expires-at" not in (await client.head("/greeting-less")).headers

    past = {"x-expires-at": f"{time.time() - 10:.6f}"}
    assert (await client.put("/past", content=b"1", headers=past)).status_code == 200

    async def gone() -> bool:
        return not await storage.has_item("past")

    await eventually(gone, within=2)
    for bad in ["soon", "nan", "-1", "0"]:
        answer = await client.put("/bad", content=b"1", headers={"x-expires-at": bad})
        assert answer.status_code == 400, bad
    assert not await storage.has_item("bad")


async def test_x_ttl_expires_items(client: httpx.AsyncClient, storage: Storage) -> None:
    written = time.monotonic()
    await client.put("/short", content=b"1", headers={"x-ttl": "0.3"})
    meta = await storage.get_meta("short")
    if time.monotonic() - written < 0.3:  # else a stall outlived the ttl: it may be gone
        assert meta is not None and meta.ttl is not None and meta.ttl <= 0.3

    async def gone() -> bool:
        return (await client.get("/short")).status_code == 404

    await eventually(gone, within=3)
    for bad in ["0", "-1", "abc", "nan", "inf", ""]:
        answer = await client.put("/bad", content=b"1", headers={"x-ttl": bad})
        assert answer.status_code == 400, bad
    assert not await storage.has_item("bad")


# -- bases ----------------------------------------------------------------------------


async def test_listing_and_clearing_by_base(client: httpx.AsyncClient, storage: Storage) -> None:
    await storage.set_items({"a:1": 1, "a:b:2": 2, "a:b:c:3": 3, "ab:4": 4, "z": 0})
    listed = await client.get("/a/")
    assert listed.headers["content-type"] == "application/json"
    assert sorted(listed.json()) == ["a/1", "a/b/2", "a/b/c/3"]
    assert sorted((await client.get("/a:")).json()) == ["a/1", "a/b/2", "a/b/c/3"]
    assert sorted((await client.get("/a/", params={"max_depth": 1})).json()) == ["a/1", "a/b/2"]
    assert sorted((await client.get("/")).json()) == ["a/1", "a/b/2", "a/b/c/3", "ab/4", "z"]
    assert (await client.get("/nothing/")).json() == []
    assert (await client.get("/a/", params={"max_depth": "x"})).status_code == 400
    assert (await client.get("/a/", params={"max_depth": "-1"})).status_code == 400

    assert (await client.delete("/a/b/")).status_code == 200
    assert sorted(await storage.get_keys()) == ["a:1", "ab:4", "z"]
    await client.delete("/a:")
    assert sorted(await storage.get_keys()) == ["ab:4", "z"]


async def test_listing_streams_many_keys(client: httpx.AsyncClient, storage: Storage) -> None:
    keys = [f"many:{i:05}" for i in range(20_000)]
    await storage.set_items({key: 1 for key in keys})
    chunks = 0
    async with client.stream("GET", "/many/") as answer:
        body = b""
        async for chunk in answer.aiter_raw():
            body += chunk
            chunks += 1
    assert chunks > 1  # sent in pieces as the keys are listed
    assert sorted(json.loads(body)) == [key.replace(":", "/") for key in keys]


async def test_batch_read(client: httpx.AsyncClient, storage: Storage) -> None:
    await storage.set_items({"b:1": {"x": 1}, "b:deep:2": "two"})
    await storage.set_item_raw("b:raw", EVERY_BYTE, ttl=60)
    answer = await client.post("/b/", json={"keys": ["1", "missing", "raw", "deep/2"]})
    assert answer.status_code == 200
    one, missing, raw, deep = answer.json()
    assert missing is None
    assert one["key"] == "1" and one["value"] == {"x": 1} and one["ttl"] is None
    assert one["etag"] == f'"{(await storage.get_entry("b:1")).etag}"'  # type: ignore[union-attr]
    assert "value" not in raw and 55 < raw["ttl"] <= 60
    assert base64.b64decode(raw["base64"]) == EVERY_BYTE
    assert deep["key"] == "deep:2" and deep["value"] == "two" and deep["mtime"] > 0
    as_bytes = await client.post("/", json={"keys": ["b:1"], "encoding": "base64"})
    assert base64.b64decode(as_bytes.json()[0]["base64"]) == b'{"x":1}'

    for body in [b"[", b'{"keys": "b:1"}', b'{"keys": ["a"], "x": 1}', b'{"keys": ["a:..:b"]}']:
        assert (await client.post("/", content=body)).status_code == 400, body
    assert (await client.post("/", json={"keys": ["a"], "encoding": "hex"})).status_code == 400
    assert (await client.post("/b/1", json={"keys": []})).status_code == 405


# -- access -----------------------------------------------------------------------------


async def test_token_is_required(client: httpx.AsyncClient, storage: Storage) -> None:
    await storage.set_item("k", 1)
    async with httpx.AsyncClient(base_url=client.base_url) as anonymous:
        for headers in [{}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}]:
            for method in ["GET", "HEAD", "PUT", "DELETE", "POST"]:
                answer = await anonymous.request(method, "/k", headers=headers, content=b"2")
                assert answer.status_code == 401, (method, headers)
                assert answer.headers["www-authenticate"] == "Bearer"
                assert TOKEN not in answer.text
        lower = await anonymous.get("/k", headers={"authorization": f"bearer {TOKEN}"})
        assert lower.status_code == 200
    assert await storage.get_item("k") == 1


async def test_read_only_refuses_writes(storage: Storage) -> None:
    await storage.set_item("k", 1)
    with serving(storage, token=None, read_only=True) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/k")).json() == 1
            assert (await client.post("/", json={"keys": ["k"]})).status_code == 200
            for method, path in [("PUT", "/k"), ("DELETE", "/k"), ("DELETE", "/"), ("PUT", "/new")]:
                answer = await client.request(method, path, content=b"2")
                assert answer.status_code == 405, (method, path)
                assert "PUT" not in answer.headers["allow"]
    assert await storage.get_keys() == ["k"] and await storage.get_item("k") == 1


async def test_bodies_over_max_body_get_413(storage: Storage) -> None:
    with serving(storage, max_body=1000) as url:
        async with httpx.AsyncClient(base_url=url, headers=AUTH) as client:
            assert (await client.put("/fits", content=b"x" * 1000)).status_code == 200
            assert (await client.put("/big", content=b"x" * 1001)).status_code == 413

            async def chunked() -> AsyncIterator[bytes]:  # no Content-Length to go by
                for _ in range(20):
                    yield b"y" * 100

            assert (await client.put("/big", content=chunked())).status_code == 413
            batch = {"keys": [f"k{i}" for i in range(500)]}
            assert (await client.post("/", json=batch)).status_code == 413
    assert await storage.get_keys() == ["fits"]


async def test_other_methods_get_405(client: httpx.AsyncClient) -> None:
    for method in ["PATCH", "OPTIONS", "TRACE"]:
        answer = await client.request(method, "/k")
        assert answer.status_code == 405 and "allow" in answer.headers
    assert (await client.put("/base/", content=b"1")).status_code == 405
    assert (await client.head("/base/")).status_code == 405


async def test_an_unreachable_backend_is_503_without_its_password(tmp_path: Path) -> None:
    port = free_port()
    storage = create_storage(RedisDriver(f"redis://:pw-secret@127.0.0.1:{port}/0", timeout=0.5))
    with serving(storage) as url:
        async with httpx.AsyncClient(base_url=url, headers=AUTH) as client:
            answer = await client.get("/k")
    assert answer.status_code == 503
    assert f"127.0.0.1:{port}" in answer.json()["message"]
    assert "pw-secret" not in answer.text
    await storage.dispose()


# -- hostile paths ----------------------------------------------------------------------

HOSTILE = [
    b"/../outside",
    b"/a/../../outside",
    b"/%2e%2e/outside",
    b"/%2E%2E%2Foutside",
    b"/a/%2e%2e%2f%2e%2e%2foutside",
    b"/..%5Coutside",
    b"/a\\..\\..\\outside",
    b"/./x",
    b"/a/%00b",
    b"/%00",
    b"/a%0ab",
    b"/%ff%fe",
    b"/%c0%ae%c0%ae/outside",
    b"/" + b"k" * 10_240,
    b"/" + b"%41" * 3500,
]


@pytest.mark.parametrize("path", HOSTILE, ids=lambda p: p[:24].decode())
async def test_hostile_paths_are_4xx_and_stay_inside(tmp_path: Path, path: bytes) -> None:
    base = tmp_path / "served"
    storage = create_storage(FSDriver(base))
    await storage.set_item("inside", 1)
    try:
        with serving(storage) as url:
            for method in [b"GET", b"HEAD", b"PUT", b"DELETE", b"POST"]:
                request = (
                    method + b" " + path + b" HTTP/1.1\r\nHost: test\r\n"
                    b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                    b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
                )
                status, _ = await raw_request(url, request)
                assert 400 <= status < 500, (method, status)
        assert os.listdir(tmp_path) == ["served"]
        assert await storage.get_keys() == ["inside"]
    finally:
        await storage.dispose()
