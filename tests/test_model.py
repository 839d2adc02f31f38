"""Model-based test: random operation sequences on every driver, checked after every step
against a plain dict.

The storage under test has a second driver mounted at ``m`` and is used both directly and
through a ``prefix_storage`` view at ``v``, so routing, masking and views are exercised
too. Set ``KVSTORAGE_LONG_TESTS=1`` for a longer run.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstorage import ConditionFailedError, Storage, create_storage, prefix_storage

from .backends import BackendSpec, DriverFactory
from .support.reliability import record

pytestmark = pytest.mark.anyio

LONG = os.environ.get("KVSTORAGE_LONG_TESTS") == "1"
segments = st.sampled_from(["a", "b", "m", "v", "x"])
keys = st.lists(segments, min_size=1, max_size=3).map(":".join)
values = (
    st.none() | st.integers(-5, 5) | st.text(max_size=3) | st.lists(st.integers(0, 3), max_size=2)
)
bases = st.sampled_from(["", "a", "m", "v", "x:a", "m:a"])

operations = st.one_of(
    st.tuples(st.just("set"), keys, values, st.booleans()),
    st.tuples(st.just("set_items"), st.dictionaries(keys, values, max_size=4)),
    st.tuples(st.just("remove"), keys),
    st.tuples(st.just("remove_items"), st.lists(keys, max_size=4)),
    st.tuples(st.just("clear"), bases),
    st.tuples(st.just("update"), keys),
    st.tuples(st.just("if_absent"), keys, values),
    st.tuples(st.just("if_match"), keys, values, st.booleans()),
)


class Model:
    """The expected contents, as a dict of full keys, and how a view maps keys."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def under(self, base: str) -> list[str]:
        return sorted(k for k in self.data if not base or k.startswith(base + ":"))


async def apply(op: tuple[Any, ...], store: Storage, full: Any, model: Model) -> None:
    """Apply ``op`` to ``store`` and to the model (``full`` maps a key to its full key)."""
    kind = op[0]
    if kind == "set":
        _, key, value, with_ttl = op
        await store.set_item(key, value, ttl=3600 if with_ttl else None)
        model.data[full(key)] = value
    elif kind == "set_items":
        await store.set_items(op[1])
        model.data.update({full(k): v for k, v in op[1].items()})
    elif kind == "remove":
        existed = full(op[1]) in model.data
        assert await store.remove_item(op[1]) is existed
        model.data.pop(full(op[1]), None)
    elif kind == "remove_items":
        unique = {full(k) for k in op[1]}
        expected = sum(1 for k in unique if k in model.data)
        assert await store.remove_items(op[1]) == expected
        for key in unique:
            model.data.pop(key, None)
    elif kind == "clear":
        await store.clear(op[1])
        prefix = full(op[1]) if op[1] else full("")
        for key in model.under(prefix):
            del model.data[key]
    elif kind == "update":
        new = await store.update_item(op[1], lambda v: (v if isinstance(v, int) else 0) + 1)
        model.data[full(op[1])] = new
    elif kind == "if_absent":
        _, key, value = op
        if full(key) in model.data:
            with pytest.raises(ConditionFailedError):
                await store.set_item(key, value, if_absent=True)
        else:
            await store.set_item(key, value, if_absent=True)
            model.data[full(key)] = value
    elif kind == "if_match":
        _, key, value, stale = op
        entry = await store.get_entry(key)
        if entry is None:
            return
        if stale:
            await store.set_item(key, entry.value)  # a concurrent writer changes the etag
            with pytest.raises(ConditionFailedError):
                await store.set_item(key, value, if_match=entry.etag)
        else:
            await store.set_item(key, value, if_match=entry.etag)
            model.data[full(key)] = value


async def check(storage: Storage, model: Model) -> None:
    """Everything the storage reports must equal the model."""
    assert sorted(await storage.get_keys()) == sorted(model.data)
    listed = await storage.get_items(list(model.data))
    assert listed == model.data
    for key, value in model.data.items():
        assert await storage.has_item(key)
        assert await storage.get_item(key, default="<missing>") == value
    view = prefix_storage(storage, "v")
    assert sorted(await view.get_keys()) == sorted(k[2:] for k in model.under("v"))


@settings(
    max_examples=200 if LONG else 12,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    steps=st.lists(st.tuples(st.booleans(), operations), min_size=1, max_size=60 if LONG else 25)
)
async def test_random_operations_match_a_dict(
    make_driver: DriverFactory,
    backend_spec: BackendSpec,
    steps: list[tuple[bool, tuple[Any, ...]]],
) -> None:
    record("model", backend_spec.name, examples=1, steps=len(steps))
    storage = create_storage(make_driver())
    storage.mount("m", make_driver())
    view = prefix_storage(storage, "v")
    model = Model()
    try:
        for through_view, op in steps:
            if through_view:
                await apply(op, view, lambda k: f"v:{k}" if k else "v", model)
            else:
                await apply(op, storage, lambda k: k, model)
            await check(storage, model)
    finally:
        await storage.clear()
