"""Transitional: the driver interface moved to :mod:`kvstorage.drivers.base`.

Kept only while the fs and redis driver branches are merged; deleted right after.
"""

from .drivers.base import *  # noqa: F403
from .drivers.base import __all__ as _base_all
from .keys import base_covers, depth_below, key_range

__all__ = [*_base_all, "base_covers", "depth_below", "key_range"]
