"""The built-in drivers, imported lazily: ``import kvstorage`` needs no backend library,
and ``from kvstorage.drivers import RedisDriver`` needs only ``redis``.

=================  ========================  ===============================================
class              URL                       extra
=================  ========================  ===============================================
``MemoryDriver``   ``memory://``             (none)
``FSDriver``       ``file:///abs``,          ``fs``
                   ``file://./rel``
``SQLiteDriver``   ``sqlite:///rel.db``,     ``sqlite``
                   ``sqlite:////abs.db``,
                   ``sqlite://:memory:``
``RedisDriver``    ``redis://h:p/db?base=``, ``redis``
                   ``rediss://``,
                   ``redis+cluster://h:p,h:p``
``S3Driver``       ``s3://bucket/prefix``    ``s3``
``HTTPDriver``     ``http://h:p/base``,      ``http``
                   ``https://...``
``PostgresDriver`` ``postgresql://u:p@h:p/`` ``postgres``
                   ``db?table=kv``,
                   ``postgres://...``
``TieredDriver``   (none: built on two       (none; a memory cache in front of another
                   drivers)                  driver, see ``kvstorage.cache``)
=================  ========================  ===============================================
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, NamedTuple

from .base import Driver

if TYPE_CHECKING:  # for type checkers only: at run time each class loads on first use
    from .fs import FSDriver as FSDriver
    from .http import HTTPDriver as HTTPDriver
    from .memory import MemoryDriver as MemoryDriver
    from .postgres import PostgresDriver as PostgresDriver
    from .redis import RedisDriver as RedisDriver
    from .s3 import S3Driver as S3Driver
    from .sqlite import SQLiteDriver as SQLiteDriver
    from .tiered import TieredDriver as TieredDriver


class _Registered(NamedTuple):
    class_name: str
    module: str  # in this package
    extra: str  # the pip extra that installs its client library ("" for none)
    schemes: tuple[str, ...]  # URL schemes from_url() hands to it


#: Every built-in driver: adding one is one module and one row here.
_REGISTRY = (
    _Registered("MemoryDriver", "memory", "", ("memory",)),
    _Registered("FSDriver", "fs", "fs", ("file",)),
    _Registered("SQLiteDriver", "sqlite", "sqlite", ("sqlite",)),
    _Registered("RedisDriver", "redis", "redis", ("redis", "rediss", "redis+cluster")),
    _Registered("S3Driver", "s3", "s3", ("s3",)),
    _Registered("HTTPDriver", "http", "http", ("http", "https")),
    _Registered("PostgresDriver", "postgres", "postgres", ("postgresql", "postgres")),
    _Registered("TieredDriver", "tiered", "", ()),
)
_BY_CLASS = {entry.class_name: entry for entry in _REGISTRY}
_BY_SCHEME = {scheme: entry for entry in _REGISTRY for scheme in entry.schemes}

__all__ = [*_BY_CLASS, "Driver", "from_url"]


def _load(entry: _Registered) -> type[Driver]:
    try:
        module = importlib.import_module(f"{__name__}.{entry.module}")
    except ModuleNotFoundError as exc:
        raise ImportError(
            f"{entry.class_name} needs {exc.name!r}: pip install 'kvstorage[{entry.extra}]'"
        ) from exc
    driver_class: type[Driver] = getattr(module, entry.class_name)
    return driver_class


def __getattr__(name: str) -> Any:
    entry = _BY_CLASS.get(name)
    if entry is not None:
        return _load(entry)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def from_url(url: str) -> Driver:
    """Build a driver from a URL (see the table above).

    Raises:
        ValueError: the scheme is unknown (the message names the known ones).
    """
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    entry = _BY_SCHEME.get(scheme)
    if entry is None:  # the URL itself is not shown: it may hold a password
        known = ", ".join(f"{s}://" for s in _BY_SCHEME)
        given = f"scheme {scheme + '://'!r}" if scheme else "a URL without scheme://"
        raise ValueError(f"unknown storage URL: {given}; known schemes: {known}")
    return _load(entry).from_url(url)
