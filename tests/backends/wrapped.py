"""The driver wrappers in the conformance matrix: each wrapper, and both stacks of
encryption and compression, around every driver in :data:`WRAPPED_DRIVERS`.

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


#: Wrapper name (as in test ids, outermost first) -> what wraps a driver.
WRAPPERS: dict[str, Callable[[Driver], Driver]] = {
    "encrypted": encrypted,
    "compressed": compressed,
    "instrumented": instrumented,
    "encrypted-compressed": lambda inner: encrypted(compressed(inner)),
    "compressed-encrypted": lambda inner: compressed(encrypted(inner)),
}
