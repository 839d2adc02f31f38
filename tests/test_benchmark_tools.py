"""The benchmark's own instruments, which decide whether a target is met."""

from __future__ import annotations

import asyncio
import time

import pytest

from benchmarks.workload import LoopLag

pytestmark = pytest.mark.anyio


async def test_loop_lag_sees_a_call_that_blocks_the_loop() -> None:
    async with LoopLag() as lag:
        await asyncio.sleep(0.01)
        assert lag.take()[0] is not None and lag.take() == (None, None)  # taken: emptied
        for _ in range(5):  # (an iteration the system preempted too is left out)
            time.sleep(0.02)  # noqa: ASYNC251 -- blocking the loop (a voluntary wait): counted
            await asyncio.sleep(0)
        longest, p99 = lag.take()
    assert longest is not None and p99 is not None
    assert longest >= 20


async def test_loop_lag_leaves_out_the_iteration_that_took_the_figures() -> None:
    async with LoopLag() as lag:
        for _ in range(3):
            await asyncio.sleep(0)
        assert lag.take()[0] is not None
        time.sleep(0.02)  # noqa: ASYNC251 -- the benchmark's bookkeeping, in take()'s iteration
        for _ in range(3):
            await asyncio.sleep(0)
        longest, _ = lag.take()
    assert longest is not None and longest < 20
