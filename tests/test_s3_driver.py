"""S3Driver specifics, against moto's S3 server (see tests/backends/s3.py)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from kvstorage import ConditionFailedError, DriverError, DriverUnavailableError, create_storage
from kvstorage.drivers import S3Driver, from_url

from .backends.s3 import REGION
from .support.helpers import eventually
from .support.servers import free_port

pytestmark = pytest.mark.anyio

AWKWARD_KEYS = [
    "100%",
    "a%20b:%41",
    "q?x=1&y=2",
    "frag#ment",
    "with space:and  two",
    "plus+sign",
    "tilde~'quote'(paren)*star!",
    "ünïcödé:żółw:🐢",
    "semi;colon,comma=eq@at$dollar",
    'back`tick^caret{brace}[bracket]<lt>|pipe"dq',
    "trailing.dot.:..x:.hidden",
]


@pytest.fixture
async def driver(s3_endpoint: str, s3_bucket: str) -> AsyncIterator[S3Driver]:
    driver = S3Driver(s3_bucket, prefix="app", endpoint_url=s3_endpoint, region=REGION)
    yield driver
    await driver.dispose()  # idempotent: also closes what a failing test left open


async def _names(client: Any, bucket: str) -> list[str]:
    names = []
    paginator = client.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=bucket):
        names += [item["Key"] for item in page.get("Contents", ())]
    return sorted(names)


async def _body(client: Any, bucket: str, name: str) -> tuple[bytes, dict[str, str]]:
    response = await client.get_object(Bucket=bucket, Key=name)
    async with response["Body"] as body:
        return await body.read(), response["Metadata"]


# -- namespace and names ---------------------------------------------------------------


async def test_prefix_isolates_keys(driver: S3Driver, s3_client: Any, s3_bucket: str) -> None:
    outside = ["app", "app2/x", "apple", "other/app/x", "x"]
    for name in outside:
        await s3_client.put_object(Bucket=s3_bucket, Key=name, Body=b"foreign")
    store = create_storage(driver)
    await store.set_items({"x": 1, "a:b": 2})
    assert sorted(await store.get_keys()) == ["a:b", "x"]
    assert await store.get_item("x") == 1
    await store.clear()
    assert await store.get_keys() == []
    assert await _names(s3_client, s3_bucket) == outside
    await store.dispose()


async def test_object_names_use_slashes_under_the_prefix(
    driver: S3Driver, s3_client: Any, s3_bucket: str
) -> None:
    store = create_storage(driver)
    await store.set_item("users:42:profile", {"name": "Ada"})
    assert await _names(s3_client, s3_bucket) == ["app/users/42/profile"]
    body, _ = await _body(s3_client, s3_bucket, "app/users/42/profile")
    assert json.loads(body) == {"name": "Ada"}  # the trailer is JSON whitespace
    await store.dispose()


async def test_awkward_keys_round_trip(driver: S3Driver, s3_client: Any, s3_bucket: str) -> None:
    store = create_storage(driver)
    await store.set_items({key: key for key in AWKWARD_KEYS})
    assert sorted(await store.get_keys()) == sorted(AWKWARD_KEYS)
    assert await store.get_items(AWKWARD_KEYS) == {key: key for key in AWKWARD_KEYS}
    names = await _names(s3_client, s3_bucket)
    assert len(names) == len(AWKWARD_KEYS)
    assert "app/100%25" in names
    assert "app/a%2520b/%2541" in names
    assert all(name.isascii() and name.startswith("app/") for name in names)
    assert sorted(await store.get_keys("a%20b")) == ["a%20b:%41"]
    assert await store.get_keys("a b") == []
    await store.clear("ünïcödé")
    assert not await store.has_item("ünïcödé:żółw:🐢")
    assert len(await store.get_keys()) == len(AWKWARD_KEYS) - 1
    await store.dispose()


async def test_foreign_objects_under_the_prefix_are_skipped(
    driver: S3Driver, s3_client: Any, s3_bucket: str
) -> None:
    foreign = ["app/a%41", "app/dir/", "app/x:y", "app/a//b", "app/%2E%2E", "app/%zz", "app/.."]
    for name in foreign:
        await s3_client.put_object(Bucket=s3_bucket, Key=name, Body=b"foreign")
    await s3_client.put_object(Bucket=s3_bucket, Key="app/plain", Body=b"by another tool")
    store = create_storage(driver)
    await store.set_item("mine", 1)
    assert sorted(await store.get_keys()) == ["mine", "plain"]
    assert await store.get_item_raw("plain") == b"by another tool"  # no trailer to strip
    await store.clear()
    assert await _names(s3_client, s3_bucket) == sorted(foreign)


@pytest.mark.slow
async def test_more_than_one_page_of_keys(driver: S3Driver, s3_client: Any, s3_bucket: str) -> None:
    store = create_storage(driver)
    keys = [f"many:{i:04d}" for i in range(1005)]
    await store.set_items(dict.fromkeys(keys, 0))
    await store.set_item("many:ttl", 1, ttl=60)
    assert sorted(await store.get_keys("many")) == sorted([*keys, "many:ttl"])
    streamed = 0
    async for _ in store.iter_keys("many"):
        streamed += 1
    assert streamed == 1006
    assert await store.remove_items([*keys[:1001], "many:missing"]) == 1001
    assert sorted(await store.get_keys()) == sorted([*keys[1001:], "many:ttl"])
    await store.set_items(dict.fromkeys(keys[:1001], 1))
    await store.clear("many")
    assert await store.get_keys() == []
    assert await _names(s3_client, s3_bucket) == []
    await store.dispose()


# -- etags, TTL and conditions ---------------------------------------------------------


async def test_rewriting_the_same_bytes_changes_the_s3_etag(
    driver: S3Driver, s3_client: Any, s3_bucket: str
) -> None:
    store = create_storage(driver)
    etags = set()
    for _ in range(3):
        await store.set_item_raw("e", b"same")
        etags.add((await s3_client.head_object(Bucket=s3_bucket, Key="app/e"))["ETag"])
        meta = await store.get_meta("e")
        assert meta is not None and meta.size == 4
    assert len(etags) == 3
    await store.dispose()


async def test_stale_etag_fails_after_a_rewrite_of_the_same_bytes(driver: S3Driver) -> None:
    store = create_storage(driver)
    await store.set_item("k", "v")
    stale = (await store.get_meta("k")).etag  # type: ignore[union-attr]
    await store.set_item("k", "v")
    with pytest.raises(ConditionFailedError):
        await store.set_item("k", "other", if_match=stale)
    assert await store.get_item("k") == "v"
    await store.dispose()


async def test_ttl_lives_in_metadata_and_marks_the_size(
    driver: S3Driver, s3_client: Any, s3_bucket: str
) -> None:
    store = create_storage(driver)
    for value in [b"", b"1", b"12", b"123"]:
        before = time.time()  # bounds relative to it: a stall meanwhile cannot fail them
        await store.set_item_raw("t", value, ttl=60)
        body, metadata = await _body(s3_client, s3_bucket, "app/t")
        assert len(body) % 2 == 1 and body.startswith(value)
        assert before + 59.99 < float(metadata["kv-expires"]) <= time.time() + 60
        meta = await store.get_meta("t")
        assert meta is not None and meta.size == len(value) and meta.ttl is not None
        assert before + 59.99 - time.time() < meta.ttl <= 60
        await store.set_item_raw("t", value)
        body, metadata = await _body(s3_client, s3_bucket, "app/t")
        assert len(body) % 2 == 0 and "kv-expires" not in metadata
        assert body[len(value) :].strip() == b""
    await store.dispose()


async def test_expired_objects_are_hidden_and_swept(
    driver: S3Driver, s3_client: Any, s3_bucket: str
) -> None:
    store = create_storage(driver)
    await store.set_items({"s:a": 1, "s:b": 2}, ttl=0.2)
    await store.set_item("s:keep", 3, ttl=60)
    await store.set_item("other", 4, ttl=0.2)

    async def gone() -> bool:  # "other" too: it was written last, so it expires last
        return await store.get_keys("s") == ["s:keep"] and not await store.has_item("other")

    await eventually(gone, within=3.0)
    assert await store.get_item("s:a") is None
    assert len(await _names(s3_client, s3_bucket)) == 4  # still stored
    assert await store.sweep("s") == 2
    assert await _names(s3_client, s3_bucket) == ["app/other", "app/s/keep"]
    assert await store.sweep() == 1
    assert await store.sweep() == 0
    assert await _names(s3_client, s3_bucket) == ["app/s/keep"]
    await store.dispose()


async def test_remove_counts_live_objects_and_deletes_expired_ones(
    driver: S3Driver, s3_client: Any, s3_bucket: str
) -> None:
    store = create_storage(driver)
    await store.set_item("dead", 1, ttl=1)
    await store.set_items({"a": 1, "b": 2})

    async def expired() -> bool:
        return not await store.has_item("dead")

    await eventually(expired, within=3.0)
    assert await store.remove_item("dead") is False
    assert await store.remove_items(["a", "a", "/a/", "b", "nope"]) == 2
    assert await _names(s3_client, s3_bucket) == []
    await store.dispose()


async def test_if_absent_replaces_an_expired_object_once(driver: S3Driver) -> None:
    store = create_storage(driver)
    written = time.monotonic()
    await store.set_item("lock", True, ttl=1)
    try:
        await store.set_item("lock", True, if_absent=True, ttl=1)
    except ConditionFailedError:
        pass
    else:  # only once the first had expired: the machine stalled for its whole ttl
        assert time.monotonic() - written >= 1

    async def expired() -> bool:
        return not await store.has_item("lock")

    await eventually(expired, within=3.0)
    winners = []

    async def claim(i: int) -> None:
        try:
            await store.set_item("lock", True, if_absent=True, ttl=60)  # same bytes for all
        except ConditionFailedError:
            return
        winners.append(i)

    async with anyio.create_task_group() as group:
        for i in range(10):
            group.start_soon(claim, i)
    assert len(winners) == 1
    assert await store.get_item("lock") is True
    await store.dispose()


async def test_if_match_refuses_an_expired_version(driver: S3Driver) -> None:
    store = create_storage(driver)
    while True:  # written again if a stall outlasted the ttl before the read
        written = time.monotonic()
        await store.set_item("k", 1, ttl=1)
        if (meta := await store.get_meta("k")) is not None:
            break
        assert time.monotonic() - written >= 1
    etag = meta.etag

    async def expired() -> bool:
        return not await store.has_item("k")

    await eventually(expired, within=3.0)
    with pytest.raises(ConditionFailedError):
        await store.set_item("k", 2, if_match=etag)
    with pytest.raises(ConditionFailedError):
        await store.set_item("k", 2, if_match="garbage@not-a-number")
    assert not await store.has_item("k")
    await store.dispose()


async def test_without_server_conditions_the_core_emulates_them(
    s3_endpoint: str, s3_bucket: str
) -> None:
    driver = S3Driver(s3_bucket, endpoint_url=s3_endpoint, region=REGION, conditional_writes=False)
    store = create_storage(driver)

    async def increment() -> None:
        await store.update_item("n", lambda n: (n or 0) + 1)

    async with anyio.create_task_group() as group:
        for _ in range(10):
            group.start_soon(increment)
    assert await store.get_item("n") == 10
    with pytest.raises(ConditionFailedError):
        await store.set_item("n", 0, if_absent=True)
    await store.dispose()


# -- clients, URLs and errors ----------------------------------------------------------


async def test_a_given_client_is_not_closed(s3_client: Any, s3_bucket: str) -> None:
    driver = S3Driver(s3_bucket, prefix="given", client=s3_client)
    store = create_storage(driver)
    await store.set_item("k", 1)
    await store.dispose()
    await store.dispose()
    response = await s3_client.head_object(Bucket=s3_bucket, Key="given/k")
    assert response["ContentLength"] > 0


async def test_dispose_closes_the_own_client_and_reconnects(driver: S3Driver) -> None:
    store = create_storage(driver)
    await store.set_item("k", 1)
    await store.dispose()
    assert await store.get_item("k") == 1  # a new client on next use
    await store.dispose()


async def test_from_url(s3_endpoint: str, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/deep/prefix/?endpoint_url={s3_endpoint}&region={REGION}"
    driver = from_url(url)
    assert isinstance(driver, S3Driver)
    assert (driver.bucket, driver.prefix, driver.endpoint_url) == (
        s3_bucket,
        "deep/prefix/",
        s3_endpoint,
    )
    store = create_storage(url)
    await store.set_item("a", 1)
    assert await store.get_keys() == ["a"]
    await store.dispose()
    emulated = from_url(f"s3://{s3_bucket}?conditional_writes=false&max_concurrency=4")
    assert isinstance(emulated, S3Driver) and emulated.max_concurrency == 4
    assert not emulated.capabilities.conditions and driver.capabilities.conditions
    with pytest.raises(ValueError, match="bogus"):
        from_url(f"s3://{s3_bucket}?bogus=1")
    with pytest.raises(ValueError, match="bucket"):
        from_url("s3:///prefix")


async def test_unreachable_endpoint_names_it(s3_endpoint: str) -> None:
    from aiobotocore.config import AioConfig

    endpoint = f"http://127.0.0.1:{free_port()}"
    config = AioConfig(retries={"max_attempts": 1}, connect_timeout=2)
    driver = S3Driver("bucket", endpoint_url=endpoint, client_options={"config": config})
    store = create_storage(driver)
    with pytest.raises(DriverUnavailableError, match=endpoint):
        await store.get_item("k")
    with pytest.raises(DriverUnavailableError, match=endpoint):
        await store.set_item("k", 1)
    await store.dispose()


async def test_missing_bucket_is_a_driver_error(s3_endpoint: str) -> None:
    driver = S3Driver("no-such-bucket-here", endpoint_url=s3_endpoint, region=REGION)
    store = create_storage(driver)
    with pytest.raises(DriverError, match="NoSuchBucket"):
        await store.set_item("k", 1)
    with pytest.raises(DriverError, match="NoSuchBucket"):
        await store.get_keys()
    await store.dispose()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_is_refused_clearly(s3_endpoint: str) -> None:
    store = create_storage(S3Driver("bucket", endpoint_url=s3_endpoint))
    with pytest.raises(DriverError, match="only on asyncio"):
        await store.get_item("k")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        S3Driver("")
    with pytest.raises(ValueError):
        S3Driver("b", max_concurrency=0)
    assert S3Driver("b", prefix="/x/y/").prefix == "x/y/"
    assert S3Driver("b", prefix="").prefix == ""
