"""Child processes for the crash, disk-full and multi-process tests: starting them, reading
their output, and the counter child that several tests share."""

from __future__ import annotations

import subprocess
import sys

import anyio
from anyio.abc import Process

from .helpers import ROOT

#: ``python -c COUNTER_CHILD <storage url> <count>``: opens the storage, prints "ready",
#: waits for a line on stdin, then increments "counter" ``count`` times with
#: ``update_item`` and prints "done".
COUNTER_CHILD = """
import asyncio, sys
from kvstorage import create_storage

async def main() -> None:
    storage = create_storage(sys.argv[1])
    await storage.has_item("counter")  # connect (and create tables) before "ready"
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(int(sys.argv[2])):
        await storage.update_item("counter", lambda n: (n or 0) + 1, retries=10_000)
    await storage.dispose()
    print("done", flush=True)

asyncio.run(main())
"""


async def spawn(code: str, *args: str) -> Process:
    """Run ``python -c code *args`` in the project root, with pipes for all three streams."""
    return await anyio.open_process(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )


async def read_lines(process: Process, count: int) -> list[str]:
    """The child's next ``count`` output lines (bounded by the caller's timeout); its
    stderr in the error when it ends before printing them."""
    assert process.stdout is not None
    received = b""
    while received.count(b"\n") < count:
        try:
            received += await process.stdout.receive()
        except anyio.EndOfStream:
            assert process.stderr is not None
            err = b"".join([chunk async for chunk in process.stderr])
            raise AssertionError(f"child ended early; stderr:\n{err.decode()}") from None
    return received.decode().splitlines()


async def run_at_once(code: str, *args: str, processes: int) -> list[list[str]]:
    """Run ``processes`` children ``python -c code *args`` that each print "ready" and then
    wait for a line on stdin: once all are ready, send each one "go". Returns each
    child's output lines after "ready"; fails unless each exits cleanly within 120 s."""
    children = [await spawn(code, *args) for _ in range(processes)]
    try:
        with anyio.fail_after(120):
            for child in children:
                assert await read_lines(child, 1) == ["ready"]
            for child in children:
                assert child.stdin is not None
                await child.stdin.send(b"go\n")
            outputs = []
            for child in children:
                assert child.stdout is not None
                output = b"".join([chunk async for chunk in child.stdout]).decode()
                assert await child.wait() == 0, output
                outputs.append(output.splitlines())
            return outputs
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
            await child.aclose()


async def run_counters(url: str, per_process: int, *, processes: int = 2) -> None:
    """Run ``processes`` COUNTER_CHILDs on the storage at ``url`` at once (each starts
    counting when all are ready); fail unless each exits cleanly within 120 s."""
    outputs = await run_at_once(COUNTER_CHILD, url, str(per_process), processes=processes)
    assert outputs == [["done"]] * processes
