"""Key rules: normalization and validation, done once in the core for every driver.

A key is a string of segments joined by ``:``. ``/`` and ``\\`` are accepted as separators;
runs of separators collapse; leading and trailing separators are dropped. ``?`` is an
ordinary character. Rejected with :class:`~kvstorage.errors.InvalidKeyError`: a ``.`` or
``..`` segment, control characters, more than 1024 UTF-8 bytes, and (for item operations)
an empty key.

Bases match by whole segments: base ``a`` covers ``a:b`` but neither ``a`` nor ``ab``
(:func:`base_covers`, :func:`depth_below`, :func:`key_range`, for the core and for drivers
that list by range).
"""

from __future__ import annotations

import functools
import re

from .errors import InvalidKeyError

__all__ = [
    "MAX_KEY_BYTES",
    "base_covers",
    "depth_below",
    "is_normal",
    "join_keys",
    "key_range",
    "normalize_base",
    "normalize_key",
]

MAX_KEY_BYTES = 1024

# Keys that are already normal and valid (the common case) skip the slow path.
_SIMPLE = re.compile(r"[A-Za-z0-9_\-@+=,]+(?::[A-Za-z0-9_\-@+=,]+)*")
is_normal = _SIMPLE.fullmatch
"""``is_normal(key)`` is true (a match) for a key that normalization leaves unchanged and
that is valid, when it is at most :data:`MAX_KEY_BYTES` long: ASCII letters, digits and
``_-@+=,`` in segments joined by single ``:``. False for many other valid keys."""
_SEPARATORS = re.compile(r"[:/\\]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def normalize_base(base: str) -> str:
    """Normalize a base (for listing, clearing, mounting); ``""`` is the root."""
    if not isinstance(base, str):
        raise InvalidKeyError(f"key must be a str, not {type(base).__name__}")
    if len(base) <= MAX_KEY_BYTES and is_normal(base):
        return base
    key = _SEPARATORS.sub(":", base).strip(":")
    if _CONTROL.search(key):
        raise InvalidKeyError(f"key {base!r} contains a control character")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidKeyError(f"key {base!r} is not valid Unicode (lone surrogate)") from None
    if size > MAX_KEY_BYTES:
        raise InvalidKeyError(f"key is longer than {MAX_KEY_BYTES} UTF-8 bytes")
    if key and any(segment in (".", "..") for segment in key.split(":")):
        raise InvalidKeyError(f"key {base!r} contains a '.' or '..' segment")
    return key


@functools.lru_cache(maxsize=16384)
def normalize_key(key: str) -> str:
    """Normalize an item key; an empty result is rejected.

    Results are cached (16,384 keys): hot keys skip the work entirely.

    >>> normalize_key("/users//42/")
    'users:42'
    """
    normalized = normalize_base(key)
    if not normalized:
        raise InvalidKeyError(f"empty key {key!r}")
    return normalized


def join_keys(*parts: str) -> str:
    """Join keys or bases into one normalized base (empty parts are skipped)."""
    return normalize_base(":".join(part for part in parts if part))


def base_covers(base: str, key: str) -> bool:
    """True when ``key`` lies strictly under ``base`` by whole segments (``""`` covers all)."""
    return not base or (key.startswith(base) and key[len(base) : len(base) + 1] == ":")


def depth_below(base: str, key: str) -> int:
    """The number of separators in ``key`` below ``base`` (``0`` for a direct child)."""
    return key.count(":", len(base) + 1 if base else 0)


def key_range(base: str) -> tuple[str, str]:
    """The half-open string range ``[low, high)`` holding exactly the keys under ``base``
    (``"a"`` -> ``("a:", "a;")``; ``;`` is the character after ``:``). For sorted backends
    (SQL indexes, sorted sets) that list by range instead of by pattern."""
    return base + ":", base + ";"
