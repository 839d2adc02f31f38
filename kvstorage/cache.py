"""Caching on top of a storage: :func:`cached` and :class:`TieredDriver`."""

from __future__ import annotations

from .drivers.tiered import TieredDriver

__all__ = ["TieredDriver"]
