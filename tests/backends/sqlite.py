"""Factory of SQLiteDriver instances for the conformance suite: every driver gets its own
table in one database file under ``tmp_path``, so the suite also checks that tables sharing
a file stay apart."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvstorage.drivers import SQLiteDriver

from . import DriverFactory


@pytest.fixture
async def sqlite_driver_factory(tmp_path: Path) -> AsyncIterator[DriverFactory]:
    made: list[SQLiteDriver] = []
    numbers = itertools.count()

    def make() -> SQLiteDriver:
        driver = SQLiteDriver(tmp_path / "kv.db", table=f"kv{next(numbers)}")
        made.append(driver)
        return driver

    yield make
    for driver in made:
        await driver.dispose()
