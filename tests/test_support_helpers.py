"""The tests' own timing helpers: a stall of the machine (simulated by blocking the event
loop) must not fail them, and a condition that never holds must."""

from __future__ import annotations

import time

import pytest

from .support.helpers import Stalls, eventually, loop_stalls

pytestmark = pytest.mark.anyio


async def test_eventually_is_not_failed_by_a_stall_past_its_deadline() -> None:
    polls: list[float] = []

    async def check() -> bool:  # true once the deadline has passed, after a stall
        polls.append(time.monotonic())
        if len(polls) == 2:
            time.sleep(0.4)  # noqa: ASYNC251 -- the machine stalls (the process gets no CPU)
        return len(polls) > 2

    await eventually(check, within=0.2)
    assert len(polls) == 3


async def test_eventually_fails_when_the_condition_never_holds() -> None:
    async def never() -> bool:
        return False

    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"within 0\.2 s"):
        await eventually(never, within=0.2)
    assert time.monotonic() - started >= 0.2


async def test_loop_stalls_counts_a_blocked_loop() -> None:
    async with loop_stalls() as stalls:
        started = time.monotonic()
        time.sleep(0.3)  # noqa: ASYNC251 -- a stall the ticker has had no turn to record
        ended = time.monotonic()  # (later than 0.3 s if the machine stalled too)
        assert 0.2 < stalls.between(started, ended) <= ended - started
        await eventually(lambda: _recorded(stalls))
        assert 0.2 < stalls.between(started, ended) <= ended - started
        assert stalls.between(ended, time.monotonic()) < 0.2  # the stall is over


async def _recorded(stalls: Stalls) -> bool:
    return bool(stalls.spans)
