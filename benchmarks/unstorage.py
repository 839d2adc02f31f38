"""unstorage (Node.js) running the same workload, as a peer column.

Needs ``node`` and ``npm``; unstorage (and ioredis for the redis driver) is installed with
npm into ``~/.cache/kvstorage-bench/node`` on first use (``tests.support.node``). Without
node/npm, or when the install fails, the peer is skipped with a message.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio

from tests.support.node import CACHE, install_unstorage, node_script

from .workload import Row

SCRIPT = Path(__file__).with_name("node") / "unstorage_bench.mjs"


async def run(driver: str, n: int, where: str = "") -> tuple[list[Row], str | None]:
    """Run the workload on unstorage's ``driver``; return rows, or a reason to skip."""
    problem = await anyio.to_thread.run_sync(install_unstorage)
    if problem is not None:
        return [], problem
    script = node_script(SCRIPT)  # run from the cache so `unstorage` resolves
    result = await anyio.run_process(
        ["node", str(script), driver, str(n), where], check=False, cwd=CACHE
    )
    if result.returncode != 0:
        return [], f"unstorage run failed: {result.stderr.decode()[-300:]}"
    figures: dict[str, float] = json.loads(result.stdout)
    rows = [
        Row(driver, operation, "unstorage (node)", "peer", ops, n / ops, n)
        for operation, ops in figures.items()
    ]
    return rows, None
