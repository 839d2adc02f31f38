"""Hostile input through the public API, on every driver: arbitrary key text either raises
InvalidKeyError or round-trips exactly (and lists as its normalized form)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstorage import InvalidKeyError, SerializationError, Storage, normalize_key

from .backends import BackendSpec
from .support.reliability import record

pytestmark = pytest.mark.anyio

NASTY_KEYS = [
    "%2e%2e",
    "%2e%2e/%2e%2e/etc/passwd",
    "..%2f..%2f",
    "a/..%00/b",
    "*",
    "a*b",
    "?",
    "[a-z]",
    "\\[",
    "key with spaces",
    "+plus+",
    "#hash",
    "&amp;",
    "emoji 🐢",
    "ŻÓŁW",
    "\u202eRTL",
    "a" * 200 + ":" + "b" * 200,
    "CON",
    "nul.txt",
    ".hidden",
    "trailing.",
    "~user",
    "$HOME",
    "'quote\"",
    "back`tick",
    "tab-less",
]


@pytest.mark.parametrize("key", NASTY_KEYS)
async def test_awkward_keys_round_trip(
    storage: Storage, backend_spec: BackendSpec, key: str
) -> None:
    record("hostile", backend_spec.name, awkward_keys=1)
    await storage.set_item(key, key)
    assert await storage.get_item(key) == key
    assert await storage.get_keys() == [normalize_key(key)]
    assert await storage.remove_item(key)
    assert await storage.get_keys() == []


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.text(max_size=40))
async def test_property_any_key_is_rejected_or_round_trips(
    storage: Storage, backend_spec: BackendSpec, key: str
) -> None:
    record("hostile", backend_spec.name, fuzzed_keys=1)
    try:
        await storage.set_item(key, {"k": key})
    except InvalidKeyError:
        record("hostile", backend_spec.name, fuzzed_keys_rejected=1)
        with pytest.raises(InvalidKeyError):
            await storage.get_item(key)
        return
    try:
        assert await storage.get_item(key) == {"k": key}
        assert normalize_key(key) in await storage.get_keys()
    finally:
        await storage.remove_item(key)


async def test_deeply_nested_value_is_a_clean_error(storage: Storage) -> None:
    deep: Any = "leaf"
    for _ in range(50_000):
        deep = {"d": deep}
    with pytest.raises(SerializationError):
        await storage.set_item("deep", deep)
    assert not await storage.has_item("deep")


async def test_invalid_utf8_raw_values_round_trip(storage: Storage) -> None:
    await storage.set_item_raw("raw", b"\xff\xfe\xc3\x28 not utf-8")
    assert await storage.get_item_raw("raw") == b"\xff\xfe\xc3\x28 not utf-8"
    with pytest.raises(SerializationError):
        await storage.get_item("raw")
