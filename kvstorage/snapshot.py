"""Views and bulk copies of a storage: `prefix_storage`, `snapshot`, `restore_snapshot`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .keys import normalize_base
from .storage import Storage

__all__ = ["prefix_storage", "restore_snapshot", "snapshot"]

_BATCH = 500


def prefix_storage(storage: Storage, base: str) -> Storage:
    """Return a view of ``storage`` where every key is relative to ``base``.

    The view shares mounts, drivers and watchers with ``storage``: listing strips
    ``base``, ``clear()`` clears only under it, ``watch()`` sees only its keys. It is a
    convenience, not a security boundary.
    """
    if not normalize_base(base):
        return storage
    return storage._view(storage._full_base(base))


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
