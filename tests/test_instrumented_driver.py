"""InstrumentedDriver: spans and metrics checked with the OpenTelemetry SDK's in-memory
exporter and reader; and no work at all without an SDK. (The conformance suite runs it over
every driver.)"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from kvstorage import ConditionFailedError, Storage, create_storage
from kvstorage.drivers import MemoryDriver
from kvstorage.wrappers import InstrumentedDriver
from kvstorage.wrappers.base import FORWARDED

from .support.helpers import ROOT

pytestmark = pytest.mark.anyio


@dataclass
class Observed:
    """A storage on an instrumented memory driver mounted as ``cache``, and what the SDK
    recorded from it."""

    storage: Storage
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    tracer_provider: TracerProvider

    def finished(self, operation: str) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == f"kvstorage.{operation}"]

    def points(self, metric: str) -> list[tuple[dict[str, Any], Any]]:
        """(attributes, data point) of every point of ``metric``."""
        data = self.metrics.get_metrics_data()
        assert data is not None
        return [
            (dict(point.attributes or {}), point)
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for found in scope.metrics
            if found.name == metric
            for point in found.data.data_points
        ]

    def total(self, metric: str, **attributes: Any) -> int:
        """The sum of the counter ``metric`` over points with these attributes."""
        wanted = {f"kvstorage.{k}": v for k, v in attributes.items()}
        return sum(
            int(point.value)
            for attrs, point in self.points(metric)
            if wanted.items() <= attrs.items()
        )


@pytest.fixture
async def observed() -> AsyncIterator[Observed]:
    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    driver = InstrumentedDriver(
        MemoryDriver(),
        name="cache",
        tracer_provider=tracer_provider,
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    storage = create_storage()
    storage.mount("cache", driver)
    yield Observed(storage, spans, reader, tracer_provider)
    await storage.dispose()


async def test_each_operation_has_a_span_and_metrics(observed: Observed) -> None:
    storage = observed.storage
    await storage.set_item("cache:a", "x" * 10)  # 12 bytes of JSON
    await storage.set_items({"cache:b": 1, "cache:c": [1, 2]})  # 1 + 5 bytes
    assert await storage.get_item("cache:a") == "x" * 10
    assert await storage.get_item("cache:missing") is None
    assert await storage.get_items(["cache:b", "cache:missing", "cache:c"]) == {
        "cache:b": 1,
        "cache:missing": None,
        "cache:c": [1, 2],
    }
    assert await storage.has_item("cache:b")
    assert sorted(await storage.get_keys("cache")) == ["cache:a", "cache:b", "cache:c"]
    assert await storage.remove_item("cache:a")
    assert await storage.touch("cache:b", ttl=60)

    [hit, miss] = observed.finished("get")
    assert hit.attributes == {
        "kvstorage.operation": "get",
        "kvstorage.driver": "memory",
        "kvstorage.mount": "cache",
        "kvstorage.keys": 1,
        "kvstorage.hits": 1,
        "kvstorage.bytes": 12,
    }
    assert hit.kind is trace.SpanKind.CLIENT
    assert miss.attributes is not None and miss.attributes["kvstorage.hits"] == 0
    [batch] = observed.finished("get_many")
    assert batch.attributes is not None
    assert (batch.attributes["kvstorage.keys"], batch.attributes["kvstorage.hits"]) == (3, 2)
    [scan] = observed.finished("scan")
    assert scan.attributes is not None and scan.attributes["kvstorage.keys"] == 3
    for operation in ("set", "set_many", "head", "remove", "touch"):
        assert len(observed.finished(operation)) == 1, operation
    assert all(
        s.status.status_code is StatusCode.UNSET for s in observed.spans.get_finished_spans()
    )

    # hits: get a, get_many b and c, head b; misses: get and get_many of "missing"
    assert observed.total("kvstorage.lookups", hit=True) == 4
    assert observed.total("kvstorage.lookups", hit=False) == 2
    assert observed.total("kvstorage.lookups", mount="cache", driver="memory") == 6
    assert observed.total("kvstorage.bytes", direction="write") == 12 + 1 + 5
    assert observed.total("kvstorage.bytes", direction="read") == 12 + 1 + 5
    durations = {
        attrs["kvstorage.operation"]: point
        for attrs, point in observed.points("kvstorage.operation.duration")
    }
    assert set(durations) == {
        "set", "set_many", "get", "get_many", "head", "scan", "remove", "touch"
    }  # fmt: skip
    assert durations["get"].count == 2
    assert 0 < durations["get"].sum < 1.0  # seconds


async def test_a_failed_operation_is_an_error_span_and_counted(observed: Observed) -> None:
    await observed.storage.set_item("cache:lock", 1)
    with pytest.raises(ConditionFailedError):
        await observed.storage.set_item("cache:lock", 2, if_absent=True)
    failed = observed.finished("set")[-1]
    assert failed.status.status_code is StatusCode.ERROR
    assert [event.name for event in failed.events] == ["exception"]
    errors = [
        point.count
        for attrs, point in observed.points("kvstorage.operation.duration")
        if attrs.get("error.type") == "ConditionFailedError"
    ]
    assert errors == [1]


async def test_spans_are_children_of_the_callers_span(observed: Observed) -> None:
    tracer = observed.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("request") as request:
        await observed.storage.get_item("cache:x")
    [get] = observed.finished("get")
    assert get.parent is not None
    assert get.parent.span_id == request.get_span_context().span_id


async def test_a_listing_stopped_early_is_not_an_error(observed: Observed) -> None:
    await observed.storage.set_items({f"cache:k{i}": i for i in range(10)})
    async with aclosing(observed.storage.iter_keys("cache")) as keys:
        async for _ in keys:
            break
    [scan] = observed.finished("scan")
    assert scan.status.status_code is StatusCode.UNSET
    # the core lists in pages: the span counts the keys the driver handed over
    assert scan.attributes is not None and 1 <= scan.attributes["kvstorage.keys"] <= 10


async def test_without_an_sdk_operations_go_straight_to_the_inner_driver() -> None:
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider), "no SDK here"
    inner = MemoryDriver()
    driver = InstrumentedDriver(inner, name="cache")
    storage = create_storage(driver)
    await storage.set_item("a", 1)
    assert not driver.enabled
    for operation in FORWARDED:
        assert getattr(driver, operation) == getattr(inner, operation), operation
    assert await storage.get_item("a") == 1
    assert [key async for key in storage.iter_keys()] == ["a"]


#: Wraps a driver, *then* sets up a global SDK, then uses the storage: the wrapper decides
#: at its first operation, so it reports.
LATE_SDK = """
import asyncio, json
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from kvstorage import create_storage
from kvstorage.drivers import MemoryDriver
from kvstorage.wrappers import InstrumentedDriver

storage = create_storage(InstrumentedDriver(MemoryDriver(), name="late"))
spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(spans))
trace.set_tracer_provider(provider)
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

async def main():
    await storage.set_item("a", 1)
    await storage.get_item("a")
    names = [metric.name for r in reader.get_metrics_data().resource_metrics
             for s in r.scope_metrics for metric in s.metrics]
    print(json.dumps([sorted(s.name for s in spans.get_finished_spans()), sorted(names)]))

asyncio.run(main())
"""


async def test_a_global_sdk_set_up_before_the_first_operation_is_used() -> None:
    result = await anyio.run_process([sys.executable, "-c", LATE_SDK], cwd=ROOT)
    assert json.loads(result.stdout) == [
        ["kvstorage.get", "kvstorage.set"],
        ["kvstorage.bytes", "kvstorage.lookups", "kvstorage.operation.duration"],
    ]
