"""An HTTP load generator on loopback: many clients, each with its own session."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anyio
import httpx


@dataclass
class LoadResult:
    """What one load run measured."""

    requests: int = 0
    errors_5xx: int = 0
    other_errors: int = 0
    lost_writes: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def percentile(self, p: float) -> float:
        """Latency percentile ``p`` (0-100) in milliseconds."""
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds


async def run_load(base_url: str, *, clients: int, requests_per_client: int) -> LoadResult:
    """Each client increments its own session counter ``requests_per_client`` times (one
    read every fifth request) and checks every answer: a counter that does not grow by
    exactly one is a lost write."""
    result = LoadResult()
    limits = httpx.Limits(max_connections=1)

    async def client_loop() -> None:
        async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:
            expected = 0
            for i in range(requests_per_client):
                path = "/count" if i % 5 == 4 else "/incr"
                started = time.perf_counter()
                try:
                    response = await client.get(path)
                except httpx.HTTPError:
                    result.other_errors += 1
                    continue
                result.latencies.append(time.perf_counter() - started)
                result.requests += 1
                if response.status_code >= 500:
                    result.errors_5xx += 1
                    continue
                if path == "/incr":
                    expected += 1
                if int(response.text) != expected:
                    result.lost_writes += 1
                    expected = int(response.text)

    started = time.perf_counter()
    async with anyio.create_task_group() as group:
        for _ in range(clients):
            group.start_soon(client_loop)
    result.seconds = time.perf_counter() - started
    return result
