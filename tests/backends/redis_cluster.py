"""A 3-node Redis Cluster for the tests (3 primaries, no replicas), started with
``redis-cli --cluster create`` on free loopback ports and stopped by pid at the end.

* :func:`start_cluster`: start one (the fault tests start their own, behind proxies).
* ``redis_cluster``: the cluster for the session.
* ``redis_cluster_driver_factory``: cluster RedisDrivers, each with its own ``base``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..support.servers import RedisServer, free_port
from . import DriverFactory, require_service
from .redis import drivers_at, require_redis

NODES = 3


@dataclass
class RedisCluster:
    """Three cluster-enabled redis-server processes forming one cluster."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def stop(self) -> None:
        """Stop every node by its pid."""
        for node in self.nodes:
            node.stop()


def _cluster_ok(port: int) -> bool:
    result = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), "cluster", "info"],
        capture_output=True,
        timeout=5,
        check=False,
    )
    return b"cluster_state:ok" in result.stdout


def require_redis_cluster() -> None:
    """Skip (fail in CI) unless redis-server and redis-cli are installed."""
    require_redis()
    require_service(shutil.which("redis-cli") is not None, "redis-cli")


def start_cluster(root: Path, announce_ports: Sequence[int] | None = None) -> RedisCluster:
    """Start :data:`NODES` nodes under ``root``, form a cluster of them and wait (bounded)
    until every node reports ``cluster_state:ok``.

    With ``announce_ports``, node ``i`` tells clients (CLUSTER SLOTS, MOVED) to connect to
    ``127.0.0.1:announce_ports[i]`` -- a proxy in front of it -- while the nodes' cluster
    bus stays direct. On failure every node started is stopped.
    """
    cluster = RedisCluster([])
    try:
        for i in range(NODES):
            port = free_port(with_bus=True)  # chosen once the previous node holds its own
            args: tuple[str, ...] = (
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{port}.conf",
            )
            if announce_ports is not None:
                args += (
                    "--cluster-announce-ip",
                    "127.0.0.1",
                    "--cluster-announce-port",
                    str(announce_ports[i]),
                    "--cluster-announce-bus-port",
                    str(port + 10000),
                )
            node = RedisServer(port, root / f"node{i}", args)
            cluster.nodes.append(node)
            node.start()
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                # the real ports: redis-cli reaches each node directly, the nodes meet
                # through their bus
                *(f"127.0.0.1:{node.port}" for node in cluster.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=60,
            check=True,
        )
        deadline = time.monotonic() + 30
        while not all(_cluster_ok(node.port) for node in cluster.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the redis cluster did not reach cluster_state:ok")
            time.sleep(0.05)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    require_redis_cluster()
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def redis_cluster_driver_factory(
    redis_cluster: RedisCluster,
) -> AsyncIterator[DriverFactory]:
    async for factory in drivers_at(redis_cluster.url):
        yield factory
