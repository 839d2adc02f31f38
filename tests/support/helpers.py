"""Small helpers shared by the tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
from hypothesis import strategies as st

#: The project's root directory (the working directory of child processes).
ROOT = Path(__file__).resolve().parents[2]


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
