"""Small helpers shared by the tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within: float = 5.0, interval: float = 0.02
) -> None:
    """Poll ``check`` until it returns True (a bounded poll, for effects that arrive
    asynchronously such as expiry or native watch events); fail after ``within`` s."""
    with anyio.move_on_after(within):
        while not await check():  # noqa: ASYNC110 - polling a backend, no event to wait on
            await anyio.sleep(interval)
        return
    raise AssertionError(f"condition not met within {within} s")
