"""The driver wrappers in the conformance matrix: each wrapper, both stacks of encryption
and compression, and a ``TieredDriver`` (a memory near cache in front of the driver as
its far driver), around every driver in :data:`WRAPPED_DRIVERS`.

A wrapped case reuses the plain driver's factory fixture and wraps each driver it makes
(``BackendSpec.wrap``), so a wrapper joins the matrix with one entry in :data:`WRAPPERS`.
"""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kvstorage import Driver
from kvstorage.cache import TieredDriver
from kvstorage.drivers import MemoryDriver
from kvstorage.wrappers import CompressedDriver, EncryptedDriver, InstrumentedDriver

#: The plain drivers that every wrapper runs over.
WRAPPED_DRIVERS = ("memory", "fs", "sqlite", "redis")

KEYS = [EncryptedDriver.generate_key(), EncryptedDriver.generate_key()]


def encrypted(inner: Driver) -> Driver:
    return EncryptedDriver(inner, keys=KEYS)


def compressed(inner: Driver) -> Driver:
    return CompressedDriver(inner, min_size=0)  # every value tries compression


def instrumented(inner: Driver) -> Driver:
    """Reporting to an SDK (so the instrumented code runs), into memory."""
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return InstrumentedDriver(
        inner, name="conformance", tracer_provider=tracer_provider, meter_provider=meter_provider
    )


def tiered(far: Driver) -> Driver:
    """A small near cache (evictions happen), in front of the driver."""
    return TieredDriver(near=MemoryDriver(max_entries=32), far=far, max_stale=5.0)


#: Wrapper name (as in test ids, outermost first) -> what wraps a driver.
WRAPPERS: dict[str, Callable[[Driver], Driver]] = {
    "encrypted": encrypted,
    "compressed": compressed,
    "instrumented": instrumented,
    "encrypted-compressed": lambda inner: encrypted(compressed(inner)),
    "compressed-encrypted": lambda inner: compressed(encrypted(inner)),
    "tiered": tiered,
}
