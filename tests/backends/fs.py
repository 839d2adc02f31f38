"""Factory of FSDriver instances for the conformance suite: each driver gets a fresh
subdirectory of the test's ``tmp_path``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvstorage.drivers import FSDriver

from . import DriverFactory


@pytest.fixture
async def fs_driver_factory(tmp_path: Path) -> AsyncIterator[DriverFactory]:
    made: list[FSDriver] = []

    def make() -> FSDriver:
        driver = FSDriver(tmp_path / f"fs{len(made)}")
        made.append(driver)
        return driver

    yield make
    for driver in made:
        await driver.dispose()
