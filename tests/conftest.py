"""Shared fixtures: the driver matrix of the conformance suite.

A test that takes ``storage`` or ``make_driver`` runs once per (driver, anyio backend) pair
listed in ``tests.backends.BACKENDS`` -- and, when marked ``wrapped_drivers``, also in
``tests.backends.WRAPPED_BACKENDS`` (the driver wrappers around those drivers).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from kvstorage import Storage, create_storage

from .backends import BACKENDS, WRAPPED_BACKENDS, BackendSpec, DriverFactory

pytest_plugins = [f"tests.backends.{spec.name}" for spec in BACKENDS]

_CASES = [(spec, backend) for spec in BACKENDS for backend in spec.anyio_backends]
_WRAPPED_CASES = [(spec, backend) for spec in WRAPPED_BACKENDS for backend in spec.anyio_backends]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "driver_case" in metafunc.fixturenames:
        cases = _CASES
        if metafunc.definition.get_closest_marker("wrapped_drivers"):
            cases = _CASES + _WRAPPED_CASES
        only = metafunc.definition.get_closest_marker("only_drivers")
        if only is not None:  # one run per named driver, on asyncio
            cases = [(s, b) for s, b in cases if s.name in only.args and b == "asyncio"]
        metafunc.parametrize(
            "driver_case",
            cases,
            ids=[f"{spec.name}-{backend}" for spec, backend in cases],
            indirect=True,
        )


@pytest.fixture
def driver_case(request: pytest.FixtureRequest) -> tuple[BackendSpec, str]:
    case: tuple[BackendSpec, str] = request.param
    return case


@pytest.fixture
def anyio_backend(request: pytest.FixtureRequest) -> str:
    if "driver_case" in request.fixturenames:
        backend: str = request.getfixturevalue("driver_case")[1]
        return backend
    return "asyncio"


@pytest.fixture
def backend_spec(driver_case: tuple[BackendSpec, str]) -> BackendSpec:
    return driver_case[0]


@pytest.fixture
def make_driver(request: pytest.FixtureRequest, backend_spec: BackendSpec) -> DriverFactory:
    factory: DriverFactory = request.getfixturevalue(backend_spec.fixture)
    wrap = backend_spec.wrap
    if wrap is None:
        return factory
    return lambda: wrap(factory())


@pytest.fixture
async def storage(make_driver: DriverFactory) -> AsyncIterator[Storage]:
    store = create_storage(make_driver())
    yield store
    await store.dispose()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from .support.reliability import write_if_requested

    write_if_requested()
