"""InstrumentedDriver: OpenTelemetry spans and metrics for every operation of a driver
(``opentelemetry-api``; an SDK such as ``opentelemetry-sdk`` records and exports them).

Every operation gets a span ``kvstorage.<operation>`` (kind CLIENT) and a duration; reads
(``get``, ``get_many``, ``head``) count hits and misses; reads and writes count value
bytes. Attributes:

===========================  =============================================================
``kvstorage.operation``      ``get``, ``set``, ``get_many``, ``scan``, ... (the driver
                             operation, not the storage method)
``kvstorage.driver``         the inner driver's name (``redis``, ``memory``, ...)
``kvstorage.mount``          the ``name`` given to the wrapper (absent without one)
``error.type``               the exception class, on failed operations
===========================  =============================================================

Metrics: ``kvstorage.operation.duration`` (histogram, seconds), ``kvstorage.lookups``
(counter, attribute ``kvstorage.hit`` true or false) and ``kvstorage.bytes`` (counter,
attribute ``kvstorage.direction`` ``read`` or ``write``). Spans also carry
``kvstorage.keys``, ``kvstorage.hits`` and ``kvstorage.bytes``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import AbstractContextManager, aclosing, contextmanager
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.util.types import Attributes

from ..drivers.base import Driver, Record, Stat, is_expired
from .base import FORWARDED, WrapperDriver

__all__ = ["InstrumentedDriver"]

_INSTRUMENTED = tuple(op for op in FORWARDED if op not in ("watch", "dispose"))
_API_PROVIDERS = ("opentelemetry.trace", "opentelemetry.metrics")  # the API's no-op/proxies
_SECONDS = [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]


class InstrumentedDriver(WrapperDriver):
    """Reports every operation of ``inner`` to OpenTelemetry: spans and metrics.

    Args:
        inner: the driver to observe.
        name: the mount name to report (attribute ``kvstorage.mount``), e.g. ``"cache"``.
        tracer_provider, meter_provider: where to report; by default the global providers
            that an OpenTelemetry SDK sets up.

    Without providers given, the wrapper looks at the global ones once, at its first
    operation: if no SDK has set one up by then, every operation goes straight to
    ``inner`` from then on, at no cost. Set up the SDK before the storage is first used.
    """

    name = "instrumented"

    def __init__(
        self,
        inner: Driver,
        *,
        name: str | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        super().__init__(inner)
        #: The mount name reported with every operation, or None.
        self.mount_name = name
        self._telemetry: _Telemetry | None = None
        if tracer_provider is not None or meter_provider is not None:
            self._telemetry = _Telemetry(self, tracer_provider, meter_provider)
        else:
            for operation in _INSTRUMENTED:
                vars(self)[operation] = functools.partial(self._first_call, operation)

    def __repr__(self) -> str:
        name = f", name={self.mount_name!r}" if self.mount_name else ""
        return f"InstrumentedDriver({self.inner!r}{name})"

    @property
    def enabled(self) -> bool:
        """True when operations are reported (False until the first operation decides,
        when no providers were given)."""
        return self._telemetry is not None

    def _first_call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        """Decide, once, whether to report through the global providers; then run the
        operation that was called."""
        for name in _INSTRUMENTED:
            del vars(self)[name]
        if _sdk_configured():
            self._telemetry = _Telemetry(self, None, None)
        else:
            self.forward(_INSTRUMENTED)
        return getattr(self, operation)(*args, **kwargs)

    def _operation(
        self, operation: str, *, current: bool = True
    ) -> AbstractContextManager[_Operation]:
        assert self._telemetry is not None  # set, or this method is never reached
        return self._telemetry.operation(operation, current=current)

    async def get(self, key: str) -> Record | None:
        with self._operation("get") as op:
            record = await self.inner.get(key)
            op.read([record])
            return record

    async def get_many(self, keys: Sequence[str]) -> list[Record | None]:
        with self._operation("get_many") as op:
            records = await self.inner.get_many(keys)
            op.read(records)
            return records

    async def head(self, key: str) -> Stat | None:
        with self._operation("head") as op:
            stat = await self.inner.head(key)
            live = stat is not None and not is_expired(stat.expires_at)
            op.looked_up(int(live), 1)
            return stat

    async def set(
        self,
        key: str,
        value: bytes,
        *,
        expires_at: float | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> str | None:
        with self._operation("set") as op:
            etag = await self.inner.set(
                key, value, expires_at=expires_at, if_absent=if_absent, if_match=if_match
            )
            op.wrote(1, len(value))
            return etag

    async def set_many(
        self, items: Sequence[tuple[str, bytes]], *, expires_at: float | None = None
    ) -> None:
        with self._operation("set_many") as op:
            await self.inner.set_many(items, expires_at=expires_at)
            op.wrote(len(items), sum(len(value) for _, value in items))

    async def remove(self, key: str) -> bool:
        with self._operation("remove") as op:
            removed = await self.inner.remove(key)
            op.counted(1)
            return removed

    async def remove_many(self, keys: Sequence[str]) -> int:
        with self._operation("remove_many") as op:
            removed = await self.inner.remove_many(keys)
            op.counted(len(keys))
            return removed

    async def clear(self, base: str = "") -> None:
        with self._operation("clear"):
            await self.inner.clear(base)

    async def touch(self, key: str, *, expires_at: float | None) -> bool:
        with self._operation("touch") as op:
            touched = await self.inner.touch(key, expires_at=expires_at)
            op.counted(1)
            return touched

    async def sweep(self, base: str = "") -> int:
        with self._operation("sweep") as op:
            swept = await self.inner.sweep(base)
            op.counted(swept)
            return swept

    async def scan(
        self, base: str = "", *, max_depth: int | None = None
    ) -> AsyncGenerator[str, None]:
        # Not the current span: a generator's context cannot span its consumer's code.
        with self._operation("scan", current=False) as op:
            listed = 0
            try:
                async with aclosing(self.inner.scan(base, max_depth=max_depth)) as keys:
                    async for key in keys:
                        listed += 1
                        yield key
            except GeneratorExit:  # the consumer stopped early: not an error
                pass
            finally:
                op.counted(listed)


def _sdk_configured() -> bool:
    """True when a global tracer or meter provider is set up (not the API's no-op)."""
    providers = (trace.get_tracer_provider(), metrics.get_meter_provider())
    return any(not type(p).__module__.startswith(_API_PROVIDERS) for p in providers)


class _Telemetry:
    """The tracer and instruments of one wrapper, and its attributes per operation."""

    def __init__(
        self,
        driver: InstrumentedDriver,
        tracer_provider: trace.TracerProvider | None,
        meter_provider: metrics.MeterProvider | None,
    ) -> None:
        self.tracer = trace.get_tracer("kvstorage", tracer_provider=tracer_provider)
        meter = metrics.get_meter("kvstorage", meter_provider=meter_provider)
        self.duration = meter.create_histogram(
            "kvstorage.operation.duration",
            unit="s",
            description="Duration of driver operations",
            explicit_bucket_boundaries_advisory=_SECONDS,
        )
        self.lookups = meter.create_counter(
            "kvstorage.lookups", unit="{lookup}", description="Keys read: hits and misses"
        )
        self.bytes = meter.create_counter(
            "kvstorage.bytes", unit="By", description="Value bytes read and written"
        )
        common: dict[str, str] = {"kvstorage.driver": driver.inner.name}
        if driver.mount_name:
            common["kvstorage.mount"] = driver.mount_name
        self.attributes = {op: {"kvstorage.operation": op, **common} for op in _INSTRUMENTED}
        self.hit: Attributes = {**common, "kvstorage.hit": True}
        self.miss: Attributes = {**common, "kvstorage.hit": False}
        self.direction: dict[str, Attributes] = {
            way: {**common, "kvstorage.direction": way} for way in ("read", "write")
        }

    @contextmanager
    def operation(self, operation: str, *, current: bool) -> Iterator[_Operation]:
        """Time ``operation`` in a span; the block reports what it read and wrote."""
        attributes = self.attributes[operation]
        name = f"kvstorage.{operation}"
        kind = trace.SpanKind.CLIENT
        started = time.perf_counter()
        span_context = (
            self.tracer.start_as_current_span(name, kind=kind, attributes=attributes)
            if current
            else self.tracer.start_span(name, kind=kind, attributes=attributes)
        )
        failed: Attributes = attributes
        try:
            with span_context as span:
                yield _Operation(self, span)
        except BaseException as exc:
            failed = {**attributes, "error.type": type(exc).__qualname__}
            raise
        finally:
            self.duration.record(time.perf_counter() - started, failed)


class _Operation:
    """What one operation reports, besides its duration."""

    __slots__ = ("_span", "_telemetry")

    def __init__(self, telemetry: _Telemetry, span: trace.Span) -> None:
        self._telemetry = telemetry
        self._span = span

    def counted(self, keys: int) -> None:
        """The operation concerned ``keys`` keys."""
        self._span.set_attribute("kvstorage.keys", keys)

    def looked_up(self, hits: int, keys: int) -> None:
        """``hits`` of ``keys`` keys looked up were found."""
        self.counted(keys)
        self._span.set_attribute("kvstorage.hits", hits)
        telemetry = self._telemetry
        if hits:
            telemetry.lookups.add(hits, telemetry.hit)
        if keys > hits:
            telemetry.lookups.add(keys - hits, telemetry.miss)

    def read(self, records: Sequence[Record | None]) -> None:
        """These records were read (None: missing); expired ones count as misses."""
        now = time.time()
        found = [r.value for r in records if r is not None and not is_expired(r.expires_at, now)]
        self.looked_up(len(found), len(records))
        self._transferred("read", sum(map(len, found)))

    def wrote(self, keys: int, size: int) -> None:
        """``keys`` values of ``size`` bytes in all were written."""
        self.counted(keys)
        self._transferred("write", size)

    def _transferred(self, direction: str, size: int) -> None:
        self._span.set_attribute("kvstorage.bytes", size)
        if size:
            self._telemetry.bytes.add(size, self._telemetry.direction[direction])
