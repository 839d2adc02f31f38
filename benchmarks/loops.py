"""The event loop the benchmarks run on: ``--loop asyncio`` (default) or ``--loop uvloop``."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

LOOPS = ("asyncio", "uvloop")


def run_on(loop: str, main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on a new event loop of the kind ``loop`` names (uvloop: the ``fast``
    extra) and return its result."""
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            main.close()
            sys.exit("--loop uvloop needs uvloop: pip install 'kvstorage[fast]'")
        return uvloop.run(main)
    if loop != "asyncio":
        main.close()
        raise ValueError(f"unknown event loop {loop!r}; known: {', '.join(LOOPS)}")
    return asyncio.run(main)
