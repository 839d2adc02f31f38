"""Factory of MemoryDriver instances for the conformance suite."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from kvstorage.drivers import MemoryDriver

from . import DriverFactory


@pytest.fixture
async def memory_driver_factory() -> AsyncIterator[DriverFactory]:
    made: list[MemoryDriver] = []

    def make() -> MemoryDriver:
        driver = MemoryDriver()
        made.append(driver)
        return driver

    yield make
    for driver in made:
        await driver.dispose()
