"""Bulk copies of a storage: `snapshot` and `restore_snapshot`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .storage import Storage, prefix_storage

__all__ = ["restore_snapshot", "snapshot"]

_BATCH = 500


async def snapshot(storage: Storage, base: str = "") -> dict[str, Any]:
    """Return ``{key relative to base: value}`` for every key under ``base``."""
    view = prefix_storage(storage, base)
    result: dict[str, Any] = {}
    batch: list[str] = []
    async for key in view.iter_keys():
        batch.append(key)
        if len(batch) >= _BATCH:
            result.update(await view.get_items(batch))
            batch = []
    if batch:
        result.update(await view.get_items(batch))
    return result


async def restore_snapshot(storage: Storage, data: Mapping[str, Any], base: str = "") -> None:
    """Write every ``{relative key: value}`` of ``data`` under ``base`` (keys not in
    ``data`` are left alone)."""
    view = prefix_storage(storage, base)
    items = list(data.items())
    for start in range(0, len(items), _BATCH):
        await view.set_items(items[start : start + _BATCH])
