"""Shared fixtures: the driver matrix of the conformance suite.

A test that takes ``storage`` or ``make_driver`` runs once per (driver, anyio backend) pair
listed in ``tests.backends.BACKENDS`` -- and, when marked ``wrapped_drivers``, also in
``tests.backends.WRAPPED_BACKENDS`` (the driver wrappers around those drivers).

The drivers named in ``tests.backends.UVLOOP_DRIVERS`` also run once on asyncio with
uvloop's event loop (backend ``"uvloop"``, anyio's ``("asyncio", {"use_uvloop": True})``),
as do the Redis driver's own tests (tests/test_redis_driver.py). Each such test asserts
that its loop is uvloop's: it can never pass on plain asyncio instead.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Generator
from typing import Any

import pytest

from kvstorage import Storage, create_storage

from .backends import BACKENDS, UVLOOP, UVLOOP_DRIVERS, WRAPPED_BACKENDS, BackendSpec, DriverFactory

pytest_plugins = [f"tests.backends.{spec.name}" for spec in BACKENDS]

_CASES = [(spec, backend) for spec in BACKENDS for backend in spec.anyio_backends]
_CASES += [(spec, "uvloop") for spec in BACKENDS if spec.name in UVLOOP_DRIVERS]
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
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    if "driver_case" in request.fixturenames:
        backend: str = request.getfixturevalue("driver_case")[1]
        return UVLOOP if backend == "uvloop" else backend
    return "asyncio"


def assert_uvloop() -> None:
    """Fail unless the running event loop is uvloop's."""
    loop = asyncio.get_running_loop()
    assert type(loop).__module__.startswith("uvloop"), f"not on uvloop: {loop!r}"


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, Any, Any]:
    """A test meant for uvloop checks that it runs there (anyio would run it on a test
    runner already started by a wider-scoped fixture, whatever its loop)."""
    test = pyfuncitem.obj
    handle = getattr(test, "hypothesis", None)
    inner = None if handle is None else handle.inner_test
    if pyfuncitem.funcargs.get("anyio_backend") == UVLOOP:
        if handle is not None:  # the loop is checked in each example
            original = getattr(inner, "_anyio_original_func", inner)  # anyio's wrapper
            if inspect.iscoroutinefunction(original):
                handle.inner_test = _checked(original)
        elif inspect.iscoroutinefunction(test):
            pyfuncitem.obj = _checked(test)
    try:
        return (yield)
    finally:
        pyfuncitem.obj = test
        if handle is not None:
            handle.inner_test = inner


def _checked(test: Any) -> Any:
    @functools.wraps(test)
    async def on_uvloop(*args: Any, **kwargs: Any) -> Any:
        assert_uvloop()
        return await test(*args, **kwargs)

    return on_uvloop


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
