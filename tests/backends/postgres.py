"""PostgreSQL for the tests: one throwaway cluster per session (``initdb`` into a temporary
directory, the server on a free loopback port, see :class:`tests.support.servers.
PostgresServer`), never the machine's own server.

* ``postgres_server``: the cluster, for the whole session.
* ``postgres_driver_factory``: PostgresDrivers on it, each with its own table; at the end
  each drops its own table (never anything else) and is disposed.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from kvstorage.drivers import PostgresDriver

from ..support.servers import PostgresServer, postgres_bindir
from . import DriverFactory, require_service


def require_postgres() -> None:
    require_service(postgres_bindir() is not None, "PostgreSQL (initdb, postgres)")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster for the whole session."""
    require_postgres()
    server = PostgresServer()
    server.start()
    yield server
    server.destroy()


def unique_table() -> str:
    return f"kvt_{uuid.uuid4().hex}"


async def drop_tables(url: str, tables: list[str]) -> None:
    """Drop the tables (and their schema rows) that a test created."""
    if not tables:
        return
    connection = await asyncpg.connect(url)
    try:
        # the schema table exists only once some driver has used the database
        schema = await connection.fetchval("SELECT to_regclass('kvstorage_schema')")
        for table in tables:
            await connection.execute(f'DROP TABLE IF EXISTS "{table}"')
            if schema is not None:
                await connection.execute("DELETE FROM kvstorage_schema WHERE name = $1", table)
    finally:
        await connection.close()


@pytest.fixture
async def postgres_driver_factory(
    postgres_server: PostgresServer,
) -> AsyncIterator[DriverFactory]:
    made: list[PostgresDriver] = []

    def make() -> PostgresDriver:
        driver = PostgresDriver(postgres_server.url, table=unique_table())
        made.append(driver)
        return driver

    yield make
    for driver in made:
        await driver.dispose()
    await drop_tables(postgres_server.url, [driver.table for driver in made])
