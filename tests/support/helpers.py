"""Small helpers shared by the tests."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
from hypothesis import strategies as st

#: The project's root directory (the working directory of child processes).
ROOT = Path(__file__).resolve().parents[2]


#: A wait of the event loop longer than what it asked for by more than this (seconds)
#: counts as a stall: the process was descheduled (or the loop blocked) meanwhile.
STALL = 0.05


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within: float = 5.0, interval: float = 0.02
) -> None:
    """Poll ``check`` until it returns True (a bounded poll, for effects that arrive
    asynchronously such as expiry or native watch events); fail after ``within`` s.

    Time the process did not run does not count against ``within``: only a check begun
    after the deadline can fail the poll (a stall during an earlier one cannot), and a
    sleep between checks that overran by more than ``STALL`` s moves the deadline by its
    overrun (the machine descheduled the process; the effect under test had no turn
    either). A check that hangs is left to pytest's timeout."""
    deadline = time.monotonic() + within
    while True:
        started = time.monotonic()
        if await check():
            return
        if started > deadline:
            raise AssertionError(f"condition not met within {within} s")
        slept = time.monotonic()
        await anyio.sleep(interval)
        overrun = time.monotonic() - slept - interval
        if overrun > STALL:
            deadline += overrun


class Stalls:
    """The stalls of the event loop seen by :func:`loop_stalls`'s ticker: the spans
    (monotonic time) during which it did not run for more than ``STALL`` s beyond its tick."""

    def __init__(self, tick: float = 0.01) -> None:
        self.tick = tick
        self.spans: list[tuple[float, float]] = []
        self.last_tick = time.monotonic()
        self.ticking = False  # while loop_stalls runs

    def between(self, start: float, end: float) -> float:
        """Seconds of ``start``..``end`` (monotonic) the loop spent stalled, counting a
        stall still under way (one the ticker has had no turn to record yet)."""
        spans = list(self.spans)
        now = time.monotonic()
        if self.ticking and now - self.last_tick > self.tick + STALL:
            spans.append((self.last_tick + self.tick, now))
        return sum(max(0.0, min(end, e) - max(start, s)) for s, e in spans)


@asynccontextmanager
async def loop_stalls(tick: float = 0.01) -> AsyncIterator[Stalls]:
    """Record, while the block runs, when the event loop stalled: a call's own time is
    its elapsed time less :meth:`Stalls.between` its start and end. Lets a test bound
    how long a call takes without failing when the machine stalls meanwhile."""
    stalls = Stalls(tick)

    async def ticker(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        stalls.last_tick, stalls.ticking = time.monotonic(), True
        task_status.started()
        while True:
            before = time.monotonic()
            await anyio.sleep(tick)
            stalls.last_tick = after = time.monotonic()
            if after - before > tick + STALL:
                stalls.spans.append((before + tick, after))

    async with anyio.create_task_group() as group:
        await group.start(ticker)
        try:
            yield stalls
        finally:
            stalls.ticking = False
            group.cancel_scope.cancel()


def assert_redacted(text: str, secret: str = "s3cret") -> None:
    """Fail unless ``text`` (a repr, an error, a log line) hides ``secret`` as ``***``."""
    assert secret not in text, text
    assert "***" in text, text


#: Any JSON value (finite floats, str keys), nested a few levels.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
