"""unstorage (Node.js) running the same workload, as a peer column.

Needs ``node`` and ``npm``; unstorage (and ioredis for the redis driver) is installed with
npm into ``~/.cache/kvstorage-bench/node`` on first use. Without node/npm, or when the
install fails, the peer is skipped with a message.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import anyio

from .workload import Row

CACHE = Path.home() / ".cache" / "kvstorage-bench" / "node"
SCRIPT = Path(__file__).with_name("node") / "unstorage_bench.mjs"
PACKAGES = ["unstorage@1", "ioredis@5"]


def _install() -> str | None:
    """Install unstorage into the cache folder; return an error message or None."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node/npm not found"
    if (CACHE / "node_modules" / "unstorage").is_dir():
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "package.json").write_text('{"private": true, "type": "module"}')
    result = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--silent", *PACKAGES],
        cwd=CACHE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return None if result.returncode == 0 else f"npm install failed: {result.stderr[-300:]}"


async def run(driver: str, n: int, where: str = "") -> tuple[list[Row], str | None]:
    """Run the workload on unstorage's ``driver``; return rows, or a reason to skip."""
    problem = await anyio.to_thread.run_sync(_install)
    if problem is not None:
        return [], problem
    script = CACHE / SCRIPT.name
    script.write_text(SCRIPT.read_text())  # run from the cache so `unstorage` resolves
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
