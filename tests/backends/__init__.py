"""Driver factories for the shared conformance suite.

Adding a driver to the suite is one module here plus one line in ``BACKENDS``: the module
defines a pytest fixture (named in the spec) that returns a :data:`DriverFactory`, a
function producing a new, empty, isolated driver each time it is called (a new base,
table, prefix or directory), and disposes what it made when the test ends.

``WRAPPED_BACKENDS`` runs the same factories with each driver wrapper around the driver
(see :mod:`tests.backends.wrapped`), for tests marked ``wrapped_drivers``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import pytest

from kvstorage import Driver
from kvstorage.drivers import (
    FSDriver,
    HTTPDriver,
    MemoryDriver,
    PostgresDriver,
    RedisDriver,
    S3Driver,
    SQLiteDriver,
)

DriverFactory = Callable[[], Driver]

#: anyio's backend for a run on uvloop's event loop (the ``fast`` extra).
UVLOOP = ("asyncio", {"use_uvloop": True})
#: The drivers whose matrix tests also run on uvloop (backend ``"uvloop"``): the in-process
#: reference and the driver with a hand-written wire path (the lane).
UVLOOP_DRIVERS = ("memory", "redis")

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@dataclass(frozen=True)
class BackendSpec:
    """One driver in the conformance matrix."""

    name: str
    fixture: str
    driver: type[Driver]
    wrap: Callable[[Driver], Driver] | None = None
    """Wraps every driver the fixture makes (a driver wrapper), or None."""

    @property
    def anyio_backends(self) -> tuple[str, ...]:
        """Every anyio backend the driver runs on (from its capabilities)."""
        return ("asyncio",) if self.driver.capabilities.asyncio_only else ("asyncio", "trio")


BACKENDS: list[BackendSpec] = [
    BackendSpec("memory", "memory_driver_factory", MemoryDriver),
    BackendSpec("fs", "fs_driver_factory", FSDriver),
    BackendSpec("sqlite", "sqlite_driver_factory", SQLiteDriver),
    BackendSpec("s3", "s3_driver_factory", S3Driver),
    BackendSpec("redis", "redis_driver_factory", RedisDriver),
    BackendSpec("redis_cluster", "redis_cluster_driver_factory", RedisDriver),
    BackendSpec("postgres", "postgres_driver_factory", PostgresDriver),
    BackendSpec("http", "http_driver_factory", HTTPDriver),
]


def _wrapped_backends() -> list[BackendSpec]:
    from .wrapped import WRAPPED_DRIVERS, WRAPPERS

    return [
        replace(spec, name=f"{wrapper}-{spec.name}", wrap=wrap)
        for wrapper, wrap in WRAPPERS.items()
        for spec in BACKENDS
        if spec.name in WRAPPED_DRIVERS
    ]


#: Every wrapper (and stack of wrappers) around the drivers it is tested on.
WRAPPED_BACKENDS = _wrapped_backends()


def require_service(available: bool, what: str) -> None:
    """Skip a test whose service is missing -- but fail in CI, where it must exist."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI but is not available")
    pytest.skip(f"{what} is not available")


async def clearing_factory(create: Callable[[int], Driver]) -> AsyncIterator[DriverFactory]:
    """A factory of the drivers ``create(n)`` returns (``n``: how many were made before);
    at the end each one clears its own keys (never anything else) and is disposed. For
    backends shared by every test (a server), where each driver has its own namespace."""
    made: list[Driver] = []

    def make() -> Driver:
        driver = create(len(made))
        made.append(driver)
        return driver

    yield make
    for driver in made:
        await driver.clear()
        await driver.dispose()
