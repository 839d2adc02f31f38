"""A 3-node Redis Cluster for the tests (3 primaries, no replicas), started with
``redis-cli --cluster create`` on free loopback ports and stopped by pid at the end.

* ``redis_cluster``: the cluster for the session.
* ``redis_cluster_driver_factory``: cluster RedisDrivers, each with its own ``base``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from . import DriverFactory, require_service
from .redis import RedisServer, drivers_at, free_port, require_redis


@dataclass
class RedisCluster:
    """Three cluster-enabled redis-server processes forming one cluster."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)


def _cluster_ok(port: int) -> bool:
    result = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), "cluster", "info"],
        capture_output=True,
        timeout=5,
        check=False,
    )
    return b"cluster_state:ok" in result.stdout


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    require_redis()
    require_service(shutil.which("redis-cli") is not None, "redis-cli")
    root = tmp_path_factory.mktemp("redis-cluster")
    nodes = []
    for i in range(3):
        port = free_port(with_bus=True)
        args = ("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf")
        nodes.append(RedisServer(port, root / f"node{i}", args))
    cluster = RedisCluster(nodes)
    try:
        for node in nodes:
            node.start()
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=60,
            check=True,
        )
        deadline = time.monotonic() + 30
        while not all(_cluster_ok(node.port) for node in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the redis cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        yield cluster
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
async def redis_cluster_driver_factory(
    redis_cluster: RedisCluster,
) -> AsyncIterator[DriverFactory]:
    async for factory in drivers_at(redis_cluster.url):
        yield factory
