"""The back-off between two tries of an optimistic (etag-conditioned) write.

``Storage.update_item`` and the sessions' commit both re-read and retry when a concurrent
writer changed the item first; both wait with :func:`backoff` so contending writers spread
out instead of colliding again on the next loop tick.
"""

from __future__ import annotations

import random

import anyio

__all__ = ["backoff"]


async def backoff(attempt: int) -> None:
    """Sleep a random time in ``[0, min(0.5 ms * 2**attempt, 20 ms))`` (full jitter)."""
    await anyio.sleep(random.random() * min(0.0005 * 2**attempt, 0.02))
