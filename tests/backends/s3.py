"""Factory of S3Driver instances for the conformance suite, against moto's S3 server.

One moto server (``tests.support.servers``) per test session on a free loopback port
(real HTTP, real request signing); every test gets a fresh bucket and every driver its
own prefix in it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from ..support.servers import moto_server
from . import DriverFactory, require_service

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
REGION = "us-east-1"
_session: Any = None


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server running for the whole session (dummy credentials set in
    the environment meanwhile)."""
    with moto_server() as endpoint:
        require_service(endpoint is not None, "moto (pip install 'moto[server]')")
        assert endpoint is not None
        saved = {name: os.environ.get(name) for name in CREDENTIALS}
        os.environ.update(CREDENTIALS)
        try:
            yield endpoint
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture
async def s3_client(s3_endpoint: str) -> AsyncIterator[Any]:
    """A raw aiobotocore S3 client on the moto server."""
    global _session
    if _session is None:  # one session: it caches the parsed service model (~0.1 s)
        from aiobotocore.session import get_session

        _session = get_session()
    async with _session.create_client("s3", region_name=REGION, endpoint_url=s3_endpoint) as client:
        yield client


@pytest.fixture
async def s3_bucket(s3_client: Any) -> AsyncIterator[str]:
    """A fresh, empty bucket, deleted with everything in it after the test."""
    bucket = f"test-{uuid.uuid4().hex}"
    await s3_client.create_bucket(Bucket=bucket)
    yield bucket
    paginator = s3_client.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=bucket):
        objects = [{"Key": item["Key"]} for item in page.get("Contents", ())]
        if objects:
            await s3_client.delete_objects(Bucket=bucket, Delete={"Objects": objects})
    await s3_client.delete_bucket(Bucket=bucket)


@pytest.fixture
async def s3_driver_factory(s3_endpoint: str, s3_bucket: str) -> AsyncIterator[DriverFactory]:
    from kvstorage.drivers import S3Driver

    made: list[S3Driver] = []

    def make() -> S3Driver:
        driver = S3Driver(
            s3_bucket, prefix=f"p{len(made)}", endpoint_url=s3_endpoint, region=REGION
        )
        made.append(driver)
        return driver

    yield make
    for driver in made:
        await driver.dispose()
