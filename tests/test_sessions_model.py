"""A model-based test of concurrent login flows: clients (one user each) run random
requests, regenerations, logouts and revocations of each other at the same time, on a
driver that adds random scheduling points around every call. At the end:

* no session that was ended (its client logged out, or its user was revoked) is alive
  again -- whatever regenerate or write was in flight;
* every client nobody ended still has its session, bound to its user, with every value
  it wrote (no lost writes);
* after a sweep, every user-index entry points at a live session (no orphans).
"""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstorage import Driver, Record, Stat
from sessions import SessionManager
from sessions.store import handle_of

from .backends import DriverFactory

pytestmark = pytest.mark.anyio

CLIENTS = 4


class JitterDriver(Driver):
    """A real driver with random scheduling points before and after every call, so
    concurrent requests interleave differently on every example."""

    def __init__(self, inner: Driver, rng: random.Random) -> None:
        self.inner = inner
        self.rng = rng
        self.capabilities = inner.capabilities
        self.name = inner.name  # type: ignore[misc]

    async def _jitter(self) -> None:
        for _ in range(self.rng.randrange(4)):
            await anyio.lowlevel.checkpoint()

    async def get(self, key: str) -> Record | None:
        await self._jitter()
        found = await self.inner.get(key)
        await self._jitter()
        return found

    async def head(self, key: str) -> Stat | None:
        await self._jitter()
        return await self.inner.head(key)

    async def set(self, key: str, value: bytes, **options: Any) -> None:
        await self._jitter()
        await self.inner.set(key, value, **options)
        await self._jitter()

    async def remove(self, key: str) -> bool:
        await self._jitter()
        return await self.inner.remove(key)

    async def scan(self, base: str = "", *, max_depth: int | None = None) -> AsyncGenerator[str]:
        await self._jitter()
        async for key in self.inner.scan(base, max_depth=max_depth):
            yield key

    async def get_many(self, keys: Sequence[str]) -> list[Record | None]:
        await self._jitter()
        return await self.inner.get_many(keys)

    async def sweep(self, base: str = "") -> int:
        return await self.inner.sweep(base)

    async def dispose(self) -> None:
        await self.inner.dispose()


@dataclass
class Client:
    """A browser of one user: its cookie, what it wrote, and whether it was ended."""

    user: str
    cookie: str | None = None
    written: set[str] = field(default_factory=set)
    ended: bool = False


async def request(manager: SessionManager, client: Client, action: str, arg: str) -> None:
    """One request of ``client``, committed as the middleware would."""
    session = manager.open(client.cookie)
    if action == "set":
        await session.set(arg, arg)
    elif action == "regenerate":
        await session.regenerate()
    elif action == "logout":
        await session.destroy()
    for header in await manager.commit(session):
        value = header.split(";", 1)[0].split("=", 1)[1]
        client.cookie = value or None
    if action == "set" and client.cookie is not None:
        client.written.add(arg)
    if action == "logout":
        client.ended = True
        client.written.clear()


ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["set", "set", "set", "regenerate", "logout", "revoke", "device"]),
        st.integers(0, CLIENTS - 1),
    ),
    min_size=1,
    max_size=6,
)


async def run_model(make_driver: DriverFactory, seed: int, plans: list[list[Any]]) -> None:
    manager = SessionManager(JitterDriver(make_driver(), random.Random(seed)))
    clients = [Client(f"user{i}") for i in range(CLIENTS)]
    for client in clients:  # everybody is logged in (bound) before anything else runs
        session = manager.open(None)
        await session.regenerate()
        await session.set_user(client.user)
        [header] = await manager.commit(session)
        client.cookie = header.split(";", 1)[0].split("=", 1)[1]

    async def play(me: Client, plan: list[Any]) -> None:
        for step, (action, other_index) in enumerate(plan):
            other = clients[other_index]
            if action in ("set", "regenerate", "logout"):
                if not me.ended or action != "set":
                    await request(manager, me, action, f"k{step}")
            elif action == "revoke" and other is not me:
                other.ended = True  # bound before this call: it must end
                await manager.revoke_user(other.user)
            elif action == "device" and other is not me:
                for info in await manager.sessions_of(other.user):
                    if await manager.revoke(info.handle):
                        other.ended = True

    async with anyio.create_task_group() as group:
        for client, plan in zip(clients, plans, strict=True):
            group.start_soon(play, client, plan)

    for client in clients:
        live = await manager.sessions_of(client.user)
        session = manager.open(client.cookie)
        assert await session.has("nothing") is False  # loads it
        if client.ended:
            assert live == [], client
            assert session.user_id != client.user, client
        else:
            assert len(live) == 1 and client.cookie is not None, client
            assert live[0].handle == handle_of(client.cookie)
            assert session.user_id == client.user
            assert set(await session.keys()) == client.written, client
    await manager.sweep()
    for _, handles in await manager.store.index_entries():
        for handle in handles:
            stored = await manager.store.read(handle)
            assert stored is not None and stored.live, handle
    await manager.dispose()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(seed=st.integers(0, 2**32), plans=st.lists(ACTIONS, min_size=CLIENTS, max_size=CLIENTS))
async def test_concurrent_logins_logouts_and_revocations(
    make_driver: DriverFactory, seed: int, plans: list[list[Any]]
) -> None:
    await run_model(make_driver, seed, plans)
