"""Hypothesis stateful test (RuleBasedStateMachine) on every driver.

The operations and the dict model are those of ``tests/test_model.py``; here hypothesis
drives them as a state machine, shrinking a failing run to the shortest sequence of
steps. The storage runs on an event loop in a blocking portal thread, because rules of a
state machine are synchronous. ``KVSTORAGE_LONG_TESTS=1`` runs more and longer examples.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from kvstorage import Driver, Storage, create_storage, prefix_storage
from kvstorage.drivers import (
    FSDriver,
    MemoryDriver,
    PostgresDriver,
    RedisDriver,
    S3Driver,
    SQLiteDriver,
)

from .backends.postgres import drop_tables, unique_table
from .backends.s3 import REGION
from .support.reliability import record
from .test_model import LONG, Model, apply, check, operations

DRIVERS = ["memory", "fs", "sqlite", "redis", "s3", "postgres"]


@pytest.fixture
def make_driver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Driver]]:
    """A factory of fresh, isolated drivers named by the test's ``name`` parameter."""
    name: str = request.getfixturevalue("name")
    counter = itertools.count()
    if name == "memory":
        yield MemoryDriver
    elif name == "fs":
        yield lambda: FSDriver(tmp_path / f"fs{next(counter)}")
    elif name == "sqlite":
        yield lambda: SQLiteDriver(tmp_path / "kv.db", table=f"kv{next(counter)}")
    elif name == "redis":
        url = request.getfixturevalue("redis_server").url
        yield lambda: RedisDriver(url, base=f"sm-{uuid.uuid4().hex}")
    elif name == "s3":
        endpoint: str = request.getfixturevalue("s3_endpoint")
        bucket = f"sm-{uuid.uuid4().hex[:12]}"
        yield from _s3_drivers(endpoint, bucket)
    elif name == "postgres":
        url = request.getfixturevalue("postgres_server").url
        tables: list[str] = []

        def postgres() -> PostgresDriver:
            tables.append(unique_table())
            return PostgresDriver(url, table=tables[-1])

        yield postgres
        asyncio.run(drop_tables(url, tables))
    else:  # pragma: no cover
        raise ValueError(name)


def _s3_drivers(endpoint: str, bucket: str) -> Iterator[Callable[[], Driver]]:
    import botocore.session

    # the s3_endpoint fixture has set the credentials for the whole session
    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, region_name=REGION
    )
    client.create_bucket(Bucket=bucket)
    yield lambda: S3Driver(
        bucket, prefix=f"sm-{uuid.uuid4().hex[:8]}", endpoint_url=endpoint, region=REGION
    )


class StorageMachine(RuleBasedStateMachine):
    """Random operations through the root and a view, a second driver mounted at ``m``,
    the storage checked against a dict after every step."""

    portal: BlockingPortal
    make: Callable[[], Driver]
    subject: str

    def __init__(self) -> None:
        super().__init__()
        self.storage: Storage = self.portal.call(self._open)
        self.view = prefix_storage(self.storage, "v")
        self.model = Model()
        record("model", f"{self.subject} (state machine)", examples=1)

    async def _open(self) -> Storage:
        storage = create_storage(self.make())
        storage.mount("m", self.make())
        return storage

    @rule(through_view=st.booleans(), op=operations)
    def step(self, through_view: bool, op: tuple[Any, ...]) -> None:
        record("model", f"{self.subject} (state machine)", steps=1)
        if through_view:
            self.portal.call(apply, op, self.view, lambda k: f"v:{k}" if k else "v", self.model)
        else:
            self.portal.call(apply, op, self.storage, lambda k: k, self.model)

    @invariant()
    def matches_the_model(self) -> None:
        self.portal.call(check, self.storage, self.model)

    def teardown(self) -> None:
        async def close() -> None:
            await self.storage.clear()
            await self.storage.dispose()

        self.portal.call(close)


@pytest.mark.parametrize("name", DRIVERS)
def test_state_machine(name: str, make_driver: Callable[[], Driver]) -> None:
    with start_blocking_portal("asyncio") as portal:
        machine = type(
            f"{name.title()}Machine",
            (StorageMachine,),
            {"portal": portal, "make": staticmethod(make_driver), "subject": name},
        )
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=100 if LONG else (5 if name == "s3" else 10),
                stateful_step_count=50 if LONG else 15,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            ),
        )
