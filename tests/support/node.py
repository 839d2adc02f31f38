"""unstorage for Node.js, installed from the npm registry into a cache folder on first use
(``~/.cache/kvstorage-bench/node``, kept between runs), for the interop tests and the
benchmarks' peer column."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CACHE = Path.home() / ".cache" / "kvstorage-bench" / "node"
PACKAGES = ["unstorage@1", "ioredis@5"]
SCRIPTS = Path(__file__).with_name("node")


def install_unstorage() -> str | None:
    """Install unstorage into :data:`CACHE` unless it is there; return why it cannot be
    used (no node/npm, a failed install) or None."""
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


def node_script(source: Path) -> Path:
    """``source`` copied into :data:`CACHE`, where ``import "unstorage"`` resolves."""
    target = CACHE / source.name
    target.write_text(source.read_text())
    return target
