"""The read batcher that SQLite and Redis share, on its own: what its readers see when reads
overlap, fail, are cancelled, or move to another event loop. (The drivers' own tests check
the batches their backends receive.)"""

from __future__ import annotations

import asyncio

import pytest

from kvstorage.drivers._batching import ReadBatcher

pytestmark = pytest.mark.anyio


class Backend:
    """Values ``key.upper()``; a single read waits for ``release`` so that others overlap."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.singles: list[str] = []
        self.batches: list[list[str]] = []
        self.fail_batches = False

    async def read_one(self, key: str) -> str:
        self.singles.append(key)
        await self.release.wait()
        return key.upper()

    async def read_many(self, keys: list[str]) -> list[str]:
        self.batches.append(list(keys))
        if self.fail_batches:
            raise OSError("batch failed")
        return [key.upper() for key in keys]


async def _started() -> None:
    """Let every task make its read and the batch start."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_one_read_goes_alone_and_the_overlapping_ones_in_one_batch() -> None:
    backend = Backend()
    batcher = ReadBatcher(backend.read_one, backend.read_many)
    keys = ["a", "b", "c", "b"]
    tasks = [asyncio.create_task(_read(batcher, key)) for key in keys]
    await _started()
    backend.release.set()
    assert await asyncio.gather(*tasks) == ["A", "B", "C", "B"]
    assert backend.singles == ["a"]
    assert backend.batches == [["b", "c", "b"]]
    assert await _read(batcher, "d") == "D" and backend.singles == ["a", "d"]


async def test_a_failed_batch_fails_each_of_its_readers_and_not_the_single_read() -> None:
    backend = Backend()
    backend.fail_batches = True
    batcher = ReadBatcher(backend.read_one, backend.read_many)
    tasks = [asyncio.create_task(_read(batcher, key)) for key in "xyz"]
    await _started()
    backend.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0] == "X"
    assert [str(result) for result in results[1:]] == ["batch failed", "batch failed"]


async def test_readers_of_a_batch_cancelled_before_it_started_are_cancelled() -> None:
    backend = Backend()
    batcher = ReadBatcher(backend.read_one, backend.read_many)
    tasks = [asyncio.create_task(_read(batcher, key)) for key in "xyz"]
    await asyncio.sleep(0)  # every read made: the batch is queued, not started
    batcher.cancel()
    backend.release.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert results[0] == "X"
    assert all(isinstance(result, asyncio.CancelledError) for result in results[1:])
    assert backend.batches == []
    assert await _read(batcher, "w") == "W"  # nothing is left counted as under way


async def test_a_cancelled_reader_leaves_the_rest_of_its_batch_alone() -> None:
    backend = Backend()
    batcher = ReadBatcher(backend.read_one, backend.read_many)
    tasks = [asyncio.create_task(_read(batcher, key)) for key in "abcd"]
    await asyncio.sleep(0)
    tasks[2].cancel()
    backend.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[:2] + results[3:] == ["A", "B", "D"]
    assert isinstance(results[2], asyncio.CancelledError)


def test_a_batch_of_a_closed_loop_takes_no_reads_of_the_next_one() -> None:
    backend = Backend()
    batcher = ReadBatcher(backend.read_one, backend.read_many)

    leftovers: set[asyncio.Task[str]] = set()

    async def stranded() -> None:
        # A single read under way and a batch queued when the loop stops.
        leftovers.add(asyncio.create_task(_read(batcher, "a")))
        await asyncio.sleep(0)
        leftovers.add(asyncio.create_task(_read(batcher, "b")))

    loop = asyncio.new_event_loop()
    loop.run_until_complete(stranded())
    loop.close()
    assert backend.singles == ["a"] and backend.batches == []  # b's batch never started

    async def later() -> list[str]:
        backend.release = asyncio.Event()
        backend.release.set()
        return await asyncio.gather(*(_read(batcher, key) for key in "cde"))

    assert asyncio.run(asyncio.wait_for(later(), 5)) == ["C", "D", "E"]
    for task in [*leftovers, *batcher._tasks]:  # what the closed loop never ran, closed quietly
        task.get_coro().close()


async def _read(batcher: ReadBatcher[str], key: str) -> str:
    return await batcher.read(key)
