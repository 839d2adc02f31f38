"""What a user installs, used the way a user would: run inside a fresh venv that has only
``pip install '.[all]'`` (no test or benchmark extras), it imports the package and writes,
reads, lists and removes through every driver -- the http driver against the installed
``kvstorage`` console script's ``serve``.

Usage: python clean_install.py REDIS_URL S3_ENDPOINT_URL POSTGRES_URL (servers started by
.ci/run).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile

import kvstorage
from kvstorage import create_storage
from kvstorage.drivers import (
    FSDriver,
    HTTPDriver,
    MemoryDriver,
    PostgresDriver,
    RedisDriver,
    S3Driver,
    SQLiteDriver,
)


async def exercise(name: str, driver: kvstorage.Driver) -> None:
    storage = create_storage(driver)
    async with storage:
        await storage.set_item("check:a", {"driver": name}, ttl=60)
        await storage.set_item("check:b", [1, 2], if_absent=True)
        assert await storage.get_item("check:a") == {"driver": name}, name
        assert await storage.get_items(["check:a", "check:b"]) == {
            "check:a": {"driver": name},
            "check:b": [1, 2],
        }, name
        assert sorted(await storage.get_keys("check")) == ["check:a", "check:b"], name
        await storage.clear("check")
        assert await storage.get_keys("check") == [], name
    print(f"ok {name}")


async def main(redis_url: str, s3_endpoint: str, postgres_url: str) -> None:
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    with tempfile.TemporaryDirectory() as directory:
        await exercise("memory", MemoryDriver())
        await exercise("fs", FSDriver(os.path.join(directory, "fs")))
        await exercise("sqlite", SQLiteDriver(os.path.join(directory, "kv.db")))
    await exercise("redis", RedisDriver(redis_url, base=f"clean-install-{os.getpid()}"))
    from aiobotocore.session import get_session

    async with get_session().create_client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1"
    ) as client:
        await client.create_bucket(Bucket="clean-install")
    await exercise("s3", S3Driver("clean-install", endpoint_url=s3_endpoint, region="us-east-1"))
    await exercise("postgres", PostgresDriver(postgres_url, table="clean_install"))


def served_over_http() -> None:
    """``kvstorage serve memory://`` through the installed console script, used with
    HTTPDriver; SIGTERM must end it with status 0."""
    script = os.path.join(os.path.dirname(sys.executable), "kvstorage")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "KVSTORAGE_TOKEN": "clean-install"}
    command = [script, "serve", "memory://", "--port", str(port)]
    with subprocess.Popen(command, stderr=subprocess.PIPE, env=env) as server:
        assert server.stderr is not None
        assert b"serving memory://" in server.stderr.readline()
        driver = HTTPDriver(f"http://127.0.0.1:{port}/check", token="clean-install")
        asyncio.run(exercise("http", driver))
        server.terminate()
        assert server.wait(10) == 0


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
    served_over_http()
