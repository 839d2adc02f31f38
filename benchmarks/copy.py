"""``kvstorage copy`` from SQLite to Redis at scale: keys per second, the copying process's
peak memory (its maximum resident set, measured by the kernel), and a check that every
item arrived with its exact bytes and its remaining TTL (within 1 s).

The source holds session-like items (about 200 bytes of JSON): 40 % without expiry, 40 %
sharing an expiry per 1,000 (written together), 20 % with an expiry of their own -- so the
copy exercises its three write paths (batches, batches per shared expiry, concurrent
single writes). Run alone with ``python -m benchmarks.copy [N ...]``.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import anyio

from kvstorage import Storage, create_storage
from tests.support.servers import redis_server

from .workload import Row

ROOT = Path(__file__).resolve().parents[1]
_CHUNK = 1000


def _value(i: int) -> dict[str, object]:
    return {"user": i, "cart": [i % 7, i % 11], "csrf": uuid.UUID(int=i).hex, "pad": "s" * 120}


async def fill(storage: Storage, n: int) -> None:
    """Write ``n`` items ``k:<i>`` (see the module docstring for the mix of expiries)."""
    plain, shared = int(n * 0.4), int(n * 0.8)
    for start in range(0, plain, _CHUNK):
        stop = min(start + _CHUNK, plain)
        await storage.set_items({f"k:{i}": _value(i) for i in range(start, stop)})
    for number, start in enumerate(range(plain, shared, _CHUNK)):
        stop = min(start + _CHUNK, shared)
        items = {f"k:{i}": _value(i) for i in range(start, stop)}
        await storage.set_items(items, ttl=3600 + number)
    for i in range(shared, n):
        await storage.set_item(f"k:{i}", _value(i), ttl=7200 + i / 1000)


def copy(src_url: str, dst_url: str) -> tuple[float, float, str]:
    """Run ``python -m kvstorage copy`` (output to a pipe); (seconds, peak MiB, summary).

    The peak is the child's ``VmHWM`` (the high-water mark of its resident set since it
    started the command), read every 20 ms until it ends. Not ``wait4``'s ``ru_maxrss``:
    that also counts the pages the child shared with this process before ``exec``.
    """
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "kvstorage", "copy", src_url, dst_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    status = Path(f"/proc/{process.pid}/status")
    peak_kib = 0
    while process.poll() is None:  # output is one line: the pipes cannot fill meanwhile
        with contextlib.suppress(OSError):
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kib = max(peak_kib, int(line.split()[1]))
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    out, err = process.communicate()
    if process.returncode != 0:
        raise AssertionError(f"copy failed ({process.returncode}): {err.decode()[-500:]}")
    return seconds, peak_kib / 1024, out.decode().strip()


async def verify(src: Storage, dst: Storage, n: int) -> float:
    """Check every item of ``src`` against ``dst``; return the largest difference of
    expiry times (the remaining TTL moved by that much)."""
    worst = 0.0
    for start in range(0, n, _CHUNK):
        keys = [f"k:{i}" for i in range(start, min(start + _CHUNK, n))]
        mine, theirs = await src.get_entries_raw(keys), await dst.get_entries_raw(keys)
        for key in keys:
            ours, copied = mine[key], theirs[key]
            if ours is None or copied is None or ours.value != copied.value:
                raise AssertionError(f"{key} was not copied exactly")
            mine_at, copied_at = ours.meta.expires_at, copied.meta.expires_at
            if (mine_at is None) != (copied_at is None):
                raise AssertionError(f"{key} lost or gained an expiry")
            if mine_at is not None and copied_at is not None:
                worst = max(worst, abs((copied_at - mine_at).total_seconds()))
    if worst >= 1.0:
        raise AssertionError(f"a remaining TTL moved by {worst:.3f} s")
    if len(await dst.get_keys()) != n:
        raise AssertionError("the destination holds other keys than the source")
    return worst


async def run(sizes: list[int], redis_url: str, tmp: Path) -> list[Row]:
    """Copy ``n`` items SQLite -> Redis for each ``n`` in ``sizes``; one row each, its
    operation naming the copying process's maximum resident set and the largest expiry
    difference found."""
    rows = []
    for n in sizes:
        src_url = f"sqlite:///{tmp / f'copy-{n}-{uuid.uuid4().hex[:6]}.db'}"
        dst_url = f"{redis_url}?base=copy-{uuid.uuid4().hex[:8]}"
        src, dst = create_storage(src_url), create_storage(dst_url)
        try:
            await fill(src, n)
            seconds, peak, summary = await anyio.to_thread.run_sync(copy, src_url, dst_url)
            if summary != f"copied {n}, skipped 0, failed 0":
                raise AssertionError(f"unexpected summary: {summary}")
            worst = await verify(src, dst, n)
            operation = (
                f"copy sqlite→redis {n:,} keys (max RSS {peak:.0f} MiB, expiry Δ≤{worst:.2f} s)"
            )
            rows.append(Row("copy", operation, "kvstorage copy", "ours", n / seconds, seconds, n))
        finally:
            await dst.clear()
            await src.dispose()
            await dst.dispose()
    return rows


async def _main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.copy")
    parser.add_argument("sizes", nargs="*", type=int, default=[100_000, 1_000_000])
    args = parser.parse_args()
    with redis_server() as url, tempfile.TemporaryDirectory() as tmp:
        if url is None:
            raise SystemExit("redis-server is not installed")
        for row in await run(args.sizes, url, Path(tmp)):
            print(f"{row.operation}: {row.ops:,.0f} keys/s, {row.seconds:.1f} s")


if __name__ == "__main__":
    anyio.run(_main)
